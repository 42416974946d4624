"""ONNX Runtime: sessions (with the session entries a model records), the CPU's ISA, accuracy of an ONNX file."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import data
from ..errors import ExportError, require

SESSION_CONFIG_KEY = "asga.ort_session_config"  # metadata: the ONNX Runtime session entries the model needs


@dataclass(frozen=True)
class ParityConfig:
    """How many real images to compare on and the tolerances (agreement fraction, accuracy points)."""

    images: int = 1000
    batch_size: int = 100
    min_agreement: float = 0.995
    max_accuracy_diff: float = 0.1  # percentage points
    threads: int = 0  # 0: ORT's default
    max_output_steps: float = 1.0  # ORT vs the integer reference: largest logit difference in logit steps


def _cpuid_features() -> dict[str, bool] | None:
    """The x86 features the CPU reports through CPUID, as numpy's runtime dispatch read them (None where numpy
    does not expose them). CPUID is what ONNX Runtime's MLAS reads too; /proc/cpuinfo can describe another CPU
    (under an emulator it shows the host's)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as feats
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as feats
        except ImportError:
            return None
    return dict(feats) if "AVX512VNNI" in feats else None


def _cpuinfo_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# x86-64 System V: void cpuid(uint32 leaf, uint32 subleaf, uint32 out[4]) -> out = eax, ebx, ecx, edx
_CPUID_CODE = bytes([
    0x53,                    # push rbx (callee-saved, cpuid writes it)
    0x49, 0x89, 0xD0,        # mov r8, rdx (out; cpuid writes edx)
    0x89, 0xF8,              # mov eax, edi (leaf)
    0x89, 0xF1,              # mov ecx, esi (subleaf)
    0x0F, 0xA2,              # cpuid
    0x41, 0x89, 0x00,        # mov [r8], eax
    0x41, 0x89, 0x58, 0x04,  # mov [r8+4], ebx
    0x41, 0x89, 0x48, 0x08,  # mov [r8+8], ecx
    0x41, 0x89, 0x50, 0x0C,  # mov [r8+12], edx
    0x5B,                    # pop rbx
    0xC3,                    # ret
])


def _cpuid(leaf: int, subleaf: int = 0) -> tuple[int, int, int, int] | None:
    """Execute CPUID (x86-64 Linux; None where the code page cannot be mapped executable or on other machines)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or os.name != "posix":
        return None
    try:
        import ctypes
        import mmap

        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, ValueError, AttributeError):
        return None
    try:
        page.write(_CPUID_CODE)
        out = (ctypes.c_uint32 * 4)()
        buf = ctypes.c_char.from_buffer(page)
        fn = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32 * 4))(
            ctypes.addressof(buf))
        max_leaf = (ctypes.c_uint32 * 4)()
        fn(0, 0, ctypes.byref(max_leaf))
        if leaf > max_leaf[0]:
            result = (0, 0, 0, 0)
        else:
            fn(leaf, subleaf, ctypes.byref(out))
            result = tuple(out)
        del buf, fn
        return result
    finally:
        try:
            page.close()
        except BufferError:  # a ctypes view still alive: the page stays mapped, harmless
            pass


def cpu_isa() -> dict:
    """Return the x86 features that decide ONNX Runtime's integer kernels: VNNI (exact U8S8) or not (pairs saturate).

    Read from CPUID (numpy's runtime detection) where available, else from /proc/cpuinfo; AVX-VNNI (the 256-bit
    form) is not in numpy's table: CPUID leaf 7.1 is read directly (/proc/cpuinfo where that fails)."""
    flags = _cpuinfo_flags()
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    feats = _cpuid_features() if x86 else None
    if feats is not None:
        source = "cpuid"
        avx2, avx512f = feats["AVX2"], feats["AVX512F"]
        # MLAS uses AVX512-VNNI only with AVX512 BW/DQ/VL, and AVX-VNNI with AVX2
        avx512_vnni = all(feats[k] for k in ("AVX512VNNI", "AVX512BW", "AVX512DQ", "AVX512VL"))
    else:
        source = "/proc/cpuinfo"
        avx2, avx512f = "avx2" in flags, "avx512f" in flags
        avx512_vnni = "avx512_vnni" in flags and {"avx512bw", "avx512dq", "avx512vl"} <= flags
    regs = _cpuid(7, 1) if feats is not None else None  # leaf 7.1 EAX bit 4: AVX-VNNI (not in numpy's table)
    avx_vnni = avx2 and (bool(regs[0] >> 4 & 1) if regs is not None else "avx_vnni" in flags)
    vnni = avx512_vnni or avx_vnni
    kind = "VNNI" if vnni else ("AVX2, no VNNI" if avx2 else ("x86, no AVX2" if x86 else platform.machine()))
    return {"kind": kind, "x86": x86, "avx2": avx2, "avx512f": avx512f, "avx512_vnni": avx512_vnni,
            "avx_vnni": avx_vnni, "vnni": vnni, "u8s8_pairs_saturate": x86 and not vnni, "source": source}


def recorded_session_config(sess) -> dict[str, str]:
    """Return the session entries a model's metadata asks for (empty for other models)."""
    meta = sess.get_modelmeta().custom_metadata_map
    return json.loads(meta[SESSION_CONFIG_KEY]) if SESSION_CONFIG_KEY in meta else {}


def file_session_config(path: str | Path) -> dict[str, str]:
    """Return the session entries an ONNX file's metadata asks for, without opening a session (empty for models
    that are not asga exports)."""
    onnx = require("onnx", "onnx")
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return json.loads(meta[SESSION_CONFIG_KEY]) if SESSION_CONFIG_KEY in meta else {}


def session(model: str | Path | bytes, threads: int = 0, optimized_path: str | Path | None = None,
            level: str = "all", config: dict[str, str] | None = None):
    """Return a CPU InferenceSession (intra-op threads, optimization level, optional optimized-graph dump).

    config: session entries; None takes those the model's metadata records (asga.ort_session_config, e.g.
    session.x64quantprecision for 8-bit weights), so that every session asga opens computes what was exported.
    """
    ort = require("onnxruntime", "onnx")
    sess = _session(ort, model, threads, optimized_path, level, config or {})
    if config is None and (needed := recorded_session_config(sess)):
        sess = _session(ort, model, threads, optimized_path, level, needed)
    return sess


def _session(ort, model, threads: int, optimized_path, level: str, config: dict[str, str]):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    for k, v in config.items():
        so.add_session_config_entry(k, v)
    src = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"ONNX Runtime cannot load the model: {str(e).splitlines()[0][:300]}") from None


