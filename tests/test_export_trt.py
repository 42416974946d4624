"""TensorRT: inspector parsing (10 and 11), the input/output precision check, per-layer times per policy layer,
bounded build logging (all without TensorRT); engine build, profile and ORT comparison (skipped without it)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from asga_deploy.export.trt import _logger
from asga_deploy.export.trt_check import (
    check_precisions,
    dtype,
    expectations,
    onnx_names,
    per_policy_layer,
    precision,
    quantized_outputs,
)

from .test_export_helpers import make_checkpoint, random_loader

V10 = {"Name": "conv1 + /relu/Relu", "LayerType": "CaskConvolution",
       "Inputs": [{"Name": "x", "Format/Datatype": "Channel major INT8 format where channel % 32 == 0"}],
       "Outputs": [{"Name": "y", "Format/Datatype": "Channel major INT8 format where channel % 32 == 0"}],
       "Metadata": "[ONNX Layer: conv1]\x1e[ONNX Layer: /relu/Relu]"}
V10_FP32_OUT = {"Name": "conv2", "LayerType": "CaskConvolution",
                "Inputs": [{"Name": "y", "Format/Datatype": "Channel major INT8 format where channel % 32 == 0"}],
                "Outputs": [{"Name": "z", "Format/Datatype": "Row major linear FP32"}]}
V11 = {"Name": "fc", "LayerType": "CaskGemm", "Inputs": [{"Name": "y", "DataType": "Half", "Format": "kLINEAR"}],
       "Outputs": [{"Name": "logits", "DataType": "Float"}]}


def _has_trt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def test_inspector_parsing_both_schemas():
    assert onnx_names(V10) == ["conv1", "/relu/Relu"] and onnx_names(V11) == ["fc"]
    assert precision(V10) == {"inputs": ["int8"], "outputs": ["int8"]}
    assert precision(V10_FP32_OUT) == {"inputs": ["int8"], "outputs": ["fp32"]}  # TensorRT 10's "Row major linear FP32"
    assert precision(V11) == {"inputs": ["fp16"], "outputs": ["fp32"]}
    assert [dtype({"DataType": t}) for t in ("Int8", "FP8", "BFloat16", "Half", "Float", "Int32")] == \
        ["int8", "fp8", "bf16", "fp16", "fp32", "int32"]


def test_precision_check_reads_inputs_and_outputs():
    layers = [V10, V10_FP32_OUT, V11, {"Name": "reformat", "LayerType": "Reformat", "Metadata": "[ONNX Layer: conv3]"}]
    chk = check_precisions(layers, ["conv1", "conv2", "conv3"], ["fc"], int8_outputs={"conv1", "conv2"})
    assert chk["layers"]["conv2"] == {"inputs": ["int8"], "outputs": ["fp32"]}
    assert chk["not_int8"] == ["conv2", "conv3"] and chk["float_not_fp16"] == [] and not chk["passed"]
    assert any("conv2: INT8 in but fp32 out" in p for p in chk["problems"])
    assert any(p.startswith("conv3: runs absent in") for p in chk["problems"])  # only a reformat carries it
    ok = check_precisions([V10, V10_FP32_OUT, V11], ["conv1", "conv2"], ["fc"], int8_outputs={"conv1"})
    assert ok["passed"] and ok["problems"] == []  # conv2's output is not quantized in the graph: FP32 is right
    assert check_precisions([V11], [], ["fc"], None, "fp32")["float_not_fp16"] == ["fc"]


def test_per_layer_times_are_summed_per_policy_layer():
    rows = [{"trt_layer": "conv1 + relu", "mean_ms": 0.5, "onnx_nodes": ["conv1", "/relu/Relu"]},
            {"trt_layer": "conv1 reformat", "mean_ms": 0.1, "onnx_nodes": ["conv1"]},
            {"trt_layer": "pool", "mean_ms": 0.2, "onnx_nodes": ["/pool/GlobalAveragePool"]},
            {"trt_layer": "fc", "mean_ms": 0.05, "onnx_nodes": ["fc"]}]
    got = per_policy_layer(rows, ["conv1", "conv2", "fc"])
    assert got == pytest.approx({"conv1": 0.6, "conv2": 0.0, "fc": 0.05, "(other)": 0.2})


def test_logger_is_bounded_and_streams_to_its_file(tmp_path):
    class Severity:  # the shape of trt.ILogger.Severity members: "Severity.VERBOSE"
        def __init__(self, name):
            self.name = name

        def __str__(self):
            return f"Severity.{self.name}"

    fake = SimpleNamespace(ILogger=type("ILogger", (), {"__init__": lambda self: None}))
    log = _logger(fake, tmp_path / "build.log", keep=10)
    for i in range(1000):
        log.log(Severity("VERBOSE"), f"v{i}")
        log.log(Severity("INFO"), f"i{i}")
    log.log(Severity("ERROR"), "boom")
    log.close()
    assert len(log.lines) == 10 and log.lines[-1] == "[ERROR] boom"
    assert log.counts == {"VERBOSE": 1000, "INFO": 1000, "ERROR": 1}
    text = (tmp_path / "build.log").read_text().splitlines()
    assert len(text) == 1001 and not any(t.startswith("[VERBOSE]") for t in text)


def test_expectations_from_the_exported_graph(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    from asga_deploy.export.ort import ParityConfig
    from asga_deploy.export.run import ExportConfig, run_export
    from asga_deploy.policy import uniform_policy

    pol = uniform_policy("tinyresnet", 8, 7, "tensorrt", edges="float")
    p, c, _ = make_checkpoint(tmp_path, policy=pol)
    rep = run_export(ExportConfig(str(p), str(c), out_dir=str(tmp_path / "o"), fp16_float_layers=True,
                                  parity=ParityConfig(images=32)), loader=random_loader((1, 28, 28), 32))
    quantized = list(pol.layers)
    int8_out, float_dtype = expectations(rep["onnx"], quantized, pol.float_layers, weak_fp16=False)
    assert float_dtype == "fp16"  # the graph's float layers are FP16 (TensorRT 11 strong typing keeps them)
    # conv1 of each block feeds the next conv's Q; conv2 and the projection fuse into the residual Add, whose
    # output is quantized by the next layer: all INT8 out; the last block's Add goes to pooling (float)
    assert {"layer1.0.conv1", "layer1.1.conv1", "layer1.0.conv2", "layer1.1.downsample.0"} <= int8_out
    assert "layer1.1.conv2" not in int8_out
    assert quantized_outputs(onnx.load(rep["onnx"]), []) == set()
    assert expectations(None, quantized, [], weak_fp16=True) == (None, "fp16")


@pytest.mark.tensorrt
@pytest.mark.skipif(not _has_trt(), reason="needs TensorRT and a CUDA GPU")
def test_engine_build_profile_and_precisions(tmp_path):
    from asga_deploy.export.ort import ParityConfig
    from asga_deploy.export.run import ExportConfig, run_export
    from asga_deploy.export.trt import TrtConfig

    p, c, pol = make_checkpoint(tmp_path, "tinyresnet", 8, 7, "tensorrt")
    cfg = ExportConfig(str(p), str(c), out_dir=str(tmp_path / "o"), trt=True, parity=ParityConfig(images=64),
                       trt_config=TrtConfig(max_batch=32, iters=50, warmup=10, layer_iters=5, batch_sizes=(1, 8),
                                            precision_check="warn"))
    rep = run_export(cfg, loader=random_loader((1, 28, 28), 64))
    t = rep["tensorrt"]
    assert (tmp_path / "o" / "model.engine").is_file() and (tmp_path / "o" / "trt_build.log").is_file()
    assert (tmp_path / "o" / "timing.cache").is_file()
    assert t["ort_vs_trt"]["top1_agreement"] >= 0.95
    assert set(t["precision_check"]["not_int8"]) <= {"conv1"}  # a 1-channel first conv may lack INT8 tactics
    lat = json.loads((tmp_path / "o" / "latency.json").read_text())
    assert lat["batches"][0]["p50_ms"] > 0 and set(lat["layers"]) == {"1", "8"}
    assert set(lat["per_policy_layer"]["8"]) == {*pol.layers, "(other)"} and lat["machine"]["isa"]["kind"]
