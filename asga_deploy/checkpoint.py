"""Checkpoints: the one home that saves, loads (weights_only), checks and turns them back into models.

Kinds: "float" (asga train), "finetuned" (asga finetune: the fake-quant model of its embedded policy),
"search" (asga search: the supernet and the search state). Train and finetune write their checkpoint
every epoch under its final name with `complete` False until the last epoch; every reader that is not
resuming refuses an incomplete one unless told otherwise. The RNG helpers make resumption exact.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import CheckpointError
from .io import atomic_torch_save, not_a_file, provenance
from .models import create_model
from .policy import Policy
from .quant import apply_policy

KINDS = ("float", "finetuned", "search")
_WRITTEN_BY = {"float": "the float.pt of `asga train`", "finetuned": "the finetuned.pt of `asga finetune`",
               "search": "the checkpoint.pt of `asga search`"}
_MODEL_KEYS = (("model_name", str), ("num_classes", int), ("in_chans", int))


def save_checkpoint(ckpt: dict, path: str | Path) -> Path:
    """Write a checkpoint dict atomically (temporary file + rename); return the path."""
    if ckpt.get("kind") not in KINDS:
        raise ValueError(f"checkpoint kind {ckpt.get('kind')!r} not in {KINDS}")
    return atomic_torch_save(ckpt, path)


def _first_line(e: Exception) -> str:
    """Return why torch.load failed, in one line that never suggests loading unsafely."""
    text = str(e).strip()
    if "weights_only" in text or "Weights only load failed" in text or "Unsupported global" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:
            return (f"it holds a Python object ({found.group(1)}) that asga checkpoints never contain, and such "
                    "objects are not loaded")
        why = re.search(r"Unpickler error:\s*(.+?)\s*(?:Check the documentation|$)", text, re.S)
        return f"not a checkpoint: {' '.join(why.group(1).split())[:120] if why else 'unpickling failed'}"
    if isinstance(e, RecursionError):
        return "it is nested too deeply to read"
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


_OPTIONAL = (("epoch", int), ("complete", bool), ("config", dict), ("metrics", dict), ("dataset", str),
             ("input_size", int), ("provenance", dict))


def _bad_entries(ckpt: dict) -> list[str]:
    """Return the checkpoint entries that readers use and that are missing, of the wrong type or out of range."""
    bad = [k for k, typ in _MODEL_KEYS if not isinstance(ckpt.get(k), typ) or isinstance(ckpt.get(k), bool)]
    bad += [k for k in ("num_classes", "in_chans") if k not in bad and ckpt[k] < 1]
    for k, typ in _OPTIONAL:
        v = ckpt.get(k)
        if v is not None and (not isinstance(v, typ) or (typ is int and (isinstance(v, bool) or v < 0))):
            bad.append(k)
    if ckpt.get("input_size") == 0:
        bad.append("input_size")
    if ckpt["kind"] == "finetuned" and not isinstance(ckpt.get("policy"), dict):
        bad.append("policy")
    return bad


def incomplete_note(ckpt: dict) -> str | None:
    """Return 'saved after epoch k of n' for a train/finetune checkpoint of an unfinished run, else None."""
    if ckpt.get("kind") == "search" or ckpt.get("complete") is not False:
        return None
    total = (ckpt.get("config") or {}).get("epochs", "?")
    return f"saved after epoch {ckpt.get('epoch', '?')} of {total}"


def load_checkpoint(path: str | Path, kind: str | tuple[str, ...] | None = None,
                    allow_incomplete: bool = False) -> dict:
    """Return a checkpoint dict loaded with weights_only=True, after checking its kind, contents and completeness.

    A train/finetune checkpoint saved before its last epoch is refused unless allow_incomplete
    (resuming passes it; so does a user who asks for it explicitly).
    """
    path = Path(path)
    problem = not_a_file(path)
    if problem:
        raise CheckpointError(f"checkpoint {path} {problem}" + ("" if not path.exists() else
                                                                "; give the path of its .pt file"))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, zip errors, globals outside the safe list
        raise CheckpointError(f"{path} is not a readable asga checkpoint ({_first_line(e)}); it must be a file "
                              "written by asga train, search or finetune") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "kind" not in ckpt:
        raise CheckpointError(f"{path} is not an asga checkpoint (no 'kind'/'model' entries)")
    kinds = kind if isinstance(kind, tuple) else ((kind,) if kind else KINDS)
    if ckpt["kind"] not in kinds:
        raise CheckpointError(f"{path} is a '{ckpt['kind']}' checkpoint, expected '{' or '.join(kinds)}': give "
                              + " or ".join(_WRITTEN_BY[k] for k in kinds))
    state = ckpt["model"]
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path}: its 'model' entry is not a state dict of tensors (damaged or not an "
                              "asga checkpoint)")
    bad = _bad_entries(ckpt)
    if bad:
        raise CheckpointError(f"{path} lacks valid {', '.join(bad)} entries (damaged or written by another tool); "
                              "use a checkpoint written by asga train, search or finetune")
    note = incomplete_note(ckpt)
    if note and not allow_incomplete:
        raise CheckpointError(f"{path} is incomplete: {note} (the run was interrupted); finish it with the same "
                              "command and --resume, or pass --allow-incomplete to use it as it is")
    return ckpt


def is_complete(ckpt: dict) -> bool:
    """Return whether a train/finetune checkpoint holds a finished run (search checkpoints: True)."""
    return ckpt.get("complete") is not False


def load_state(model: nn.Module, state: dict, source: str, name: str = "") -> nn.Module:
    """Load a state dict into model; raise CheckpointError naming the keys and shapes that do not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape:
        parts = []
        if shape:
            parts.append("shape mismatch at " + ", ".join(
                f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shape[:4]))
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}" + (" ..." if len(missing) > 4 else ""))
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:4])}" + (" ..." if len(unexpected) > 4 else ""))
        raise CheckpointError(f"{source} does not fit model {name or type(model).__name__}: " + "; ".join(parts)
                              + " (check --model, the number of classes and input channels)")
    model.load_state_dict(state)
    return model


