"""Exact QDQ export: parity per target, grids, zero points, Clip bounds, INT4, metadata, ORT fusion, TRT check."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, numpy_helper  # noqa: E402

from asga_deploy.errors import UnsupportedTargetError  # noqa: E402
from asga_deploy.export.check import check_tensorrt  # noqa: E402
from asga_deploy.export.ort import ParityConfig, integer_kernels  # noqa: E402
from asga_deploy.export.run import ExportConfig, run_export  # noqa: E402
from asga_deploy.policy import Policy, uniform_policy  # noqa: E402

from .test_export_helpers import make_checkpoint, random_loader  # noqa: E402

CASES = {  # name: (model, w, a, target, int4)
    "ort_w8a8_resnet": ("tinyresnet", 8, 8, "ort", False),
    "ort_w4a4_int4": ("tinynet", 4, 4, "ort", True),
    "trt_w4a6_dw": ("tinydw", 4, 6, "tensorrt", False),
    "trt_w5a7_resnet": ("tinyresnet", 5, 7, "tensorrt", False),
    "sim_w3a5": ("tinynet", 3, 5, "sim", False),
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Export every case once (with a random-data parity run); return {case: (report, proto, policy)}."""
    out = {}
    for case, (name, w, a, target, int4) in CASES.items():
        tmp = tmp_path_factory.mktemp(case)
        p, c, pol = make_checkpoint(tmp, name, w, a, target)
        cfg = ExportConfig(str(p), str(c), out_dir=str(tmp / "out"), int4_storage=int4,
                           parity=ParityConfig(images=64))
        rep = run_export(cfg, loader=random_loader(tuple(pol.cost["input_shape"])))
        out[case] = (rep, onnx.load(rep["onnx"]), Policy.load(p))
    return out


