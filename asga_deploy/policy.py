"""Policy files: the only reader and writer of `policies/*.json` (format in policies/README.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .cost import FLOAT, CostTable, LayerCost, layer_costs
from .errors import PolicyError
from .io import atomic_write_json, check_writable, not_a_file, provenance
from .models import create_model, edge_layers, model_info, quantizable_layers
from .targets import BITS_RANGE, TARGETS, get_target

SCHEMA = "asga-policy/1"
SCHEMA_VERSION = 1
KEYS = ("schema", "model", "target", "layers", "float_layers", "cost", "deploy", "provenance")
LAYER_KEYS = ("weight_bits", "act_bits", "act_signed")


def _cost_problems(cost: dict) -> list[str]:
    """Return what is wrong with the fields of a policy's cost record that code reads (shape, classes)."""
    out = []
    shape = cost.get("input_shape")
    if shape is not None and not (isinstance(shape, list) and len(shape) == 3 and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape)):
        out.append(f"cost.input_shape {shape!r} must be [channels, height, width] of positive integers")
    classes = cost.get("num_classes")
    if classes is not None and not (isinstance(classes, int) and not isinstance(classes, bool) and classes >= 1):
        out.append(f"cost.num_classes {classes!r} must be a positive integer")
    return out


@dataclass(frozen=True)
class LayerBits:
    """Bit-widths of one quantized layer: weights, input activation, and the activation's sign."""

    weight_bits: int
    act_bits: int
    act_signed: bool

    def to_dict(self) -> dict:
        """Return the JSON form."""
        return {"weight_bits": self.weight_bits, "act_bits": self.act_bits, "act_signed": self.act_signed}


@dataclass
class Policy:
    """A per-layer bit-width assignment for one model and one backend target."""

    model: str
    target: str
    layers: dict[str, LayerBits]
    float_layers: list[str] = field(default_factory=list)
    cost: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    deploy: dict = field(default_factory=dict)  # target section: extra quantizers of the deployed graph
    schema: str = SCHEMA

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        """Return the JSON form (layers in the stored order)."""
        d = {"schema": self.schema, "model": self.model, "target": self.target,
             "layers": {k: v.to_dict() for k, v in self.layers.items()},
             "float_layers": list(self.float_layers), "cost": self.cost}
        if self.deploy:
            d["deploy"] = self.deploy
        d["provenance"] = self.provenance
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "<policy>") -> Policy:
        """Parse the JSON form; raise PolicyError listing every format problem."""
        if not isinstance(d, dict):
            raise PolicyError(f"{source}: a policy is a JSON object, got {type(d).__name__}")
        schema = d.get("schema")
        if not isinstance(schema, str) or not schema.startswith("asga-policy/"):
            raise PolicyError(f"{source}: missing or unknown 'schema' (expected {SCHEMA!r})")
        try:
            version = int(schema.split("/", 1)[1])
        except ValueError:
            raise PolicyError(f"{source}: unreadable schema {schema!r} (expected {SCHEMA!r})") from None
        if version > SCHEMA_VERSION:
            raise PolicyError(f"{source}: schema {schema!r} is newer than this asga-deploy reads ({SCHEMA!r}); "
                              "upgrade asga-deploy")
        problems = []
        unknown = [k for k in d if k not in KEYS]
        if unknown:  # a misspelt key would otherwise be ignored without a word
            problems.append(f"unknown key(s) {', '.join(map(repr, unknown))} (a policy has {', '.join(KEYS)})")
        for key, typ in (("model", str), ("target", str), ("layers", dict)):
            if not isinstance(d.get(key), typ):
                problems.append(f"'{key}' missing or not a {typ.__name__}")
        for key in ("cost", "provenance", "deploy"):
            if key in d and not isinstance(d[key], dict):
                problems.append(f"'{key}' must be an object")
        if problems:
            raise PolicyError(f"{source}: " + "; ".join(problems))
        problems += _cost_problems(d.get("cost") or {})
        if d["target"] not in TARGETS:
            problems.append(f"target {d['target']!r} unknown (choose {', '.join(TARGETS)})")
        layers = {}
        for name, spec in d["layers"].items():
            if not isinstance(spec, dict):
                problems.append(f"layer {name}: not an object")
                continue
            extra = [k for k in spec if k not in LAYER_KEYS]
            if extra:
                problems.append(f"layer {name}: unknown key(s) {', '.join(map(repr, extra))} (a layer has "
                                f"{', '.join(LAYER_KEYS)})")
            w, a, s = spec.get("weight_bits"), spec.get("act_bits"), spec.get("act_signed")
            bad = [k for k, v in (("weight_bits", w), ("act_bits", a)) if not isinstance(v, int) or isinstance(v, bool)]
            if not isinstance(s, bool):
                bad.append("act_signed")
            if bad:
                problems.append(f"layer {name}: {', '.join(bad)} missing or of the wrong type")
                continue
            layers[name] = LayerBits(w, a, s)
        floats = d.get("float_layers", [])
        if not isinstance(floats, list) or not all(isinstance(x, str) for x in floats):
            problems.append("'float_layers' must be a list of layer names")
            floats = []
        if problems:
            raise PolicyError(f"{source}: " + "; ".join(problems))
        return cls(d["model"], d["target"], layers, list(floats), dict(d.get("cost", {})),
                   dict(d.get("provenance", {})), dict(d.get("deploy", {})), schema)

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        """Read a policy file; raise PolicyError if it is missing, not JSON or malformed."""
        path = Path(path)
        problem = not_a_file(path)
        if problem:
            raise PolicyError(f"policy file {path} {problem}" + ("" if not path.exists() else
                                                                 "; give the path of a policies/*.json file"))
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PolicyError(f"{path} is not valid JSON: {e}") from None
        except RecursionError:
            raise PolicyError(f"{path} is not a policy: its JSON is nested too deeply to read (a policy is "
                              "three levels deep); write it with `asga search` or `asga policy uniform`") from None
        except OSError as e:
            raise PolicyError(f"policy file {path} cannot be read: {e.strerror or e}") from None
        return cls.from_dict(d, str(path))

    def save(self, path: str | Path, force: bool = False) -> Path:
        """Write atomically; refuse to overwrite unless force. Return the path."""
        return atomic_write_json(check_writable(path, force), self.to_dict())

    # ------------------------------------------------------------------ views
    def bits(self, counted_only: bool = True) -> dict[str, tuple[int, int]]:
        """Return {layer: (w, a)}; counted_only drops the layers excluded from the BitOPs ratio."""
        excluded = set(self.cost.get("excluded", [])) if counted_only else set()
        return {n: (b.weight_bits, b.act_bits) for n, b in self.layers.items() if n not in excluded}

    def diff(self, other: Policy) -> list[str]:
        """Return the layers whose bits (or float/quantized status) differ between two policies."""
        names = list(dict.fromkeys([*self.layers, *self.float_layers, *other.layers, *other.float_layers]))
        out = []
        for n in names:
            a, b = self.layers.get(n), other.layers.get(n)
            if a != b:
                fa = f"W{a.weight_bits}A{a.act_bits}" if a else ("float" if n in self.float_layers else "absent")
                fb = f"W{b.weight_bits}A{b.act_bits}" if b else ("float" if n in other.float_layers else "absent")
                out.append(f"{n} ({fa} vs {fb})")
        return out


