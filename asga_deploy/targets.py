"""Backend targets: which bit-widths each backend represents exactly (architecture.md, "Targets")."""

from __future__ import annotations

from dataclasses import dataclass

BITS_RANGE = (2, 8)


@dataclass(frozen=True)
class Target:
    """What a backend runs: allowed weight bits, activation bits (signed / unsigned), and notes."""

    name: str
    weight_bits: tuple[int, ...]
    act_bits_signed: tuple[int, ...]
    act_bits_unsigned: tuple[int, ...]
    description: str
    residual_quant: bool = False  # 8-bit Q/DQ around residual Adds (ORT's QLinearAdd units)

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


_ALL = tuple(range(BITS_RANGE[0], BITS_RANGE[1] + 1))

TARGETS: dict[str, Target] = {
    "sim": Target("sim", _ALL, _ALL, _ALL, "fake-quant simulation: any 2..8 bits, no speed promise"),
    "ort": Target("ort", _ALL, _ALL, _ALL,
                  "ONNX Runtime CPU: INT8 weights, UINT8 (unsigned) / INT8 (signed) activations; "
                  "sub-8-bit layers run exactly through a Clip but not faster", residual_quant=True),
    # TensorRT takes only signed INT8 Q/DQ: an unsigned b-bit activation fits INT8 for b <= 7
    "tensorrt": Target("tensorrt", _ALL, _ALL, tuple(range(2, 8)),
                       "TensorRT: signed INT8 Q/DQ only (unsigned activations up to 7 bits); "
                       "float layers FP16"),
}


def get_target(name: str) -> Target:
    """Return a target by name, or raise UnsupportedTargetError listing the known ones."""
    from .errors import UnsupportedTargetError

    if name not in TARGETS:
        raise UnsupportedTargetError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    return TARGETS[name]
