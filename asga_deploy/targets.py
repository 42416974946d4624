"""Backend targets: what each backend runs exactly, and every rule that follows from it (architecture.md, "Targets").

Code elsewhere asks a `Target` (its fields and methods) instead of testing target names.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UnsupportedTargetError

BITS_RANGE = (2, 8)
DEFAULT_TARGET = "ort"  # what `asga policy uniform`, finetune and export assume when nothing is said
_ALL = tuple(range(BITS_RANGE[0], BITS_RANGE[1] + 1))
# x86 without VNNI (SSE4.1, AVX2, AVX-512 without VNNI): ONNX Runtime's U8S8 kernels add pairs of u8 x s8
# products in 16 bits with saturation (vpmaddubsw), so |sum| must stay within int16 for every pair
INT16_MAX = 32767
# ONNX Runtime's session option that makes those kernels exact (U8U8 instead of U8S8, slower) on such CPUs
X64_PRECISION_OPTION = ("session.x64quantprecision", "1")


def u8_max(act_bits: int, act_signed: bool) -> int:
    """Return the largest u8 value an activation reaches inside ONNX Runtime's x86 kernels.

    Unsigned b-bit codes are [0, 2^b - 1]; signed ones are shifted into u8 by +128 (ORT converts S8
    activations to U8 with zero point 128 on x86), so they reach 128 + 2^(b-1) - 1.
    """
    return 128 + 2 ** (act_bits - 1) - 1 if act_signed else 2**act_bits - 1


def pair_saturates(max_weight_code: int, act_bits: int, act_signed: bool) -> bool:
    """Return whether a u8 x s8 product pair can leave int16 (wrong results on x86 without VNNI)."""
    return 2 * u8_max(act_bits, act_signed) * max_weight_code > INT16_MAX


@dataclass(frozen=True)
class Target:
    """What a backend runs (bit-widths per operand) and how a model is lowered and checked for it."""

    name: str
    weight_bits: tuple[int, ...]
    act_bits_signed: tuple[int, ...]
    act_bits_unsigned: tuple[int, ...]
    description: str
    # deploy quantizers the fake-quant model carries: "" none, "units" 8-bit Q/DQ around residual Adds and
    # conv outputs (ONNX Runtime's full node units), "add_inputs" signed 8-bit Q/DQ on the residual input of
    # each Add (NVIDIA's QAT rule for TensorRT); a policy switches them off with deploy.residual_quant = false
    residual_quant: str = ""
    signed_int8_only: bool = False  # every activation Q/DQ is signed INT8 (unsigned b-bit lowered through it)
    opsets: tuple[int, ...] = tuple(range(13, 22))  # ONNX opsets the backend's parser takes
    default_opset: int = 17
    int4_storage: bool = True  # INT4 weight initializers (opset 21) allowed
    float_dtype: str = "fp32"  # what a float layer computes in on this backend
    integer_kernel_report: bool = False  # ONNX Runtime's optimized graph tells which layers run on integers
    integer_kernels_required: bool = False  # the export fails when a policy layer runs on a float kernel
    static_check: bool = False  # the static TensorRT compatibility check gates the export
    runs_engine: bool = False  # `asga export --trt` builds an engine for it
    int32_bias: bool = False  # quantized layers' bias as INT32 behind a DequantizeLinear (QGemm for logits)
    fused_requant: bool = False  # sub-8-bit activations after a conv as Q8 -> DQ -> Clip -> Q -> DQ (fuses)
    # a requantization between two unsigned grids as one QLinearAdd with 0 (export/requant.py), where exact
    requant_add: bool = False
    quantized_pooling: bool = False  # Q/DQ after global average pooling (QLinearGlobalAveragePool)
    signed_as_u8: bool = False  # signed activations as UINT8 with zero point 128 (ONNX Runtime's x86 form)
    # a float layer reading a dequantized tensor gets its own per-channel DequantizeLinear (the same values):
    # ONNX Runtime's WeightBiasQuantization otherwise quantizes the float weights of any Conv/Gemm whose
    # input comes from a per-tensor DequantizeLinear (INT8 per tensor, not what was trained)
    guard_float_inputs: bool = False
    # may the exported model rely on session.x64quantprecision (recorded in its metadata, set by every
    # session asga opens)? False: its grids must be exact on every x86 CPU with default session options
    x64_precision_option: bool = True
    note: str = ""  # why the bit-widths are what they are (appended to refusals)

    def act_bits(self, signed: bool) -> tuple[int, ...]:
        """Return the activation bit-widths allowed for a signed or unsigned input."""
        return self.act_bits_signed if signed else self.act_bits_unsigned

    def check(self, weight_bits: int, act_bits: int, act_signed: bool) -> str | None:
        """Return why (w, a, signed) cannot run on this target, or None when it can."""
        hint = f" ({self.note})" if self.note else ""
        if weight_bits not in self.weight_bits:
            return f"weight_bits={weight_bits} not in {list(self.weight_bits)}{hint}"
        if act_bits not in self.act_bits(act_signed):
            kind = "signed" if act_signed else "unsigned"
            return f"{kind} act_bits={act_bits} not in {list(self.act_bits(act_signed))}{hint}"
        return None

    def highest(self, act_signed: bool) -> tuple[int, int]:
        """Return the (weight, activation) bits of this target's most precise quantized layer."""
        return max(b for b in self.weight_bits if b <= 8), max(b for b in self.act_bits(act_signed) if b <= 8)

    def clamp_bits(self, weight_bits: int, act_bits: int, act_signed: bool) -> tuple[int, int]:
        """Return (w, a) lowered to the largest bits this target runs that do not exceed them."""
        def down(b: int, allowed: tuple[int, ...]) -> int:
            lower = [x for x in allowed if x <= b]
            return max(lower) if lower else min(allowed)

        return down(weight_bits, self.weight_bits), down(act_bits, self.act_bits(act_signed))

    def check_opset(self, opset: int) -> None:
        """Raise UnsupportedTargetError when this backend's parser does not take the opset."""
        if opset not in self.opsets:
            raise UnsupportedTargetError(f"opset {opset} for target {self.name}: use one of "
                                         f"{self.opsets[0]}..{self.opsets[-1]}")

    def session_config(self, saturating: bool) -> dict[str, str]:
        """Return the ONNX Runtime session entries a model of this target needs (saturating: some layer's
        u8 x s8 pairs can leave int16); raise UnsupportedTargetError where the target promises none."""
        if not saturating:
            return {}
        if not self.x64_precision_option:
            raise UnsupportedTargetError(f"target {self.name} must be exact with default ONNX Runtime session "
                                         f"options, but a layer's u8 x s8 products can saturate on x86 without "
                                         f"VNNI ({self.note or 'use narrower weights'})")
        return dict([X64_PRECISION_OPTION])


