"""Measured per-layer latency tables (`asga lut`) and the whole-model latency a policy is predicted to have.

    table = run_lut(LutConfig("resnet20", "ort", batch_size=1, input_size=28, in_chans=1))
    predict_latency(table, policy)        # ms: rest + each layer's choice + float-pair corrections
    lut, rest_ms = table.cost_inputs()    # what cost.CostTable takes (metric "latency")
"""

from .build import LutConfig, run_lut
from .table import LatencyTable, LutError, load_lut, predict_latency

__all__ = ["LatencyTable", "LutConfig", "LutError", "load_lut", "predict_latency", "run_lut"]
