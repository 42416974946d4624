"""A corpus of bad inputs for every command: each fails in one `error: ` line with exit code 2, no traceback,
naming the thing, and leaves no file behind.

Classes (issue 14): outputs that cannot be written; numbers out of range; corrupted dataset files;
checkpoint, model and policy contents; work before validation; incomplete checkpoints. Every case runs
in-process on tiny models (tinynet, tinyresnet) and tiny data (fake:..., IDX copies of the fmnist_dir
fixture) from a fresh working folder whose listing must not change.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from asga_deploy.checkpoint import save_checkpoint
from asga_deploy.models import create_model
from asga_deploy.policy import uniform_policy
from asga_deploy.quant import apply_policy

from .conftest import FAKE, write_idx

FM = "fashion-mnist"
RGB = "fake:chans=3,train=96,test=51"
SEARCH = ["search", "--model", "tinynet", "--dataset", FAKE, "--subset", "40", "--batch-size", "20", "--epochs", "1",
          "--budget-bitops", "0.25"]


# ---------------------------------------------------------------- shared inputs (built once per module)

def _float_dict(model_name: str, in_chans: int, dataset: str, **extra) -> dict:
    model = create_model(model_name, num_classes=10, in_chans=in_chans)
    return {"kind": "float", "model": model.state_dict(), "model_name": model_name, "num_classes": 10,
            "in_chans": in_chans, "input_size": 28, "dataset": dataset, "config": {"epochs": 3}, "epoch": 3,
            "complete": True, "metrics": {}, **extra}


def _finetuned_dict(complete: bool = True) -> dict:
    pol = uniform_policy("tinynet", 4, 4, target="sim")
    model = create_model("tinynet", num_classes=10, in_chans=1)
    apply_policy(model, pol)
    return {"kind": "finetuned", "model": model.state_dict(), "model_name": "tinynet", "num_classes": 10,
            "in_chans": 1, "input_size": 28, "dataset": FAKE, "policy": pol.to_dict(), "config": {"epochs": 10},
            "epoch": 10 if complete else 4, "complete": complete, "metrics": {}}


def _tiny_onnx(path: Path, classes: int, batch: int | str) -> Path:
    """Write a 1x28x28 -> `classes` logits ONNX classifier (GlobalAveragePool, Gemm) with a fixed or named batch."""
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1, 28, 28])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, classes])
    w = numpy_helper.from_array(np.linspace(-1, 1, classes, dtype=np.float32).reshape(classes, 1), "w")
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "w"], ["y"], transB=1)]
    model = helper.make_model(helper.make_graph(nodes, "tiny", [x], [y], [w]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def _fmnist_copy(src: Path, dst: Path, damage: str) -> Path:
    """Copy the IDX folder and damage one file: 'header' (truncated), 'gzip' (bad CRC), 'deflate' (not a deflate
    stream), 'cut' (stream ends early), 'labels' (values >= 10)."""
    shutil.copytree(src, dst)
    if damage == "header":
        with gzip.open(dst / "train-images-idx3-ubyte.gz", "wb") as f:
            f.write(bytes([0, 0, 8, 3, 0, 0]))  # the magic, then 2 of the 12 bytes of dimensions
    elif damage == "gzip":
        raw = (dst / "t10k-images-idx3-ubyte.gz").read_bytes()
        (dst / "t10k-images-idx3-ubyte.gz").write_bytes(raw[:40] + bytes(b ^ 0x5A for b in raw[40:200]) + raw[200:])
    elif damage == "deflate":  # a valid gzip header, then bytes that are no deflate stream (zlib.error)
        raw = (dst / "train-labels-idx1-ubyte.gz").read_bytes()
        (dst / "train-labels-idx1-ubyte.gz").write_bytes(raw[:10] + bytes(range(7, 250, 3)))
    elif damage == "cut":  # a download stopped half-way (EOFError)
        raw = (dst / "t10k-labels-idx1-ubyte.gz").read_bytes()
        (dst / "t10k-labels-idx1-ubyte.gz").write_bytes(raw[:len(raw) // 2])
    elif damage == "labels":
        for split, n in (("train", 40), ("t10k", 20)):
            write_idx(dst / f"{split}-labels-idx1-ubyte.gz", (torch.arange(n) % 12).to(torch.uint8))
    return dst


@dataclass
class Inputs:
    """Paths of the shared inputs (outside each case's working folder)."""

    root: Path
    float: Path
    float_inc: Path
    float_rgb: Path
    not_tensors: Path
    unsafe: Path
    ft: Path
    ft_inc: Path
    onnx5: Path
    onnx_fixed2: Path
    onnx1: Path
    table: Path
    table_bad: Path
    fm_header: Path
    fm_gzip: Path
    fm_deflate: Path
    fm_cut: Path
    fm_labels: Path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, float_ckpt, fmnist_dir) -> Inputs:
    import datetime

    from asga_deploy.oracle import write_table
    from asga_deploy.sensitivity import SensitivityConfig, measure

    d = tmp_path_factory.mktemp("bad-inputs")
    ck = torch.load(float_ckpt, weights_only=True)
    inc = dict(ck, complete=False, epoch=1, config={**ck["config"], "epochs": 3})
    save_checkpoint(inc, d / "float_inc.pt")
    save_checkpoint(_float_dict("tinynet", 3, RGB), d / "float_rgb.pt")
    torch.save(_float_dict("tinynet", 1, FAKE, model={"conv1.weight": [1.0, 2.0]}), d / "not_tensors.pt")
    torch.save(_float_dict("tinynet", 1, FAKE, provenance={"created": datetime.datetime(2020, 1, 1)}), d / "unsafe.pt")
    save_checkpoint(_finetuned_dict(True), d / "finetuned.pt")
    save_checkpoint(_finetuned_dict(False), d / "finetuned_inc.pt")
    cfg = SensitivityConfig(str(float_ckpt), target="sim", weight_bits=(4, 8), act_bits=(4, 8), reference=(4, 4),
                            images=8, calib_images=8, bn_images=8, batch_size=8, hessian_samples=0)
    table = write_table(measure(cfg), d / "sens")
    bad = json.loads(table.read_text())
    bad["ptq"][bad["layers"][0]] = "damaged"
    (d / "sens_bad.json").write_text(json.dumps(bad))
    return Inputs(
        root=d, float=float_ckpt, float_inc=d / "float_inc.pt", float_rgb=d / "float_rgb.pt",
        not_tensors=d / "not_tensors.pt", unsafe=d / "unsafe.pt", ft=d / "finetuned.pt", ft_inc=d / "finetuned_inc.pt",
        onnx5=_tiny_onnx(d / "five.onnx", 5, "N"), onnx_fixed2=_tiny_onnx(d / "fixed2.onnx", 10, 2),
        onnx1=_tiny_onnx(d / "fixed1.onnx", 10, 1), table=table, table_bad=d / "sens_bad.json",
        fm_header=_fmnist_copy(fmnist_dir, d / "fm_header", "header"),
        fm_gzip=_fmnist_copy(fmnist_dir, d / "fm_gzip", "gzip"),
        fm_deflate=_fmnist_copy(fmnist_dir, d / "fm_deflate", "deflate"),
        fm_cut=_fmnist_copy(fmnist_dir, d / "fm_cut", "cut"),
        fm_labels=_fmnist_copy(fmnist_dir, d / "fm_labels", "labels"))


