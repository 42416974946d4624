"""One naming rule for every artifact: policy files, search run folders, fine-tune and export bundles.

    <model>-<method>[-<budget tag>][-<target>][-s<seed>]

method: the search objective (asga, erm, ...), "sensitivity", or "w<W>a<A>" for a uniform policy;
budget tag: `Budget.tag()` (r12.5 = 12.5% of W8A8 BitOPs, 0.05mb, ...); target: omitted for the
default target (ort); seed: only where several seeds of one setting live side by side. A policy file's
stem is its identity: `asga finetune` and `asga export` put their outputs in export/<stem>/.
"""

from __future__ import annotations

import re
from pathlib import Path

from .targets import DEFAULT_TARGET

EXPORT_ROOT = Path("export")
SEARCH_ROOT = Path("runs/search")


def safe_name(text: str) -> str:
    """Return text with characters that do not belong in a file or folder name replaced by '-'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "run"


def artifact_stem(model: str, method: str, budget_tag: str | None = None, target: str | None = None,
                  seed: int | None = None) -> str:
    """Return <model>-<method>[-<budget tag>][-<target>][-s<seed>] (the target only when not the default)."""
    parts = [model, method, budget_tag or "", "" if target in (None, DEFAULT_TARGET) else target,
             "" if seed is None else f"s{seed}"]
    return safe_name("-".join(p for p in parts if p))


def uniform_stem(model: str, weight_bits: int, act_bits: int, target: str | None = None) -> str:
    """Return the stem of the uniform W<w>A<a> policy of a model (e.g. resnet20-w2a3)."""
    return artifact_stem(model, f"w{weight_bits}a{act_bits}", target=target)


def free_stem(folder: str | Path, stem: str, suffix: str = ".json", force: bool = False) -> str:
    """Return stem, or stem-2, stem-3 ... the first that is not taken in folder (policies are reviewed: keep them)."""
    folder = Path(folder)
    out, k = stem, 2
    while not force and (folder / f"{out}{suffix}").exists():
        out, k = f"{stem}-{k}", k + 1
    return out


def search_run_dir(stem: str, seed: int, root: str | Path = SEARCH_ROOT) -> Path:
    """Return the checkpoint folder of a search: runs/search/<stem>-s<seed>."""
    return Path(root) / f"{stem}-s{seed}"


def export_dir(policy: str | Path, root: str | Path = EXPORT_ROOT) -> Path:
    """Return the bundle folder of a policy file: export/<policy stem> (finetuned.pt, model.qdq.onnx, reports)."""
    return Path(root) / Path(policy).stem


SENSITIVITY_ROOT = Path("runs/sensitivity")


def sensitivity_dir(model: str, dataset: str, reference: tuple[int, int], root: str | Path = SENSITIVITY_ROOT) -> Path:
    """Return the folder of a sensitivity table: runs/sensitivity/<model>-<dataset>-w<W>a<A>."""
    return Path(root) / safe_name(f"{model}-{dataset}-w{reference[0]}a{reference[1]}")
