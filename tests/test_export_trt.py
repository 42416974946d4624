"""TensorRT: engine build, CUDA-event profile, precision check, ORT comparison (skipped without TensorRT/GPU)."""

from __future__ import annotations

import json

import pytest
import torch

from asga_deploy.export.trt import _precision, check_precisions, onnx_names

from .test_export_helpers import make_checkpoint, random_loader


def _has_trt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def test_inspector_parsing_both_schemas():
    v10 = {"Name": "conv1 + /relu/Relu", "LayerType": "CaskConvolution",
           "Inputs": [{"Name": "x", "Format/Datatype": "Channel major INT8 format where channel % 32 == 0"}],
           "Metadata": "[ONNX Layer: conv1]\x1e[ONNX Layer: /relu/Relu]"}
    v11 = {"Name": "fc", "LayerType": "CaskGemm", "Inputs": [{"Name": "y", "DataType": "Half", "Format": "kLINEAR"}]}
    assert onnx_names(v10) == ["conv1", "/relu/Relu"] and onnx_names(v11) == ["fc"]
    assert _precision(v10) == "int8" and _precision(v11) == "fp16"
    chk = check_precisions([v10, v11], ["conv1", "conv2"], ["fc"])
    assert chk["not_int8"] == ["conv2"] and chk["float_not_fp16"] == []


@pytest.mark.tensorrt
@pytest.mark.skipif(not _has_trt(), reason="needs TensorRT and a CUDA GPU")
def test_engine_build_profile_and_precisions(tmp_path):
    from asga_deploy.export.ort import ParityConfig
    from asga_deploy.export.run import ExportConfig, run_export
    from asga_deploy.export.trt import TrtConfig

    p, c, pol = make_checkpoint(tmp_path, "tinyresnet", 8, 7, "tensorrt")
    cfg = ExportConfig(str(p), str(c), out_dir=str(tmp_path / "o"), trt=True, parity=ParityConfig(images=64),
                       trt_config=TrtConfig(max_batch=32, iters=50, warmup=10, layer_iters=5))
    rep = run_export(cfg, loader=random_loader((1, 28, 28), 64))
    t = rep["tensorrt"]
    assert (tmp_path / "o" / "model.engine").is_file() and (tmp_path / "o" / "trt_build.log").is_file()
    assert (tmp_path / "o" / "timing.cache").is_file()
    assert t["ort_vs_trt"]["top1_agreement"] >= 0.95
    assert t["precision_check"]["not_int8"] == [] or set(t["precision_check"]["not_int8"]) <= {"conv1"}
    lat = json.loads((tmp_path / "o" / "latency.json").read_text())
    assert lat["batches"][0]["p50_ms"] > 0 and lat["layers"]
