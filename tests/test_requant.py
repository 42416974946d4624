"""A requantization between two unsigned grids as one QLinearAdd (export/requant.py): exact by enumeration.

The emulation of MLAS's QLinearAdd is checked against the ONNX Runtime that runs here (an AVX2 or AVX-512
CPU: both use the AVX2 kernel; CI also runs this file on an emulated AVX2 CPU without VNNI), the 256-code check
is shown to reject the scale pairs where the fused op would round differently, and the rewrite leaves those,
and layers whose weights could saturate u8 x s8 pairs at inputs up to 255, in their Clip form.
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from asga_deploy.export.kernels import integer_kernels  # noqa: E402
from asga_deploy.export.ort import session  # noqa: E402
from asga_deploy.export.requant import exact, fuse_requant, qladd_codes, unfused_codes  # noqa: E402


def scale_pairs(n: int, seed: int = 0) -> list[tuple[np.float32, np.float32, int]]:
    """Random (s_in, s_out, bits) like a residual grid read by a b-bit conv input (s_out / s_in ~ 255 / (2^b - 1))."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        bits = int(rng.integers(2, 8))
        s_in = np.float32(rng.uniform(0.005, 0.2))
        out.append((s_in, np.float32(s_in * rng.uniform(0.5, 1.5) * 255 / (2**bits - 1)), bits))
    return out


def find_inexact(want: int) -> list[tuple[np.float32, np.float32, int]]:
    """Return scale pairs for which the fused op rounds some code differently (31 of 20,000 random pairs failed)."""
    found, seed = [], 0
    while len(found) < want:
        found += [p for p in scale_pairs(2000, seed) if not exact(*p)]
        seed += 1
    return found[:want]


def qladd_graph(s_in: float, s_out: float, zero_point: int):
    """u8 codes -> DQ(s_in) + DQ(0) -> Add -> Q(s_out, z) -> u8: what ORT fuses into QLinearAdd."""
    inits = [numpy_helper.from_array(np.array(v, t), n) for n, v, t in (
        ("s_in", s_in, np.float32), ("z_in", 0, np.uint8), ("zero", 0, np.uint8), ("one", 1.0, np.float32),
        ("z0", 0, np.uint8), ("s_out", s_out, np.float32), ("z_out", zero_point, np.uint8))]
    nodes = [helper.make_node("DequantizeLinear", ["x", "s_in", "z_in"], ["xf"]),
             helper.make_node("DequantizeLinear", ["zero", "one", "z0"], ["zf"]),
             helper.make_node("Add", ["xf", "zf"], ["sum"]),
             helper.make_node("QuantizeLinear", ["sum", "s_out", "z_out"], ["y"])]
    g = helper.make_graph(nodes, "qladd", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 256])],
                          [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 256])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def run_codes(model: bytes, optimize: bool) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    return s.run(None, {"x": np.arange(256, dtype=np.uint8)[None]})[0][0].astype(np.int64)


def test_the_emulation_is_what_onnx_runtime_computes_fused_and_unfused():
    """Fused (QLinearAdd): q * f32(s_in / s_out) + z in one FMA; unfused: DQ then Q (a division). Including the
    pairs where the two differ, so the emulation is checked exactly where it matters."""
    pairs = scale_pairs(30) + find_inexact(6)
    differ = 0
    for s_in, s_out, bits in pairs:
        z = 255 - (2**bits - 1)
        model = qladd_graph(float(s_in), float(s_out), z)
        fused, plain = run_codes(model, True) - z, run_codes(model, False) - z
        assert np.array_equal(fused, qladd_codes(s_in, s_out, z, fma=True))
        assert np.array_equal(plain, unfused_codes(s_in, s_out, 2**bits - 1))
        differ += not np.array_equal(fused, plain)
        if exact(s_in, s_out, bits):
            assert np.array_equal(fused, plain)
    assert differ >= 3  # most pairs find_inexact returns differ in the FMA kernel (the others in SSE2's only)


def test_the_check_rejects_ratios_outside_the_exact_float64_range():
    assert exact(np.float32(0.02), np.float32(0.3), 4)  # a usual residual grid -> 4-bit grid
    assert not exact(np.float32(1e-7), np.float32(1.0), 4)  # r < 2^-19: the float64 emulation could round
    assert not exact(np.float32(0.02), np.float32(0.3), 8)  # 8 bits: nothing to clip, nothing to rewrite