def _consts(proto) -> dict:
    c = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "Constant":
            c[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return c


def _users(proto, name):
    return [n for n in proto.graph.node if name in n.input]


@pytest.mark.parametrize("case", list(CASES))
def test_parity_and_bn_folded(exports, case):
    rep, proto, _ = exports[case]
    p = rep["parity"]
    assert p["passed"] and p["top1_agreement"] >= 0.995 and p["images"] == 64
    assert p["max_abs_logit_diff"] < 1e-2
    assert not [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch


@pytest.mark.parametrize("case", list(CASES))
def test_weights_on_their_grid_per_channel_zero_point_zero(exports, case):
    _, proto, pol = exports[case]
    consts = _consts(proto)
    init_types = {i.name: i.data_type for i in proto.graph.initializer}
    for layer, bits in pol.layers.items():
        wname = f"{layer}.weight_int8"
        (dq,) = [n for n in _users(proto, wname) if n.op_type == "DequantizeLinear"]
        codes, scale, zp = consts[wname], consts[dq.input[1]], consts[dq.input[2]]
        assert np.abs(codes.astype(np.int32)).max() <= 2 ** (bits.weight_bits - 1) - 1
        assert scale.shape == (codes.shape[0],) and (zp.astype(np.int32) == 0).all()
        assert next(a.i for a in dq.attribute if a.name == "axis") == 0
        int4 = CASES[case][4] and bits.weight_bits <= 4
        assert init_types[wname] == (TensorProto.INT4 if int4 else TensorProto.INT8)
        assert [u.name for u in _users(proto, dq.output[0])] == [layer]


@pytest.mark.parametrize("case", list(CASES))
def test_activation_zero_points_types_and_clip_bounds(exports, case):
    _, proto, pol = exports[case]
    target = CASES[case][3]
    consts = _consts(proto)
    qs = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert qs
    for q in qs:
        zp = consts[q.input[2]]
        assert (zp.astype(np.int32) == 0).all()
        if target == "tensorrt":
            assert zp.dtype == np.int8
    checked = 0
    for layer, bits in pol.layers.items():  # layer input: [Clip ->] Q -> DQ -> layer
        (node,) = [n for n in proto.graph.node if n.name == layer]
        dq = next(n for n in proto.graph.node if n.output[0] == node.input[0])
        q = next(n for n in proto.graph.node if n.output[0] == dq.input[0])
        s, zp = float(consts[q.input[1]]), consts[q.input[2]]
        unsigned = not bits.act_signed
        assert zp.dtype == (np.uint8 if unsigned and target != "tensorrt" else np.int8)
        clip = next((n for n in proto.graph.node if n.output[0] == q.input[0] and n.op_type == "Clip"), None)
        if bits.act_bits == 8:
            assert clip is None
            continue
        lo, hi = float(consts[clip.input[1]]), float(consts[clip.input[2]])
        qmin, qmax = (0, 2**bits.act_bits - 1) if unsigned else (-(2 ** (bits.act_bits - 1)), 2 ** (bits.act_bits - 1) - 1)
        assert lo == pytest.approx(qmin * s, rel=1e-6, abs=1e-12) and hi == pytest.approx(qmax * s, rel=1e-6)
        checked += 1
    assert checked or all(b.act_bits == 8 for b in pol.layers.values())


def test_metadata_round_trips_the_policy(exports):
    for rep, proto, pol in exports.values():
        meta = {p.key: p.value for p in proto.metadata_props}
        back = Policy.from_dict(json.loads(meta["asga.policy"]))
        assert back.diff(pol) == [] and back.model == pol.model
        assert json.loads(meta["asga.provenance"])["asga_version"]
        assert meta["asga.target"] == rep["target"]


def test_w8a8_fuses_every_conv_in_ort(exports):
    rep, proto, pol = exports["ort_w8a8_resnet"]
    k = rep["ort_integer_kernels"]
    convs = [n for n in pol.layers if n != "fc"]
    assert all(k["layers"][n]["integer"] and k["layers"][n]["kernel"] == "QLinearConv" for n in convs)
    assert k["optimized_ops"].get("QLinearAdd") == 2  # both residual Adds run on integers
    assert "Relu" not in k["optimized_ops"]  # ORT drops each Relu in front of a zero-point-0 UINT8 Q
    names = [q["name"] for q in rep["deploy_quantizers"] if q["role"] != "tied_input"]
    assert names and all(n.startswith("deploy_quant.") for n in names)
    assert rep["parity"]["max_abs_logit_diff"] == 0.0  # integer kernels and torch agree to the bit here


def test_int4_storage_runs_matches_and_is_smaller(exports):
    rep, proto, _ = exports["ort_w4a4_int4"]
    s = rep["sizes"]
    assert s["int4_storage"] and s["weights"]["int4"] > 0
    assert s["file_bytes"] == s["file_bytes_int4_storage"] < s["file_bytes_int8_storage"]
    assert rep["parity"]["passed"] and rep["opset"] == 21


def test_static_tensorrt_check(exports):
    for case in ("trt_w4a6_dw", "trt_w5a7_resnet"):
        assert check_tensorrt(exports[case][1]) == []
    problems = check_tensorrt(exports["ort_w8a8_resnet"][1])
    assert any("UINT8" in p for p in problems)
    bad = copy.deepcopy(exports["trt_w4a6_dw"][1])
    for n in bad.graph.node:  # a per-channel weight on axis 1 and a non-zero zero point
        if n.op_type == "DequantizeLinear" and n.input[0].endswith("weight_int8"):
            next(a for a in n.attribute if a.name == "axis").i = 1
            break
    zp = next(i for i in bad.graph.initializer if i.name.endswith("weight_zero_point"))
    zp.CopyFrom(numpy_helper.from_array(np.ones(numpy_helper.to_array(zp).shape, np.int8), zp.name))
    problems = check_tensorrt(bad)
    assert any("axis 0" in p for p in problems) and any("non-zero zero point" in p for p in problems)
    bad.opset_import[0].version = 21
    assert any("opset 21" in p for p in check_tensorrt(bad))


def test_fp16_float_layers_variant(tmp_path):
    pol = uniform_policy("tinynet", 8, 7, "tensorrt", edges="float")
    p, c, _ = make_checkpoint(tmp_path, policy=pol)
    rep = run_export(ExportConfig(str(p), str(c), out_dir=str(tmp_path / "o"), fp16_float_layers=True,
                                  parity=ParityConfig(images=32)), loader=random_loader((1, 28, 28), 32))
    proto = onnx.load(rep["onnx"])
    assert rep["parity"]["passed"] and check_tensorrt(proto) == []
    halves = {i.name for i in proto.graph.initializer if i.data_type == TensorProto.FLOAT16}
    assert {"conv1.weight.fp16", "fc.weight.fp16"} <= halves
    assert len([n for n in proto.graph.node if n.op_type == "Cast"]) == 4
    with pytest.raises(UnsupportedTargetError, match="--fp16 .*not of ort"):
        run_export(ExportConfig(str(p), str(c), target="ort", fp16_float_layers=True,
                                out_dir=str(tmp_path / "x")))


def test_unsigned_8bit_activation_refused_on_tensorrt(tmp_path):
    p, c, _ = make_checkpoint(tmp_path, "tinynet", 8, 8, "ort")
    with pytest.raises(UnsupportedTargetError, match="conv2.*act_bits=8"):
        run_export(ExportConfig(str(p), str(c), target="tensorrt", out_dir=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


def test_integer_kernel_report_lists_unfused_layers(exports):
    _, proto, _ = exports["sim_w3a5"]
    k = integer_kernels(proto.SerializeToString())
    assert k["total"] == 4 and set(k["not_integer"]) <= {"conv1", "conv2", "conv3", "fc"}


def test_parity_off_tolerance_keeps_the_files(tmp_path):
    from asga_deploy.errors import ExportError

    p, c, _ = make_checkpoint(tmp_path, "tinynet", 8, 8, "ort")
    cfg = ExportConfig(str(p), str(c), out_dir=str(tmp_path / "o"), parity=ParityConfig(images=32, min_agreement=1.01))
    with pytest.raises(ExportError, match="parity off tolerance.*kept for inspection"):
        run_export(cfg, loader=random_loader((1, 28, 28), 32))
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["status"] == "parity_failed" and (tmp_path / "o" / "model.qdq.onnx").is_file()
