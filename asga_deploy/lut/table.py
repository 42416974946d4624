"""The latency table file ("asga-lut/1"): its cache key, where it lives, reading it, and the latency a policy is
predicted to have from it.

predicted latency (ms) = rest_ms + sum over layers of layers[layer][choice] + sum over float pairs of edge ms

`layers[layer][choice]` (the `lut` of cost.CostTable) is what the layer costs inside the whole model (its unit's time less the session's fixed
cost; a float layer as an island between quantized neighbours, with the layout changes around it), `choice`
a `cost.choice_key` ("w<W>a<A>" or "float"); `edges` are the (negative) corrections where two float layers
follow each other directly (no Q/DQ between them); `rest_ms` is the rest of the graph (input quantization,
residual Adds, pooling, the session's own cost), measured as the whole model at the reference policy less
the sum of its layers' entries.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..cost import choice_key
from ..errors import AsgaError, PolicyError
from ..io import not_a_file
from ..policy import Policy
from . import model

SCHEMA = "asga-lut/1"
DEFAULT_DIR = Path("runs") / "lut"
KEY_FIELDS = ("backend", "backend_version", "isa", "threads", "batch", "input_shape", "model", "num_classes",
              "target", "format")
FORMAT = 3  # how units are lowered, cut and combined; a change invalidates cached tables (2: the float-anchored
# islands; 3: requantizations between two unsigned grids as QLinearAdd)


class LutError(AsgaError):
    """A latency table that is missing, unreadable, or made for another model, machine or setting."""


def cache_key(**fields) -> dict:
    """Return the cache key of a table (every KEY_FIELDS entry, in order)."""
    missing = [k for k in KEY_FIELDS if k not in fields]
    if missing:
        raise ValueError(f"cache key lacks {missing}")
    return {k: fields[k] for k in KEY_FIELDS}


def default_path(key: Mapping, root: str | Path = DEFAULT_DIR) -> Path:
    """Return runs/lut/<model>-<target>-b<B>-<CxHxW>-t<T>-<isa>-<backend><version>-<hash>.json for a key."""
    digest = hashlib.sha256(json.dumps(dict(key), sort_keys=True).encode()).hexdigest()[:8]
    isa = re.sub(r"[^a-z0-9]+", "", str(key["isa"]).lower().replace("no ", "no"))
    shape = "x".join(str(s) for s in key["input_shape"])
    backend = "ort" if key["backend"] == "onnxruntime" else str(key["backend"])
    name = (f"{key['model']}-{key['target']}-b{key['batch']}-{shape}-t{key['threads']}-{isa}-"
            f"{backend}{key['backend_version']}-{digest}.json")
    return Path(root) / name


@dataclass(frozen=True)
class LatencyTable:
    """A measured latency table: per-layer ms per choice, float-pair corrections, the rest of the graph."""

    key: dict
    lut: dict[str, dict[str, float]]
    rest_ms: float
    edges: list[dict] = field(default_factory=list)  # {"from", "to", "ms"}: both float
    reference_ms: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)  # the whole file
    path: str | None = None

    @property
    def layers(self) -> list[str]:
        """Return the layer names, in module order."""
        return list(self.lut)

    def cost_inputs(self) -> tuple[dict[str, dict[str, float]], float]:
        """Return (lut, rest_ms): what cost.CostTable takes for latency (without the float-pair corrections)."""
        return {n: dict(v) for n, v in self.lut.items()}, float(self.rest_ms)


def from_dict(d: dict, source: str = "<latency table>") -> LatencyTable:
    """Return the table of a parsed file; raise LutError naming what is wrong."""
    if not isinstance(d, dict) or d.get("schema") != SCHEMA:
        raise LutError(f"{source} is not a latency table (schema {SCHEMA!r}); make one with `asga lut`")
    try:
        lut = {str(n): {str(k): float(v) for k, v in row.items()} for n, row in d["layers"].items()}
        edges = [{"from": str(e["from"]), "to": str(e["to"]), "ms": float(e["ms"])} for e in d.get("edges", [])]
        if d.get("kernels"):  # format-2 tables written before the requantized-island entry: the same formula
            d["kernels"] = model.complete_kernels(d["kernels"], d.get("transition_share"))
        return LatencyTable(dict(d["key"]), lut, float(d["rest_ms"]), edges, dict(d.get("reference_ms", {})), d,
                            source)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise LutError(f"{source}: malformed latency table ({type(e).__name__}: {e}); rebuild it with "
                       "`asga lut ... --force`") from None


def load_lut(path: str | Path, expect: Mapping | None = None) -> LatencyTable:
    """Read a latency table; with `expect`, refuse one whose key differs in any given field (named)."""
    path = Path(path)
    problem = not_a_file(path)
    if problem:
        raise LutError(f"latency table {path} {problem}; make it with `asga lut MODEL --batch-size B`")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LutError(f"{path} cannot be read as a latency table ({e}); rebuild it with `asga lut ... --force`") \
            from None
    table = from_dict(d, str(path))
    if expect:
        diff = [f"{k} {table.key.get(k)!r} (expected {v!r})" for k, v in expect.items() if table.key.get(k) != v]
        if diff:
            raise LutError(f"{path} was measured for other settings: {'; '.join(diff)}; measure this one with "
                           "`asga lut` (or pass --force)")
    return table


def policy_choices(policy: Policy) -> dict[str, str]:
    """Return {layer: choice key} of a policy (float layers "float")."""
    out = {n: choice_key(b.weight_bits, b.act_bits) for n, b in policy.layers.items()}
    out.update({n: "float" for n in policy.float_layers})
    return out


def predict_latency(table: LatencyTable, policy: Policy) -> float:
    """Return the predicted whole-model latency (ms) of a policy: rest + each layer's entry + float-pair edges (a float
    layer whose successors all requantize takes its entry measured there, where the table has it)."""
    choices = policy_choices(policy)
    missing = [n for n in table.lut if n not in choices]
    unknown = [n for n in choices if n not in table.lut]
    if missing or unknown:
        raise PolicyError(f"policy for {policy.model} does not match the latency table of {table.key.get('model')} "
                          f"({table.path}): " + "; ".join(
                              ([f"layers not in the policy: {', '.join(missing)}"] if missing else [])
                              + ([f"layers not in the table: {', '.join(unknown)}"] if unknown else [])))
    bad = [f"{n} ({c})" for n, c in choices.items() if c not in table.lut[n]]
    if bad:
        raise PolicyError(f"the latency table {table.path} has no entry for {', '.join(bad)} (target "
                          f"{table.key.get('target')}); use a policy of that target")
    kernels, act_max = table.data.get("kernels"), table.data.get("act_max") or {}
    if kernels and all(n in kernels for n in choices):  # the full model: float entries depend on what follows them
        return model.predict(kernels, table.rest_ms, table.edges,
                             {n: model.kernel_of(c, act_max.get(n, 8)) for n, c in choices.items()},
                             table.data.get("successors"))
    total = table.rest_ms + sum(table.lut[n][c] for n, c in choices.items())
    return total + sum(e["ms"] for e in table.edges if choices[e["from"]] == "float" and choices[e["to"]] == "float")