def requant_conv_graph(s_in: float, s_out: float, bits: int, weight_code: int):
    """x (float) -> Q8(s_in) -> DQ -> [Q(s_out) -> Clip(0, 2^b - 1) -> DQ] -> Conv 1x1 (INT8 weight) -> y: the
    form the lowering writes for a b-bit conv input read from another unsigned grid."""
    top = 2**bits - 1
    w = np.full((2, 3, 1, 1), weight_code, np.int8)
    inits = [numpy_helper.from_array(np.array(v, t), n) for n, v, t in (
        ("s8", s_in, np.float32), ("z8", 0, np.uint8), ("sb", s_out, np.float32), ("zb", 0, np.uint8),
        ("lo", 0, np.uint8), ("hi", top, np.uint8), ("zb2", 0, np.uint8))] + [
        numpy_helper.from_array(w, "conv.weight_int8"), numpy_helper.from_array(np.full(2, 0.01, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(2, np.int8), "wz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s8", "z8"], ["x8"]),
             helper.make_node("DequantizeLinear", ["x8", "s8", "z8"], ["xf"]),
             helper.make_node("QuantizeLinear", ["xf", "sb", "zb"], ["xb"]),
             helper.make_node("Clip", ["xb", "lo", "hi"], ["xc"]),
             helper.make_node("DequantizeLinear", ["xc", "sb", "zb2"], ["xin"]),
             helper.make_node("DequantizeLinear", ["conv.weight_int8", "ws", "wz"], ["wf"], axis=0),
             helper.make_node("Conv", ["xin", "wf"], ["y"], name="conv")]
    g = helper.make_graph(nodes, "requant", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_fuse_requant_rewrites_exact_pairs_into_one_integer_qladd_with_the_same_outputs():
    s_in, s_out, bits = np.float32(0.03), np.float32(0.37), 4
    assert exact(s_in, s_out, bits)
    before = requant_conv_graph(float(s_in), float(s_out), bits, 5)
    after = requant_conv_graph(float(s_in), float(s_out), bits, 5)
    assert fuse_requant(after) == ["conv.requant"]
    onnx.checker.check_model(after, full_check=True)
    ops = [n.op_type for n in after.graph.node]
    assert "Clip" not in ops and ops.count("Add") == 1
    zp = {i.name: numpy_helper.to_array(i) for i in after.graph.initializer}["conv.requant.zero_point"]
    assert int(zp) == 255 - (2**bits - 1)
    x = np.random.default_rng(0).uniform(0, 8, (1, 3, 8, 8)).astype(np.float32)  # codes 0..255 and past the top
    want = session(before.SerializeToString(), 1).run(None, {"x": x})[0]
    assert np.array_equal(session(after.SerializeToString(), 1).run(None, {"x": x})[0], want)
    k = integer_kernels(after.SerializeToString(), 1)
    assert k["requants"] == {"conv.requant": {"op": "Add", "kernel": "QLinearAdd", "integer": True}}


def test_fuse_requant_keeps_the_clip_form_where_it_would_not_be_exact_or_could_saturate():
    (s_in, s_out, bits), = find_inexact(1)
    inexact = requant_conv_graph(float(s_in), float(s_out), bits, 5)
    assert fuse_requant(inexact) == [] and "Clip" in [n.op_type for n in inexact.graph.node]
    # an 8-bit weight code: 2 * 255 * 127 leaves int16 on x86 without VNNI once the inputs reach 255
    wide = requant_conv_graph(0.03, 0.37, 4, 127)
    assert fuse_requant(wide) == [] and "Clip" in [n.op_type for n in wide.graph.node]
    ok = requant_conv_graph(0.03, 0.37, 4, 64)  # 2 * 255 * 64 = 32640 <= 32767
    assert fuse_requant(ok) == ["conv.requant"]


def test_the_latency_table_times_a_requantization_in_its_reading_layers_unit():
    """The QLinearAdd is part of the unit of the conv that reads it (from the 8-bit codes it requantizes), as the
    DQ -> Q -> Clip it replaces was: the table prices what the export writes."""
    from asga_deploy.lut.build import LutConfig, plan_ort, resolve

    cfg = LutConfig("tinyresnet")
    target, shape, threads = resolve(cfg)
    units, _ = plan_ort(cfg, target, shape, threads)
    with_add = {k: [n.op_type for n in onnx.load_from_string(u.onnx).graph.node] for k, u in units.items()
                if k.startswith("requant|")}
    readers = [k for k, ops in with_add.items() if "Add" in ops]
    assert readers and all(units[k].input_dtype == "uint8" and "Clip" not in with_add[k] for k in readers)
    whole = onnx.load_from_string(units["whole|requant"].onnx)  # one Add per value: layers reading it share it
    adds = {n.name for n in whole.graph.node if n.name.endswith(".requant")}
    assert adds and adds <= {k.split("|")[1] + ".requant" for k in readers}
