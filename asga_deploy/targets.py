"""Backend targets: what each backend runs exactly, and every rule that follows from it (architecture.md, "Targets").

Code elsewhere asks a `Target` (its fields and methods) instead of testing target names.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UnsupportedTargetError

BITS_RANGE = (2, 8)
DEFAULT_TARGET = "ort"  # what `asga policy uniform`, finetune and export assume when nothing is said
_ALL = tuple(range(BITS_RANGE[0], BITS_RANGE[1] + 1))


@dataclass(frozen=True)
class Target:
    """What a backend runs (bit-widths per operand) and how a model is lowered and checked for it."""

    name: str
    weight_bits: tuple[int, ...]
    act_bits_signed: tuple[int, ...]
    act_bits_unsigned: tuple[int, ...]
    description: str
    residual_quant: bool = False  # 8-bit Q/DQ around residual Adds and conv outputs (ORT's full node units)
    signed_int8_only: bool = False  # every activation Q/DQ is signed INT8 (unsigned b-bit lowered through it)
    opsets: tuple[int, ...] = tuple(range(13, 22))  # ONNX opsets the backend's parser takes
    default_opset: int = 17
    int4_storage: bool = True  # INT4 weight initializers (opset 21) allowed
    float_dtype: str = "fp32"  # what a float layer computes in on this backend
    integer_kernel_report: bool = False  # ONNX Runtime's optimized graph tells which layers run on integers
    static_check: bool = False  # the static TensorRT compatibility check gates the export
    runs_engine: bool = False  # `asga export --trt` builds an engine for it

    def act_bits(self, signed: bool) -> tuple[int, ...]:
        """Return the activation bit-widths allowed for a signed or unsigned input."""
        return self.act_bits_signed if signed else self.act_bits_unsigned

    def check(self, weight_bits: int, act_bits: int, act_signed: bool) -> str | None:
        """Return why (w, a, signed) cannot run on this target, or None when it can."""
        if weight_bits not in self.weight_bits:
            return f"weight_bits={weight_bits} not in {list(self.weight_bits)}"
        if act_bits not in self.act_bits(act_signed):
            kind = "signed" if act_signed else "unsigned"
            return f"{kind} act_bits={act_bits} not in {list(self.act_bits(act_signed))}"
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


TARGETS: dict[str, Target] = {
    "sim": Target("sim", _ALL, _ALL, _ALL, "fake-quant simulation: any 2..8 bits, no speed promise",
                  integer_kernel_report=True),
    "ort": Target("ort", _ALL, _ALL, _ALL,
                  "ONNX Runtime CPU: INT8 weights, UINT8 (unsigned) / INT8 (signed) activations; "
                  "sub-8-bit layers run exactly on INT8 kernels", residual_quant=True,
                  integer_kernel_report=True),
    # TensorRT takes only signed INT8 Q/DQ: an unsigned b-bit activation fits INT8 for b <= 7
    "tensorrt": Target("tensorrt", _ALL, _ALL, tuple(range(2, 8)),
                       "TensorRT: signed INT8 Q/DQ only (unsigned activations up to 7 bits); float layers FP16",
                       signed_int8_only=True, opsets=(17, 18, 19, 20), int4_storage=False, float_dtype="fp16",
                       static_check=True, runs_engine=True),
}


def get_target(name: str) -> Target:
    """Return a target by name, or raise UnsupportedTargetError listing the known ones."""
    if name not in TARGETS:
        raise UnsupportedTargetError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    return TARGETS[name]