def test_loader(dataset: str, in_chans: int, input_size: int, images: int | None = None,
                data_dir: str | Path | None = None, batch_size: int = 100, workers: int = 0):
    """Return a loader over the first `images` test images of a dataset (all when None)."""
    from torch.utils.data import Subset

    test = data.get_dataset(dataset, "test", data_dir, in_chans=in_chans, input_size=input_size)
    if images is not None:
        test = Subset(test, range(min(images, len(test))))
    return data.make_loader(test, batch_size, shuffle=False, seed=0, workers=workers)


def evaluate_onnx(path: str | Path, loader: Iterable | None = None, threads: int = 0, *,
                  dataset: str | None = None, data_dir: str | Path | None = None, limit: int | None = None,
                  batch_size: int = 256, workers: int = 0) -> dict:
    """Return {"top1" (fraction), "count"} of an ONNX classifier on a loader, or on a dataset's test split."""
    sess = session(path, threads)
    inp = sess.get_inputs()[0]
    if loader is None:
        if dataset is None:
            raise ExportError("evaluate_onnx needs a loader or a dataset name")
        shape = inp.shape
        if not (isinstance(shape[1], int) and isinstance(shape[2], int)):
            raise ExportError(f"{path}: the input shape {shape} has no fixed channels/size")
        loader = test_loader(dataset, shape[1], shape[2], limit, data_dir, batch_size, workers)
    correct = count = 0
    for b in loader:
        x, y = b[0], b[1]
        out = sess.run(None, {inp.name: x.float().cpu().numpy()})[0]
        correct += int((out.argmax(1) == torch.as_tensor(y).numpy()).sum())
        count += len(x)
    return {"top1": correct / count if count else 0.0, "count": count}


def default_threads() -> int:
    """Return the thread count used when none is given: the cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
