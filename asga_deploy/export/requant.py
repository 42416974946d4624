"""A requantization between two unsigned grids as one QLinearAdd (ONNX Runtime targets).

A sub-8-bit activation whose input is already on another unsigned 8-bit grid (a residual Add's output, a
max-pool's) is lowered as `DQ(s_a) -> Q(s_b) -> Clip(0, 2^b - 1) -> DQ(s_b)` (units.mark_requant). ONNX Runtime
runs that as three passes over the tensor (DequantizeLinear and QuantizeLinear stay separate float ops, then a
UINT8 Clip). `fuse_requant` rewrites it as

    DQ(s_a) + DQ(0) -> Add -> Q(s_b, z) -> DQ(s_b, z),    z = 255 - (2^b - 1)

which ONNX Runtime runs as ONE QLinearAdd: the input is UINT8 with zero point 0, so never negative, and the
output saturates at 255, which is code 2^b - 1 on the b-bit grid: the Clip is the saturation. The conv that
reads it takes zero point z (the same real values).

Exactness is checked, not assumed. QLinearAdd does not divide by s_b: MLAS multiplies the code by the float32
ratio s_a / s_b and adds z (one fused multiply-add in its AVX2 kernel, which AVX-512 CPUs use too; a multiply
and an add in its SSE2 kernel), then rounds half to even. DequantizeLinear -> QuantizeLinear computes
round(f32(f32(q s_a) / s_b)). The two can disagree next to a rounding tie, so each requantization is rewritten
only when both kernels' results equal the unfused one for all 256 input codes (`exact`); 31 of 20,000 random
scale pairs failed (0.16%) and keep the Clip form. The reading layers' weights must also keep u8 x s8 product
pairs within int16 with u8 inputs up to 255 (x86 without VNNI, targets.pair_saturates): their inputs now reach
255.
"""

from __future__ import annotations

import numpy as np

from ..errors import require
from ..targets import pair_saturates
from .graph import constant_reader, readers

SUFFIX = ".requant"  # the Add nodes this pass writes: <first reading layer>.requant


def unfused_codes(s_in: float, s_out: float, top: int) -> np.ndarray:
    """Return the b-bit codes of DequantizeLinear(q, s_in) -> QuantizeLinear(s_out) -> Clip(0, top), q = 0..255."""
    x = np.arange(256, dtype=np.float32) * np.float32(s_in)
    return np.clip(np.rint(x / np.float32(s_out)), 0, top)


def qladd_codes(s_in: float, s_out: float, zero_point: int, fma: bool) -> np.ndarray:
    """Return MLAS QLinearAdd(q, 0) codes for q = 0..255 (output zero point removed): c = q * f32(s_in / s_out) + z
    rounded once (fma, the AVX2 kernel) or after each step (the SSE2 kernel), then round half to even, clamp 0..255.

    float64 holds q * r + z exactly when r >= 2^-19 (24 + 8 significant bits and z < 2^8), so the one float32
    rounding below is the fused multiply-add's; callers check that range (`exact`).
    """
    r = float(np.float32(np.float32(s_in) / np.float32(s_out)))
    q = np.arange(256, dtype=np.float64)
    if fma:
        c = (q * r + zero_point).astype(np.float32)
    else:
        c = (q * r).astype(np.float32) + np.float32(zero_point)
    return np.clip(np.rint(c), 0, 255) - zero_point


def exact(s_in: float, s_out: float, bits: int) -> bool:
    """Return whether QLinearAdd(q, 0) into (s_out, 256 - 2^b) gives DQ -> Q -> Clip's b-bit codes for every q, on
    both MLAS x86 kernels."""
    top = 2**bits - 1
    r = float(np.float32(np.float32(s_in) / np.float32(s_out)))
    if not (np.isfinite(r) and 2.0**-19 <= r <= 2.0**16 and 1 <= bits < 8):
        return False
    want = unfused_codes(s_in, s_out, top)
    return all(np.array_equal(want, qladd_codes(s_in, s_out, 255 - top, fma)) for fma in (True, False))