def costs_at(model: nn.Module, input_shape, name: str, what: str = "the") -> dict[str, LayerCost]:
    """Return layer_costs(model, input_shape); raise PolicyError when the model cannot run on that shape."""
    try:
        return layer_costs(model, tuple(input_shape))
    except (RuntimeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise PolicyError(f"model {name} cannot run on {what} inputs of shape {list(input_shape)} ({first}); "
                          "use a larger input size or the channel count the model was made for") from None


def compare(a: str | Path, b: str | Path) -> list[str]:
    """Return the layers whose bits differ between two policy files; refuse policies of different models."""
    pa, pb = Policy.load(a), Policy.load(b)
    if pa.model != pb.model:
        raise PolicyError(f"{a} is for model {pa.model} and {b} for model {pb.model}: layer names of different "
                          "models cannot be compared; diff two policies of the same model")
    return pa.diff(pb)


def compute_cost(policy: Policy, costs: dict[str, LayerCost], input_shape, num_classes: int,
                 excluded: list[str]) -> dict:
    """Return the policy's cost record: BitOPs and its ratio to W8A8 over the counted layers (a float layer
    counts as 32 x 32 bits, as in EdMIPS), their weight bytes, and the whole model's weight bytes."""
    bits = {n: (b.weight_bits, b.act_bits) for n, b in policy.layers.items()} | dict.fromkeys(policy.float_layers, FLOAT)
    table = CostTable(costs, tuple(n for n in bits if n not in excluded and n in costs))
    total_bytes = sum(costs[n].weight_bytes(w) for n, (w, _) in bits.items() if n in costs)
    return {"input_shape": list(input_shape), "num_classes": num_classes, "excluded": list(excluded),
            "bitops": table.total("bitops", bits), "bitops_vs_w8a8": table.ratio("bitops", bits),
            "weight_bytes": table.total("size", bits) / 8, "weight_bytes_total": total_bytes}


def policy_from_choice(model_name: str, target: str, costs: dict[str, LayerCost], choice: dict[str, tuple[int, int]],
                       input_shape, num_classes: int, edge_bits: str = "8", provenance: dict | None = None) -> Policy:
    """Return the Policy of a {layer: (w, a)} choice; every other layer (the edges) at the target's highest
    bits ('8') or float ('float'); its cost counts the chosen layers only."""
    tgt = get_target(target)
    layers, floats = {}, []
    for n, c in costs.items():
        if n in choice and tuple(choice[n]) == FLOAT:
            floats.append(n)
        elif n in choice:
            layers[n] = LayerBits(*choice[n], c.input_signed)
        elif edge_bits == "float":
            floats.append(n)
        else:  # the highest bits <= 8 the target runs (TensorRT: unsigned A7)
            layers[n] = LayerBits(*tgt.highest(c.input_signed), c.input_signed)
    pol = Policy(model_name, target, layers, floats, provenance=dict(provenance or {}))
    excluded = [n for n in costs if n not in choice]
    pol.cost = compute_cost(pol, costs, input_shape, num_classes, excluded)
    return pol


def check_policy_shape(policy: Policy, input_shape, source: str = "<policy>") -> None:
    """Raise PolicyError when a policy was made for inputs with another channel count than the model takes."""
    shape = policy.cost.get("input_shape")
    if shape and int(shape[0]) != int(input_shape[0]):
        raise PolicyError(f"{source} was made for {shape[0]}-channel inputs {list(shape)}, the model takes "
                          f"{input_shape[0]} channels {list(input_shape)}; make the policy for this model "
                          f"(asga policy uniform --in-chans {input_shape[0]}, or search on this data)")


def validate_policy(policy: Policy, model: nn.Module, source: str = "<policy>",
                    costs: dict[str, LayerCost] | None = None) -> None:
    """Check a policy against a model and its target; raise PolicyError naming EVERY problem at once."""
    problems = []
    names = quantizable_layers(model)
    known = set(names)
    if costs is None:
        shape = policy.cost.get("input_shape")
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if shape and first is not None:
            check_policy_shape(policy, (first.in_channels, *shape[1:]), source)
        costs = costs_at(model, shape, policy.model, f"{source}'s") if shape else None
    target = TARGETS.get(policy.target)
    for n in policy.layers:
        if n not in known:
            problems.append(f"layer {n} is not a Conv2d/Linear of model {policy.model}")
    for n in policy.float_layers:
        if n not in known:
            problems.append(f"float layer {n} is not a Conv2d/Linear of model {policy.model}")
        if n in policy.layers:
            problems.append(f"layer {n} is in both 'layers' and 'float_layers'")
    missing = [n for n in names if n not in policy.layers and n not in policy.float_layers]
    if missing:
        problems.append(f"layers missing from the policy: {', '.join(missing)}")
    lo, hi = BITS_RANGE
    for n, b in policy.layers.items():
        bad = [f"{k}={v}" for k, v in (("weight_bits", b.weight_bits), ("act_bits", b.act_bits)) if not lo <= v <= hi]
        if bad:
            problems.append(f"layer {n}: {', '.join(bad)} outside {lo}..{hi}")
            continue
        if target is not None and (why := target.check(b.weight_bits, b.act_bits, b.act_signed)):
            problems.append(f"layer {n}: target {policy.target} cannot run {why}")
        if costs is not None and n in costs and not b.act_signed and costs[n].input_signed:
            problems.append(f"layer {n}: act_signed=false but its input takes negative values")
    if problems:
        raise PolicyError(f"{source} does not fit model {policy.model}: " + "; ".join(problems))


def model_cost_table(model_name: str, num_classes: int = 10, in_chans: int | None = None,
                     input_size: int | None = None) -> CostTable:
    """Return the CostTable of a registered model at an input shape, counting every layer but its edges."""
    info = model_info(model_name)
    in_chans = in_chans or (1 if info.input_size <= 28 else 3)
    size = input_size or info.input_size
    model = create_model(model_name, num_classes=num_classes, in_chans=in_chans)
    costs = costs_at(model, (in_chans, size, size), model_name)
    edges = set(edge_layers(model))
    return CostTable(costs, tuple(n for n in costs if n not in edges))


def uniform_policy(model_name: str, weight_bits: int, act_bits: int, target: str = "ort",
                   num_classes: int = 10, in_chans: int | None = None, input_size: int | None = None,
                   edges: str = "w8a8") -> Policy:
    """Return the uniform W{w}A{a} policy of a registered model; edges ('w8a8' or 'float') for first/last."""
    info = model_info(model_name)
    tgt = get_target(target)
    if edges not in ("w8a8", "float"):
        raise PolicyError(f"--edges {edges!r} unknown: the first conv and classifier are 'w8a8' or 'float'")
    for k, v in (("--num-classes", num_classes), ("--in-chans", in_chans), ("--input-size", input_size)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise PolicyError(f"{k} {v!r} must be a positive integer")
    if in_chans is None:
        in_chans = 1 if info.input_size <= 28 else 3
    size = input_size or info.input_size
    model = create_model(model_name, num_classes=num_classes, in_chans=in_chans)
    costs = costs_at(model, (in_chans, size, size), model_name)
    excl = edge_layers(model)
    layers, floats = {}, []
    for n, c in costs.items():
        if n in excl:
            if edges == "float":
                floats.append(n)
                continue
            layers[n] = LayerBits(*tgt.highest(c.input_signed), c.input_signed)
        else:  # e.g. TensorRT's INT8 after a ReLU is an unsigned 7-bit grid: A8 becomes A7 there
            layers[n] = LayerBits(*tgt.clamp_bits(weight_bits, act_bits, c.input_signed), c.input_signed)
    pol = Policy(model_name, target, layers, floats)
    pol.cost = compute_cost(pol, costs, (in_chans, size, size), num_classes, excl)
    pol.provenance = provenance(command=f"uniform_policy({model_name!r}, {weight_bits}, {act_bits}, {target!r})",
                                method="uniform")
    return pol