# ---------------------------------------------------------------- each case's working folder

@dataclass
class Work:
    """A case's working folder (the current directory) and what it holds before the command runs."""

    tmp: Path
    i: Inputs

    @property
    def pol(self) -> Path:
        return self.tmp / "tinynet-w4a4.json"

    @property
    def file(self) -> Path:
        return self.tmp / "afile"

    @property
    def ro(self) -> Path:
        return self.tmp / "ro"


def _write(path: Path, obj) -> Path:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def _policy_variant(w: Work, name: str, change: Callable[[dict], None]) -> Path:
    d = json.loads(w.pol.read_text())
    change(d)
    return _write(w.tmp / name, d)


@pytest.fixture
def work(tmp_path, monkeypatch, inputs) -> Work:
    monkeypatch.chdir(tmp_path)
    w = Work(tmp_path, inputs)
    uniform_policy("tinynet", 4, 4, target="sim").save(w.pol)
    w.file.write_text("a file, not a folder\n")
    w.ro.mkdir()
    w.ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes into 0555 folders: make os.access answer as for any other user
        real = os.access

        def access(path, mode, *a, **k):
            if mode & os.W_OK and Path(path).resolve() == w.ro.resolve():
                return False
            return real(path, mode, *a, **k)

        monkeypatch.setattr(os, "access", access)
    yield w
    w.ro.chmod(0o755)


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ---------------------------------------------------------------- the corpus

