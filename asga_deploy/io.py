"""Atomic file writes, output checks, provenance, machine and version facts."""

from __future__ import annotations

import datetime as _dt
import glob
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import __version__
from .errors import OptionError, OutputError, OutputExistsError


def not_a_file(path: str | Path) -> str | None:
    """Return why path is not a readable regular file ("does not exist", "is a folder, not a file", ...), or None."""
    path = Path(path)
    if path.is_file():
        return None
    if not path.exists():
        return "does not exist"
    if path.is_dir():
        return "is a folder, not a file"
    return "is not a regular file (a device, pipe or socket)"


def check_output_dir(folder: str | Path) -> Path:
    """Return folder; raise OutputError when it, or the folder it would be created in, cannot be written.

    Checked before any work: a file where a folder belongs, a path under a file, no write permission
    or a read-only file system. Stale temporary files of killed writes in it are removed.
    """
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        if probe.is_symlink():
            raise OutputError(f"cannot write to {folder}: {probe} is a broken symbolic link; remove it or choose "
                              "another output path")
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"cannot write to {folder}: {probe} is a file, not a folder; choose another output path "
                          "(or move the file)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to {folder}: {probe} is not writable (permissions or a read-only file "
                          "system); choose another output folder or fix its permissions")
    if probe == folder:
        clean_stale_tmp(folder)
    return folder


def check_writable(path: str | Path, force: bool) -> Path:
    """Return the path; raise OutputExistsError if it exists and force is false, OutputError if it cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a folder where a file is expected; choose a file path or remove the folder")
    if path.exists() and not force:
        raise OutputExistsError(f"{path} exists; pass --force to overwrite it")
    check_output_dir(path.parent)
    return path


def check_name(name: str | None, option: str) -> str | None:
    """Return a run/file name given on the command line; raise OptionError when it is not a plain name.

    A name is one path component: no separator, not '.' or '..', not hidden, so outputs stay under --out.
    """
    if name is None:
        return None
    bad = (not name.strip() or "/" in name or "\\" in name or name in (".", "..") or name.startswith(".")
           or "\0" in name)
    if bad:
        raise OptionError(f"{option} {name!r}: give a plain name (letters, digits, '-', '_', '.'; no path "
                          "separator, no '..', not starting with '.'); choose the parent folder with --out")
    return name


_STALE_UNKNOWN_S = 60.0  # a temporary file without a writer's pid counts as stale after this many seconds
# what atomic_write_bytes names its temporary files: .<name>.<pid>.<8 random>.tmp (older: no pid)
_TMP = re.compile(r"^\.(?P<name>.+?)\.(?:(?P<pid>\d+)\.)?[a-z0-9_]{8}\.tmp$")


def _writer_alive(tmp: Path, pid: str | None) -> bool:
    """Whether the process that wrote a temporary file may still be writing it."""
    if pid is not None:
        if int(pid) == os.getpid():
            return True
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except OSError:  # another user's process (or a pid out of range): leave it
            return True
        return True
    try:
        return time.time() - tmp.stat().st_mtime < _STALE_UNKNOWN_S
    except OSError:
        return True


def clean_stale_tmp(folder: str | Path, name: str | None = None) -> list[Path]:
    """Remove the hidden temporary files of atomic writes killed before their rename (of `name`, or of any file)
    from folder; return what was removed."""
    folder = Path(folder)
    removed = []
    try:
        candidates = list(folder.glob(f".{glob.escape(name)}.*.tmp" if name else ".*.tmp"))
    except OSError:
        return removed
    for tmp in candidates:
        m = _TMP.match(tmp.name)
        if m is None or (name is not None and m["name"] != name) or tmp.is_symlink() or not tmp.is_file():
            continue
        if not _writer_alive(tmp, m["pid"]):
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write bytes to path through a temporary file and a rename; return the path.

    The temporary file (.<name>.<pid>.<random>.tmp) names its writer, so a later write can tell the
    leftovers of a killed process and remove them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give them the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write text atomically; return the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON (indented, sorted insertion order) atomically; return the path."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any):
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """torch.save to a temporary file, then rename; return the path."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def git_commit() -> str | None:
    """Return the short git commit of the source tree, or None outside a checkout."""
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None


def machine_info() -> dict:
    """Return CPU, core count and GPU name (None without CUDA)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "platform": platform.platform()}


def versions() -> dict:
    """Return the versions of python and the libraries that matter (None where absent)."""
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    # distribution metadata: importing torchvision or tensorrt just for a version costs seconds
    for name in ("torch", "torchvision", "onnx", "onnxruntime", "tensorrt", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["asga_deploy"] = __version__
    return out


def provenance(command: str | None = None, **extra: Any) -> dict:
    """Return the provenance record written into every artifact."""
    import torch

    rec = {
        "command": command if command is not None else " ".join(sys.argv),
        "asga_version": __version__,
        "git_commit": git_commit(),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "torch_version": str(torch.__version__),  # TorchVersion is not weights_only-loadable
    }
    rec.update(extra)
    return rec