def scalar(v: np.ndarray) -> int:
    """Return the one integer of a one-element array (a zero point or a Clip bound)."""
    return int(v.reshape(-1)[0])


def fuse_requant(proto) -> list[str]:
    """Rewrite each exact `DQ(UINT8, zero point 0) -> Q -> Clip(0, 2^b - 1) -> DQ -> layers` as a QLinearAdd form (see
    the module docstring); return the names of the Add nodes written (<first reading layer>.requant)."""
    onnx = require("onnx", "onnx")
    numpy_helper, helper = onnx.numpy_helper, onnx.helper
    g = proto.graph
    producer = {o: n for n in g.node for o in n.output}
    reads = readers(g)
    const = constant_reader(g)

    def zero_point(node) -> np.ndarray | None:
        return const(node.input[2]) if len(node.input) > 2 else None

    def weight_codes(layer) -> np.ndarray | None:  # the INT8 codes behind a quantized layer's weight DequantizeLinear
        dq = producer.get(layer.input[1]) if len(layer.input) > 1 else None
        return const(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None

    written = []
    for q in [n for n in g.node if n.op_type == "QuantizeLinear"]:
        src = producer.get(q.input[0])
        after = reads.get(q.output[0], [])
        if src is None or src.op_type != "DequantizeLinear" or len(after) != 1 or after[0].op_type != "Clip":
            continue
        clip = after[0]
        za, zb = zero_point(src), zero_point(q)
        lo, hi = (const(clip.input[i]) if len(clip.input) > i else None for i in (1, 2))
        s_in, s_out = const(src.input[1]), const(q.input[1])
        if any(v is None or v.size != 1 for v in (za, zb, lo, hi, s_in, s_out)) or za.dtype != np.uint8 \
                or zb.dtype != np.uint8 or scalar(za) != 0 or scalar(zb) != 0 or scalar(lo) != 0:
            continue
        top = scalar(hi)
        bits = top.bit_length()
        dqs = reads.get(clip.output[0], [])
        layers = [u for d in dqs for u in reads.get(d.output[0], [])]
        zps = [zero_point(d) if d.op_type == "DequantizeLinear" else None for d in dqs]
        if top != 2**bits - 1 or not dqs or any(z is None or z.size != 1 or scalar(z) != 0 for z in zps):
            continue
        codes = [weight_codes(u) if u.op_type in ("Conv", "Gemm") and u.input[0] in {d.output[0] for d in dqs}
                 else None for u in layers]
        if not layers or any(c is None for c in codes) or any(
                pair_saturates(int(np.abs(c.astype(np.int32)).max()), 8, False) for c in codes):
            continue  # only integer layers, whose u8 x s8 pairs stay within int16 with inputs up to 255
        if not exact(float(s_in.reshape(-1)[0]), float(s_out.reshape(-1)[0]), bits):
            continue
        name = layers[0].name + SUFFIX
        zero_name, out_zp = f"{name}.zero", f"{name}.zero_point"
        g.initializer.extend([
            numpy_helper.from_array(np.array(0, np.uint8), zero_name),
            numpy_helper.from_array(np.array(1.0, np.float32), f"{zero_name}.scale"),
            numpy_helper.from_array(np.array(0, np.uint8), f"{zero_name}.zero_point"),  # its own: ORT's layout
            numpy_helper.from_array(np.array(255 - top, np.uint8), out_zp)])            # pass rewrites shared ones
        idx = list(g.node).index(q)
        g.node.insert(idx, helper.make_node("DequantizeLinear", [zero_name, f"{zero_name}.scale",
                                                                 f"{zero_name}.zero_point"],
                                            [f"{name}.zero_dq"], name=f"{name}.zero_dq"))
        g.node.insert(idx + 1, helper.make_node("Add", [q.input[0], f"{name}.zero_dq"], [f"{name}.sum"], name=name))
        q.input[0] = f"{name}.sum"
        del q.input[2:]
        q.input.append(out_zp)
        for d in dqs:
            d.input[0] = q.output[0]
            del d.input[2:]
            d.input.append(out_zp)
        g.node.remove(clip)
        written.append(name)
    return written