@dataclass(frozen=True)
class Case:
    """A command line (a function of the working folder), the words its error must contain, an optional setup."""

    cls: str
    args: Callable[[Work], list]
    words: tuple[str, ...]
    setup: Callable[[Work], None] | None = None


def _deep_json(w: Work) -> None:
    _write(w.tmp / "deep.json", "[" * 200_000 + "]" * 200_000)


def _unknown_key(w: Work) -> None:
    _policy_variant(w, "typo.json", lambda d: d.update(float_layer=["conv1"]))


def _unknown_layer_key(w: Work) -> None:
    _policy_variant(w, "typo-layer.json", lambda d: d["layers"]["conv2"].update(weight_bit=4))


def _other_model_policy(w: Work) -> None:
    uniform_policy("tinyresnet", 4, 4, target="sim").save(w.tmp / "tinyresnet-w4a4.json")


def _rgb_policy(w: Work) -> None:
    uniform_policy("tinynet", 4, 4, target="sim", in_chans=3).save(w.tmp / "rgb.json")


def _folder(*parts: str):
    def make(w: Work) -> None:
        w.tmp.joinpath(*parts).mkdir(parents=True)
    return make


def _junk(name: str, data: bytes):
    def make(w: Work) -> None:
        (w.tmp / name).write_bytes(data)
    return make


FT = ["finetune", "{pol}", "--float", "{float}", "--dataset", FAKE, "--epochs", "1", "--batch-size", "32",
      "--device", "cpu"]
EXPORT = ["export", "{pol}", "--checkpoint", "{ft}", "--parity-images", "8"]
SENS = ["sensitivity", "--float", "{float}", "--target", "sim", "--images", "8", "--calib-images", "8",
        "--bn-images", "8", "--hessian-samples", "0"]
ORACLE = ["search", "--method", "sensitivity", "--sensitivity", "{table}"]
TRAIN = ["train", "--model", "tinynet", "--dataset", FAKE, "--epochs", "1", "--device", "cpu"]
DEMO = ["demo", "--model", "tinynet", "--dataset", FAKE, "--train-epochs", "1", "--search-epochs", "1",
        "--proxy-size", "40", "--out", "demo"]


def fmt(args: list, w: Work) -> list[str]:
    """Fill {name} placeholders with the working folder's and the shared inputs' paths."""
    names = {"pol": w.pol, "file": w.file, "ro": w.ro, "tmp": w.tmp,
             **{k: v for k, v in vars(w.i).items() if isinstance(v, Path)}}
    return [str(a).format(**{k: str(v) for k, v in names.items()}) for a in args]