def load_weights(model: nn.Module, path: str | Path, name: str = "") -> nn.Module:
    """Load a plain state-dict file or an asga checkpoint's weights into model; clear errors on mismatch."""
    path = Path(path)
    problem = not_a_file(path)
    if problem:
        raise CheckpointError(f"weights file {path} {problem}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable weights file ({_first_line(e)})") from None
    if isinstance(obj, dict) and "kind" in obj:
        obj = load_checkpoint(path, allow_incomplete=True)["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return load_state(model, obj, str(path), name)


def build_model(ckpt: dict, source: str = "<checkpoint>") -> tuple[nn.Module, list[dict]]:
    """Return (the model a float or finetuned checkpoint holds, with its weights; its deploy quantizer records)."""
    model = create_model(ckpt["model_name"], num_classes=int(ckpt["num_classes"]), in_chans=int(ckpt["in_chans"]))
    records: list[dict] = []
    if ckpt["kind"] == "finetuned":
        policy = Policy.from_dict(ckpt["policy"], f"{source} (embedded policy)")
        records = apply_policy(model, policy, validate=False)
    return load_state(model, ckpt["model"], source, ckpt["model_name"]), records


def load_model(path: str | Path, kind: str | tuple[str, ...] = ("float", "finetuned"),
               allow_incomplete: bool = False) -> tuple[nn.Module, dict]:
    """Return (model with its weights, checkpoint dict) of a float or finetuned checkpoint file."""
    ckpt = load_checkpoint(path, kind, allow_incomplete)
    model, _ = build_model(ckpt, str(path))
    return model, ckpt


def load_finetuned(path: str | Path, policy: Policy | None = None, allow_incomplete: bool = False
                   ) -> tuple[nn.Module, dict, Policy, list[dict]]:
    """Return (fake-quant model, checkpoint, its embedded policy, deploy quantizer records) of finetuned.pt.

    With `policy`, refuse a checkpoint of another model or fine-tuned with other bits, naming the layers.
    """
    ckpt = load_checkpoint(path, "finetuned", allow_incomplete)
    trained = Policy.from_dict(ckpt["policy"], f"{path} (embedded policy)")
    if policy is not None:
        if ckpt["model_name"] != policy.model:
            raise CheckpointError(f"{path} holds model {ckpt['model_name']}, the policy is for {policy.model}; "
                                  "give the finetuned.pt of this policy (asga finetune POLICY) or the policy it was "
                                  "fine-tuned with")
        diff = trained.diff(policy)
        if diff:
            raise CheckpointError(f"{path} was fine-tuned with another policy; differing layers: {', '.join(diff)}; "
                                  "fine-tune this policy first (asga finetune POLICY)")
    model, records = build_model(ckpt, str(path))
    return model.eval(), ckpt, trained, records


def check_resume_config(saved: dict, current: dict, path: Path, free: frozenset[str] | tuple = ()) -> None:
    """Raise CheckpointError naming the options (outside `free`) that differ between a checkpoint's run and this one."""
    diff = [f"{k}={saved.get(k)!r} (now {v!r})" for k, v in current.items() if k not in free and saved.get(k) != v]
    if diff:
        raise CheckpointError(f"{path} was written by a run with other options: {', '.join(diff)}; "
                              "rerun with the same options, or pass --force to start over")


def rng_state() -> dict:
    """Return the RNG states (torch, python, numpy, CUDA) as plain lists/tensors (weights_only-loadable)."""
    v, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": [v, list(state), gauss],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    """Restore the RNG states saved by rng_state (older search checkpoints carry no numpy state)."""
    torch.set_rng_state(s["torch"])
    v, state, gauss = s["python"]
    random.setstate((v, tuple(state), gauss))
    if s.get("numpy") is not None:
        name, keys, pos, has_gauss, cached = s["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def plain_provenance(command: str | None = None, **extra) -> dict:
    """Return io.provenance() with str subclasses (torch's TorchVersion) made plain for weights_only loads."""
    return {k: str(v) if isinstance(v, str) else v for k, v in provenance(command, **extra).items()}
