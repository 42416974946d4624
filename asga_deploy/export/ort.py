"""ONNX Runtime: sessions, torch-vs-ORT parity, accuracy of an ONNX file, integer-kernel report."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import data
from ..errors import ExportError, require

# ops that run on integer data in ORT's optimized graph (QDQ node units fused into integer kernels)
INTEGER_OPS = {"QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat",
               "QGemm", "DynamicQuantizeMatMul", "MatMulNBits", "QLinearAdd", "QLinearMul"}


@dataclass(frozen=True)
class ParityConfig:
    """How many real images to compare on and the tolerances (agreement fraction, accuracy points)."""

    images: int = 1000
    batch_size: int = 100
    min_agreement: float = 0.995
    max_accuracy_diff: float = 0.1  # percentage points
    threads: int = 0  # 0: ORT's default


def session(model: str | Path | bytes, threads: int = 0, optimized_path: str | Path | None = None,
            level: str = "all"):
    """Return a CPU InferenceSession (intra-op threads, optional optimized-graph dump)."""
    ort = require("onnxruntime", "onnx")
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
    src = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"ONNX Runtime cannot load the model: {str(e).splitlines()[0][:300]}") from None


def _batches(loader: Iterable, limit: int) -> Iterable[tuple[torch.Tensor, torch.Tensor | None]]:
    seen = 0
    for b in loader:
        x, y = (b[0], b[1]) if isinstance(b, (tuple, list)) else (b, None)
        if seen >= limit:
            break
        take = min(len(x), limit - seen)
        seen += take
        yield x[:take], (None if y is None else torch.as_tensor(y)[:take])


@torch.no_grad()
def parity(model: torch.nn.Module, onnx_model: str | Path | bytes, loader: Iterable,
           cfg: ParityConfig = ParityConfig(), unrounded: torch.nn.Module | None = None) -> dict:
    """Return torch fake-quant vs ONNX Runtime agreement, accuracies and logit differences on real data.

    `unrounded` (optional): the same model with its float bias, for an extra agreement figure.
    """
    sess = session(onnx_model, cfg.threads)
    name = sess.get_inputs()[0].name
    model = model.eval()
    agree = agree_u = correct_t = correct_o = count = 0
    diffs = []
    labelled = True
    for x, y in _batches(loader, cfg.images):
        xt = x.float().cpu()
        lt = model(xt).numpy()
        lo = sess.run(None, {name: xt.numpy()})[0]
        pt, po = lt.argmax(1), lo.argmax(1)
        agree += int((pt == po).sum())
        if unrounded is not None:
            agree_u += int((unrounded(xt).numpy().argmax(1) == po).sum())
        if y is None:
            labelled = False
        else:
            yn = y.numpy()
            correct_t += int((pt == yn).sum())
            correct_o += int((po == yn).sum())
        diffs.append(np.abs(lt - lo).reshape(-1))
        count += len(x)
    if count == 0:
        raise ExportError("parity: the test data yielded no images")
    d = np.concatenate(diffs)
    res = {"images": count, "top1_agreement": agree / count,
           "max_abs_logit_diff": float(d.max()), "median_abs_logit_diff": float(np.median(d))}
    if unrounded is not None:
        res["top1_agreement_float_bias_reference"] = agree_u / count
    if labelled:
        res.update(torch_top1=correct_t / count, onnx_top1=correct_o / count,
                   accuracy_diff_points=abs(100.0 * (correct_t - correct_o) / count))
    res["passed"] = res["top1_agreement"] >= cfg.min_agreement and res.get("accuracy_diff_points", 0.0) <= \
        cfg.max_accuracy_diff
    res["tolerance"] = {"min_agreement": cfg.min_agreement, "max_accuracy_diff_points": cfg.max_accuracy_diff}
    return res


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


def quantized_weights(proto) -> dict[str, str]:
    """Return {layer (Conv/Gemm/MatMul node name): weight initializer} for weights that feed a DequantizeLinear."""
    inits = {i.name: len(i.dims) for i in proto.graph.initializer}
    consumers: dict[str, list] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out = {}
    for n in proto.graph.node:
        if n.op_type == "DequantizeLinear" and inits.get(n.input[0], 0) >= 2:
            for c in consumers.get(n.output[0], []):
                if c.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose"):
                    out[c.name or n.input[0]] = n.input[0]
    return out


def integer_kernels(path: str | Path | bytes, threads: int = 0, keep_optimized: str | Path | None = None) -> dict:
    """Return which quantized layers became integer kernels in ORT's optimized graph (plan vs runtime).

    The plan: every Conv/Gemm whose weight is an integer initializer behind a DequantizeLinear. The
    runtime: the node that consumes that initializer in the optimized graph (directly, or through a
    DequantizeLinear when the unit was not fused).
    """
    onnx = require("onnx", "onnx")
    proto = onnx.load_from_string(path) if isinstance(path, bytes) else onnx.load(str(path))
    plan = quantized_weights(proto)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(keep_optimized) if keep_optimized else Path(tmp) / "optimized.onnx"
        session(path, threads, optimized_path=out)
        opt = onnx.load(str(out), load_external_data=False)
    consumers: dict[str, list] = {}
    for n in opt.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    layers = {}
    for layer, weight in plan.items():
        ops = []
        for n in consumers.get(weight, []):
            if n.op_type == "DequantizeLinear":
                ops += [c.op_type for c in consumers.get(n.output[0], [])]
            else:
                ops.append(n.op_type)
        integer = bool(ops) and all(op in INTEGER_OPS for op in ops)
        layers[layer] = {"kernel": "+".join(sorted(set(ops))) or "absent", "integer": integer}
    ops_count: dict[str, int] = {}
    for n in opt.graph.node:
        ops_count[n.op_type] = ops_count.get(n.op_type, 0) + 1
    not_int = [n for n, v in layers.items() if not v["integer"]]
    return {"layers": layers, "integer": len(layers) - len(not_int), "total": len(layers),
            "not_integer": not_int, "optimized_ops": dict(sorted(ops_count.items()))}


def default_threads() -> int:
    """Return the thread count used when none is given: the cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