CASES: dict[str, Case] = {
    # 1. outputs that cannot be written, found before any work
    "train-out-under-a-file": Case("output", lambda w: TRAIN + ["--out", "{file}/runs"], ("afile is a file",)),
    "train-out-read-only": Case("output", lambda w: TRAIN + ["--out", "{ro}/runs"], ("ro is not writable",)),
    "train-checkpoint-is-a-folder": Case("output", lambda w: TRAIN + ["--out", "o", "--run", "r"],
                                         ("float.pt is a folder where a file is expected",), _folder("o", "r", "float.pt")),
    "search-out-under-a-file": Case("output", lambda w: SEARCH + ["--out", "{file}/policies"], ("afile is a file",)),
    "search-run-dir-read-only": Case("output", lambda w: SEARCH + ["--run-dir", "{ro}/run"], ("ro is not writable",)),
    "oracle-out-under-a-file": Case("output", lambda w: ORACLE + ["--budget-bitops", "0.5", "--out", "{file}/p"],
                                    ("afile is a file",)),
    "sensitivity-out-read-only": Case("output", lambda w: SENS + ["--out", "{ro}/sens"], ("ro is not writable",)),
    "finetune-out-under-a-file": Case("output", lambda w: FT + ["--out", "{file}/o"], ("afile is a file",)),
    "export-onnx-is-a-folder": Case("output", lambda w: EXPORT + ["--out", "o"],
                                    ("model.qdq.onnx is a folder where a file is expected",),
                                    _folder("o", "model.qdq.onnx")),
    "export-out-read-only": Case("output", lambda w: EXPORT + ["--out", "{ro}/o"], ("ro is not writable",)),
    "profile-out-is-a-folder": Case("output", lambda w: ["profile", "{onnx1}", "--out", "adir", "--iters", "1"],
                                    ("adir is a folder where a file is expected",), _folder("adir")),
    "profile-out-under-a-file": Case("output", lambda w: ["profile", "{onnx1}", "--out", "{file}/latency.json"],
                                     ("afile is a file",)),
    "uniform-out-is-a-folder": Case("output", lambda w: ["policy", "uniform", "-m", "tinynet", "--w", "4", "--a", "4",
                                                         "--out", "adir"], ("adir is a folder",), _folder("adir")),
    "uniform-out-read-only": Case("output", lambda w: ["policy", "uniform", "-m", "tinynet", "--w", "4", "--a", "4",
                                                       "--out", "{ro}/p.json"], ("ro is not writable",)),
    "demo-out-under-a-file": Case("output", lambda w: DEMO[:-1] + ["{file}/demo"], ("afile is a file",)),
    # 2. numbers: NaN, infinities, zero or negative where positive, out-of-range seeds and fractions
    "train-negative-lr": Case("number", lambda w: TRAIN + ["--lr", "-0.1"], ("--lr -0.1", "positive finite")),
    "train-nan-lr": Case("number", lambda w: TRAIN + ["--lr", "nan"], ("--lr nan", "positive finite")),
    "train-inf-weight-decay": Case("number", lambda w: TRAIN + ["--weight-decay", "inf"], ("--weight-decay inf",)),
    "train-batch-size-0": Case("number", lambda w: TRAIN + ["--batch-size", "0"], ("--batch-size",)),
    "train-negative-workers": Case("number", lambda w: TRAIN + ["--workers", "-1"], ("--workers",)),
    "train-seed-beyond-64-bits": Case("number", lambda w: TRAIN + ["--seed", str(2**64 + 1)], ("--seed",)),
    "train-train-limit-0": Case("number", lambda w: TRAIN + ["--train-limit", "0"], ("--train-limit",)),
    "train-device-unknown": Case("number", lambda w: TRAIN[:-2] + ["--device", "tpu"], ("--device 'tpu' unknown",)),
    "eval-limit-0": Case("number", lambda w: ["eval", "{float}", "--limit", "0"], ("--limit",)),
    "eval-batch-size-0": Case("number", lambda w: ["eval", "{float}", "--batch-size", "0"], ("--batch-size",)),
    "search-nan-lambda": Case("number", lambda w: SEARCH + ["--lambda", "nan"], ("--lambda nan", "finite")),
    "search-nan-tol": Case("number", lambda w: SEARCH + ["--tol", "nan"], ("--tol nan", "(0, 1)")),
    "search-negative-budget": Case("number", lambda w: SEARCH + ["--budget-bitops", "-0.5"],
                                   ("--budget-bitops -0.5", "positive finite")),
    "search-negative-lr": Case("number", lambda w: SEARCH + ["--lr", "-1"], ("--lr -1.0", "positive")),
    "search-fraction-above-1": Case("number", lambda w: SEARCH[:5] + SEARCH[7:] + ["--fraction", "1.5"],
                                    ("--fraction 1.5", "(0, 1]")),
    "search-epochs-0": Case("number", lambda w: SEARCH + ["--epochs", "0"], ("--epochs",)),
    "search-heldout-fraction-1": Case("number", lambda w: SEARCH + ["--heldout-fraction", "1"], ("--heldout-fraction",)),
    "search-cost-input-size-0": Case("number", lambda w: SEARCH + ["--cost-input-size", "0"], ("--cost-input-size",)),
    "search-freeze-frac-1": Case("number", lambda w: SEARCH + ["--freeze-frac", "1"], ("--freeze-frac 1.0", "[0, 1)")),
    "oracle-inf-budget": Case("number", lambda w: ORACLE + ["--budget-bitops", "inf"], ("--budget-bitops inf",)),
    "sensitivity-images-0": Case("number", lambda w: SENS + ["--images", "0"], ("--images",)),
    "sensitivity-nan-budget": Case("number", lambda w: SENS + ["--budget-bitops", "nan"], ("--budget-bitops nan",)),
    "finetune-nan-kd-alpha": Case("number", lambda w: FT + ["--kd-alpha", "nan"], ("--kd-alpha nan", "[0, 1]")),
    "finetune-kd-temperature-0": Case("number", lambda w: FT + ["--kd-temperature", "0"], ("--kd-temperature 0",)),
    "finetune-nan-lr": Case("number", lambda w: FT + ["--lr", "nan"], ("--lr nan",)),
    "export-min-agreement-2": Case("number", lambda w: EXPORT + ["--min-agreement", "2"], ("--min-agreement 2.0", "[0, 1]")),
    "export-nan-accuracy-diff": Case("number", lambda w: EXPORT + ["--max-accuracy-diff", "nan"],
                                     ("--max-accuracy-diff nan",)),
    "export-opset-99": Case("number", lambda w: EXPORT + ["--opset", "99"], ("opset 99", "13..")),
    "export-parity-images-0": Case("number", lambda w: EXPORT + ["--parity-images", "0"], ("--parity-images",)),
    "profile-iters-0": Case("number", lambda w: ["profile", "{onnx1}", "--iters", "0"], ("--iters",)),
    "profile-batch-huge": Case("number", lambda w: ["profile", "{onnx1}", "--batch-sizes", "1,100000"],
                               ("batch sizes in 1..4096",)),
    "profile-negative-input-size": Case("number", lambda w: ["profile", "{onnx1}", "--input-size", "-3"],
                                        ("--input-size",)),
    "uniform-num-classes-0": Case("number", lambda w: ["policy", "uniform", "--w", "4", "--a", "4",
                                                       "--num-classes", "0"], ("--num-classes",)),
    "uniform-input-size-0": Case("number", lambda w: ["policy", "uniform", "--w", "4", "--a", "4",
                                                      "--input-size", "0"], ("--input-size",)),
    "uniform-w-9": Case("number", lambda w: ["policy", "uniform", "--w", "9", "--a", "4"], ("--w 9", "2..8")),
    "uniform-edges-unknown": Case("number", lambda w: ["policy", "uniform", "--w", "4", "--a", "4", "--edges", "foo"],
                                  ("--edges 'foo' unknown", "w8a8, float")),
    "validate-in-chans-0": Case("number", lambda w: ["policy", "validate", "{pol}", "--in-chans", "0"],
                                ("--in-chans",)),
    "demo-nan-budget": Case("number", lambda w: DEMO + ["--budget-bitops", "nan"], ("--budget-bitops nan",)),
    "demo-budget-above-1": Case("number", lambda w: DEMO + ["--budget-bitops", "1.5"], ("--budget-bitops 1.5", "(0, 1]")),
    "demo-negative-seed": Case("number", lambda w: DEMO + ["--seed", "-1"], ("--seed",)),
    # 3. corrupted dataset files
    "train-truncated-idx-header": Case("dataset", lambda w: TRAIN[:4] + [FM, "--data-dir", "{fm_header}"] + TRAIN[5:],
                                       ("train-images-idx3-ubyte.gz", "truncated")),
    "eval-damaged-gzip": Case("dataset", lambda w: ["eval", "{float}", "--dataset", FM, "--data-dir", "{fm_gzip}"],
                              ("t10k-images-idx3-ubyte.gz", "damaged")),
    "search-broken-deflate-stream": Case("dataset", lambda w: SEARCH[:4] + [FM, "--data-dir", "{fm_deflate}"]
                                         + SEARCH[5:], ("train-labels-idx1-ubyte.gz is damaged",)),
    "eval-gzip-cut-short": Case("dataset", lambda w: ["eval", "{float}", "--dataset", FM, "--data-dir", "{fm_cut}"],
                                ("t10k-labels-idx1-ubyte.gz is damaged",)),
    "eval-labels-outside-classes": Case("dataset", lambda w: ["eval", "{float}", "--dataset", FM, "--data-dir",
                                                              "{fm_labels}"], ("t10k-labels-idx1-ubyte.gz", "label 11")),
    "finetune-labels-outside-classes": Case("dataset", lambda w: FT[:5] + [FM, "--data-dir", "{fm_labels}"] + FT[6:],
                                            ("train-labels-idx1-ubyte.gz", "label 11")),
    "search-truncated-idx-header": Case("dataset", lambda w: SEARCH[:4] + [FM, "--data-dir", "{fm_header}"] + SEARCH[5:],
                                ("train-images-idx3-ubyte.gz",)),
    "sensitivity-truncated-header": Case("dataset", lambda w: SENS + ["--dataset", FM, "--data-dir", "{fm_header}"],
                                         ("train-images-idx3-ubyte.gz",)),
    "export-corrupted-test-data": Case("dataset", lambda w: EXPORT + ["--dataset", FM, "--data-dir", "{fm_gzip}"],
                                       ("t10k-images-idx3-ubyte.gz",)),
    "demo-corrupted-data": Case("dataset", lambda w: DEMO[:4] + [FM, "--data-dir", "{fm_labels}"] + DEMO[5:],
                                ("labels-idx1-ubyte.gz", "label 11")),
    # 4. checkpoint, model and policy contents
    "eval-not-a-checkpoint": Case("contents", lambda w: ["eval", "junk.pt"], ("junk.pt is not a readable",),
                                  _junk("junk.pt", b"not a checkpoint")),
    "eval-tensors-not-tensors": Case("contents", lambda w: ["eval", "{not_tensors}"], ("not a state dict of tensors",)),
    "eval-unsafe-global": Case("contents", lambda w: ["eval", "{unsafe}"], ("datetime", "not loaded")),
    "eval-a-folder": Case("contents", lambda w: ["eval", "{tmp}"], ("is a folder, not a file",)),
    "eval-rgb-data-for-grey-model": Case("contents", lambda w: ["eval", "{float}", "--dataset", RGB],
                                         ("3-channel images", "takes 1 channels")),
    "eval-onnx-wrong-classes": Case("contents", lambda w: ["eval", "{onnx5}", "--dataset", FAKE],
                                    ("outputs 5 logits", "10 classes")),
    "eval-onnx-fixed-batch": Case("contents", lambda w: ["eval", "{onnx_fixed2}", "--dataset", FAKE],
                                  ("batches of exactly 2",)),
    "eval-onnx-not-onnx": Case("contents", lambda w: ["eval", "junk.onnx", "--dataset", FAKE],
                               ("junk.onnx is not a readable ONNX model",), _junk("junk.onnx", b"\x00garbage")),
    "finetune-rgb-checkpoint-grey-data": Case("contents", lambda w: FT[:3] + ["{float_rgb}"] + FT[4:],
                                              ("1-channel images", "takes 3 channels")),
    "finetune-policy-for-rgb": Case("contents", lambda w: ["finetune", "rgb.json"] + FT[2:],
                                    ("made for 3-channel inputs",), _rgb_policy),
    "finetune-checkpoint-other-model": Case("contents", lambda w: ["finetune", "tinyresnet-w4a4.json"] + FT[2:],
                                            ("holds a tinynet model", "for tinyresnet"), _other_model_policy),
    "search-float-other-model": Case("contents", lambda w: SEARCH[:2] + ["tinyresnet"] + SEARCH[3:] + ["--float",
                                                                                                       "{float}"],
                                     ("holds a tinynet model", "--model tinyresnet")),
    "search-float-other-channels": Case("contents", lambda w: SEARCH + ["--float", "{float_rgb}"],
                                        ("1-channel images", "takes 3 channels")),
    "sensitivity-finetuned-as-float": Case("contents", lambda w: ["sensitivity", "--float", "{ft}"],
                                           ("'finetuned' checkpoint, expected 'float'",)),
    "oracle-damaged-table": Case("contents", lambda w: ["search", "--method", "sensitivity", "--sensitivity",
                                                        "{table_bad}", "--budget-bitops", "0.5"],
                                 ("damaged sensitivity table", "ptq deltas")),
    "export-checkpoint-other-model": Case("contents", lambda w: ["export", "tinyresnet-w4a4.json", "--checkpoint",
                                                                 "{ft}"], ("holds model tinynet",), _other_model_policy),
    "show-deeply-nested-json": Case("contents", lambda w: ["policy", "show", "deep.json"], ("nested too deeply",),
                                    _deep_json),
    "show-not-json": Case("contents", lambda w: ["policy", "show", "junk.json"], ("not valid JSON",),
                          _junk("junk.json", b"{not json")),
    "validate-unknown-key": Case("contents", lambda w: ["policy", "validate", "typo.json"],
                                 ("unknown key(s) 'float_layer'",), _unknown_key),
    "validate-unknown-layer-key": Case("contents", lambda w: ["policy", "validate", "typo-layer.json"],
                                       ("layer conv2: unknown key(s) 'weight_bit'",), _unknown_layer_key),
    "validate-a-folder": Case("contents", lambda w: ["policy", "validate", "{tmp}"], ("is a folder",)),
    "validate-a-device": Case("contents", lambda w: ["policy", "validate", "/dev/null"],
                              ("/dev/null is not a regular file",)),
    "profile-a-device": Case("contents", lambda w: ["profile", "/dev/null"], ("/dev/null is not a regular file",)),
    "diff-two-models": Case("contents", lambda w: ["policy", "diff", "{pol}", "tinyresnet-w4a4.json"],
                            ("model tinynet", "model tinyresnet", "cannot be compared"), _other_model_policy),
    "train-run-escapes-out": Case("contents", lambda w: TRAIN + ["--out", "o", "--run", "../escaped"],
                                  ("--run '../escaped'", "plain name")),
    "finetune-name-with-separator": Case("contents", lambda w: FT + ["--name", "a/b"], ("--run 'a/b'",)),
    "search-name-escapes": Case("contents", lambda w: SEARCH + ["--name", "../p"], ("--name '../p'",)),
    "oracle-name-with-separator": Case("contents", lambda w: ORACLE + ["--budget-bitops", "0.5", "--name", "x/y"],
                                       ("--name 'x/y'",)),
    "models-extra-argument": Case("contents", lambda w: ["models", "extra"], ("unexpected extra argument",)),
    "export-missing-policy": Case("contents", lambda w: ["export"], ("missing argument",)),
    "search-unknown-method": Case("contents", lambda w: SEARCH + ["--method", "grid"], ("--method 'grid' unknown",)),
    # 5. work before validation: nothing is trained or written first
    "demo-unknown-target": Case("order", lambda w: DEMO + ["--target", "tpu"], ("tpu",)),
    "demo-infeasible-budget": Case("order", lambda w: DEMO + ["--budget-bitops", "0.001"], ("0.001",)),
    "demo-proxy-larger-than-data": Case("order", lambda w: DEMO[:-4] + ["--proxy-size", "500", "--out", "demo"],
                                        ("--proxy-size 500", "only 96")),
    "demo-unknown-dataset": Case("order", lambda w: DEMO[:4] + ["fashion-mnst"] + DEMO[5:], ("did you mean",)),
    # 6. incomplete checkpoints are refused unless allowed
    "eval-incomplete": Case("incomplete", lambda w: ["eval", "{float_inc}"],
                            ("is incomplete", "epoch 1 of 3", "--allow-incomplete")),
    "eval-ptq-incomplete": Case("incomplete", lambda w: ["eval", "{pol}", "--ptq", "--float", "{float_inc}"],
                                ("is incomplete",)),
    "finetune-float-incomplete": Case("incomplete", lambda w: FT[:3] + ["{float_inc}"] + FT[4:],
                                      ("is incomplete", "--allow-incomplete")),
    "export-incomplete": Case("incomplete", lambda w: ["export", "{pol}", "--checkpoint", "{ft_inc}"],
                              ("is incomplete", "epoch 4 of 10", "--allow-incomplete")),
    "sensitivity-incomplete": Case("incomplete", lambda w: ["sensitivity", "--float", "{float_inc}"],
                                   ("is incomplete",)),
    "search-float-incomplete": Case("incomplete", lambda w: SEARCH + ["--float", "{float_inc}"],
                                    ("is incomplete", "--resume")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_in_one_line_and_leaves_nothing(name, work, cli, one_error_line):
    case = CASES[name]
    if case.setup is not None:
        case.setup(work)
    before, shared = _listing(work.tmp), _listing(work.i.root)
    line = one_error_line(cli(*fmt(case.args(work), work)))
    for word in case.words:
        assert word in line, line
    assert "weights_only=False" not in line and "Traceback" not in line
    assert _listing(work.tmp) == before, "files left behind"
    assert _listing(work.i.root) == shared


def test_the_corpus_covers_every_class_and_command():
    classes = {c.cls for c in CASES.values()}
    assert classes == {"output", "number", "dataset", "contents", "order", "incomplete"}
    assert len(CASES) >= 60
    commands = {_command(c) for c in CASES.values()}
    for cmd in ("train", "eval", "models", "search", "sensitivity", "finetune", "export", "profile", "policy show",
                "policy validate", "policy diff", "policy uniform", "demo", "search --method sensitivity"):
        assert cmd in commands, cmd


def _command(c: Case) -> str:
    args = c.args(Work(Path("/w"), None))  # the placeholders stay unformatted: only the words are read
    if args[0] == "policy":
        return f"policy {args[1]}"
    if args[0] == "search" and "sensitivity" in args[1:3]:
        return "search --method sensitivity"
    return args[0]


# ---------------------------------------------------------------- what is accepted, and said, instead

def _dead_pid() -> int:
    import subprocess

    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_stale_temporary_files_of_killed_writes_are_removed(tmp_path, cli):
    out = tmp_path / "p"
    out.mkdir()
    stale = out / f".tinynet-w4a4.json.{_dead_pid()}.abcd_123.tmp"  # a write killed before its rename
    live = out / f".other.json.{os.getpid()}.efgh_456.tmp"  # a write still running
    mine = out / ".notes.tmp"  # not ours
    for p in (stale, live, mine):
        p.write_text("partial")
    res = cli("policy", "uniform", "-m", "tinynet", "--w", "4", "--a", "4", "--target", "sim",
              "--out", out / "tinynet-w4a4.json")
    assert res.exit_code == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted([live.name, mine.name, "tinynet-w4a4.json"])


def test_allowed_incomplete_checkpoints_are_named_in_the_output(inputs, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = cli("eval", inputs.float_inc, "--allow-incomplete", "--device", "cpu")
    assert res.exit_code == 0, res.stderr
    assert "INCOMPLETE: saved after epoch 1 of 3" in res.stdout
    uniform_policy("tinynet", 4, 4, target="sim").save(tmp_path / "p.json")
    res = cli("eval", tmp_path / "p.json", "--ptq", "--float", inputs.float_inc, "--allow-incomplete")
    assert res.exit_code == 0, res.stderr
    assert "INCOMPLETE" in res.stdout


def test_onnx_with_a_fixed_batch_of_one_is_evaluated_image_by_image(inputs, cli):
    res = cli("eval", inputs.onnx1, "--dataset", FAKE)
    assert res.exit_code == 0, res.stderr
    assert "51" in res.stdout and "onnx" in res.stdout


def test_finetune_from_an_allowed_incomplete_float_records_it(inputs, cli, tmp_path):
    pol = tmp_path / "tinynet-w4a4.json"
    uniform_policy("tinynet", 4, 4, target="sim").save(pol)
    res = cli("finetune", pol, "--float", inputs.float_inc, *FT[4:], "--out", tmp_path / "o", "--allow-incomplete")
    assert res.exit_code == 0, res.stderr
    assert "INCOMPLETE float checkpoint" in " ".join(res.stdout.split())
    report = json.loads((tmp_path / "o" / pol.stem / "finetune.json").read_text())
    assert report["float_incomplete"] == "saved after epoch 1 of 3"
    assert torch.load(tmp_path / "o" / pol.stem / "finetuned.pt", weights_only=True)["float_incomplete"]
