"""`asga export` / `asga profile` through the CLI: a full run on fake data, and every bad input in one line."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

pytest.importorskip("onnxruntime")

from asga_deploy.cli import app  # noqa: E402
from asga_deploy.models import register_model  # noqa: E402
from asga_deploy.policy import LayerBits, Policy  # noqa: E402

from .test_export_helpers import make_checkpoint  # noqa: E402

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _one_line_error(res, *needles):
    assert res.exit_code == 2, res.output
    err = res.stderr.strip() if hasattr(res, "stderr") else res.output.strip()
    assert err.count("\n") == 0 and err.startswith("error:"), err
    for n in needles:
        assert n in err, err
    return err


class _GroupNormNet(nn.Module):
    def __init__(self, num_classes=10, in_chans=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 8, 3, 1, 1)
        self.gn = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.gn(self.conv1(x)).mean((2, 3)))


try:
    register_model("test-gnnet", 28, "test: a GroupNorm the exporter does not handle")(_GroupNormNet)
except ValueError:
    pass


def test_export_then_profile(tmp_path):
    p, c, _ = make_checkpoint(tmp_path, "tinyresnet", 4, 4, "ort")
    out = tmp_path / "bundle"
    res = _run("export", p, "--checkpoint", c, "--out", out, "--parity-images", 64)
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["status"] == "ok" and rep["parity"]["images"] == 64 and (out / "model.qdq.onnx").is_file()
    req = rep["ort_integer_kernels"]["requants"]  # 4-bit inputs read from the residual Adds' 8-bit grids
    assert req and f"requantizations {len(req)}/{len(req)} on" in " ".join(res.output.split())
    assert rep["config"]["parity"]["images"] == 64 and rep["provenance"]["asga_version"]
    again = _run("export", p, "--checkpoint", c, "--out", out, "--parity-images", 64)
    _one_line_error(again, "exists", "--force")
    prof = _run("profile", out / "model.qdq.onnx", "--batch-sizes", "1,4", "--iters", 3, "--warmup", 1,
                "--threads", 1)
    assert prof.exit_code == 0, prof.output
    lat = json.loads((out / "latency.json").read_text())
    assert [b["batch"] for b in lat["batches"]] == [1, 4]
    assert {"p50_ms", "p90_ms", "p99_ms", "throughput_ips"} <= set(lat["batches"][0])
    assert lat["integer_kernels"]["total"] == 7 and lat["machine"]["cores"] and lat["versions"]["onnxruntime"]
    assert lat["integer_kernels"]["policy_layers_not_integer"] == []  # the classifier too: QGemm
    assert lat["isa"]["kind"] and lat["machine"]["isa"] == lat["isa"] and rep["isa"] == lat["isa"]


def test_checkpoint_of_another_policy_is_refused(tmp_path):
    p, c, pol = make_checkpoint(tmp_path, "tinynet", 8, 8, "ort")
    other = Policy.load(p)
    other.layers["conv2"] = LayerBits(4, 8, False)
    op = other.save(tmp_path / "other.json")
    _one_line_error(_run("export", op, "--checkpoint", c, "--out", tmp_path / "o"), "conv2 (W7A8 vs W4A8)")  # ort: 7-bit weights
    assert not (tmp_path / "o").exists()


def test_target_that_cannot_represent_the_policy(tmp_path):
    p, c, _ = make_checkpoint(tmp_path, "tinynet", 8, 8, "ort")
    err = _one_line_error(_run("export", p, "--checkpoint", c, "--target", "tensorrt", "--out", tmp_path / "o"),
                          "conv2", "act_bits=8")
    assert "conv3" in err
    assert not (tmp_path / "o").exists()


def test_unhandled_layer_type_is_named(tmp_path):
    from asga_deploy.policy import uniform_policy

    pol = uniform_policy("test-gnnet", 8, 8, "sim", in_chans=1)
    p, c, _ = make_checkpoint(tmp_path, policy=pol)
    _one_line_error(_run("export", p, "--checkpoint", c, "--out", tmp_path / "o"), "gn (GroupNorm)")
    assert not (tmp_path / "o").exists()


def test_a_float_kernel_fails_the_export_in_one_line_unless_warned(tmp_path, one_error_line):
    from asga_deploy.policy import uniform_policy

    pol = uniform_policy("tinyresnet", 8, 8, "ort")
    pol.deploy = {"residual_quant": False}  # no Q after the convs that feed the residual Adds
    p, c, _ = make_checkpoint(tmp_path, policy=pol)
    args = ("export", p, "--checkpoint", c, "--out", tmp_path / "o", "--parity-images", 32)
    err = one_error_line(_run(*args), after_progress=True)
    assert all(n in err for n in ("float ONNX Runtime kernels", "layer1.0.conv2", "--warn-float-kernels")), err
    res = _run(*args, "--force", "--warn-float-kernels")
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["status"] == "ok" and "layer1.0.conv2" in rep["ort_integer_kernels"]["not_integer"]


def test_trt_without_tensorrt_fails_cleanly(tmp_path):
    try:
        import tensorrt  # noqa: F401

        if torch.cuda.is_available():
            pytest.skip("TensorRT and a GPU are present")
    except ImportError:
        pass
    p, c, _ = make_checkpoint(tmp_path, "tinynet", 8, 7, "tensorrt")
    _one_line_error(_run("export", p, "--checkpoint", c, "--trt", "--out", tmp_path / "o"), "pip install")
    assert not (tmp_path / "o").exists()


def test_bad_opset_and_missing_files(tmp_path):
    p, c, _ = make_checkpoint(tmp_path, "tinynet", 8, 7, "tensorrt")
    _one_line_error(_run("export", p, "--checkpoint", c, "--opset", 21, "--out", tmp_path / "o"), "opset 21")
    _one_line_error(_run("export", p, "--checkpoint", tmp_path / "nope.pt", "--out", tmp_path / "o"), "nope.pt")
    _one_line_error(_run("profile", tmp_path / "nope.onnx"), "nope.onnx")
    assert not (tmp_path / "o").exists()