_ORT = dict(residual_quant="units", integer_kernel_report=True, integer_kernels_required=True, int32_bias=True,
            fused_requant=True, requant_add=True, quantized_pooling=True, signed_as_u8=True, int4_storage=False,
            guard_float_inputs=True)
_W7 = tuple(range(2, 8))
TARGETS: dict[str, Target] = {
    "sim": Target("sim", _ALL, _ALL, _ALL, "fake-quant simulation: any 2..8 bits, no speed promise",
                  integer_kernel_report=True, int32_bias=True, fused_requant=True, requant_add=True,
                  signed_as_u8=True, guard_float_inputs=True),
    # 8-bit weights overflow the U8S8 kernels of x86 CPUs without VNNI (wrong outputs with default session
    # options); 7-bit weights (|q| <= 63) cannot: 2 * 255 * 63 <= 32767. ORT's quantizer calls it reduce_range.
    "ort": Target("ort", _W7, _ALL, _ALL,
                  "ONNX Runtime CPU: INT8 weights on a <= 7-bit grid, UINT8 (unsigned) / INT8 (signed) activations; "
                  "exact with default session options on every x86 CPU", x64_precision_option=False,
                  note="8-bit weights saturate ORT's U8S8 kernels without VNNI: use 7, or target ort-w8", **_ORT),
    "ort-w8": Target("ort-w8", _ALL, _ALL, _ALL,
                     "ONNX Runtime CPU with true 8-bit weights: exact only with session.x64quantprecision=1 "
                     "(recorded in the model's metadata; U8U8 kernels, slower)", **_ORT),
    # TensorRT takes only signed INT8 Q/DQ: an unsigned b-bit activation fits INT8 for b <= 7
    "tensorrt": Target("tensorrt", _ALL, _ALL, tuple(range(2, 8)),
                       "TensorRT: signed INT8 Q/DQ only (unsigned activations up to 7 bits); float layers FP16",
                       residual_quant="add_inputs", signed_int8_only=True, opsets=(17, 18, 19, 20),
                       int4_storage=False, float_dtype="fp16", static_check=True, runs_engine=True,
                       note="TensorRT takes signed INT8 only: an unsigned activation has at most 7 bits"),
}


def get_target(name: str) -> Target:
    """Return a target by name, or raise UnsupportedTargetError listing the known ones."""
    if name not in TARGETS:
        raise UnsupportedTargetError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    return TARGETS[name]
