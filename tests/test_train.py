"""Float training: exact resume, divergence, the train/eval/models CLI, and a 2-process torchrun run."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from asga_deploy import data
from asga_deploy.checkpoint import load_checkpoint
from asga_deploy.dist import init_distributed
from asga_deploy.errors import TrainingDivergedError
from asga_deploy.models import create_model
from asga_deploy.train import Recipe, TrainConfig, fit, run_train

from .conftest import FAKE


class Stop(Exception):
    pass


def stop_after(epoch):
    def callback(ev):
        if ev.kind == "epoch" and ev.epoch == epoch:
            raise Stop  # as if the job were killed right after that epoch's checkpoint
    return callback


def assert_same_state(a: dict, b: dict):
    assert a["epoch"] == b["epoch"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for (ka, sa), (kb, sb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items(), strict=True):
        assert ka == kb and torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    drop = ("epoch_time_s",)
    strip = [[{k: v for k, v in h.items() if k not in drop} for h in c["metrics"]["history"]] for c in (a, b)]
    assert strip[0] == strip[1]


def test_resume_equals_uninterrupted_run(tmp_path):
    cfg = TrainConfig(model="tinynet", dataset=FAKE, epochs=2, batch_size=32, lr=0.2, out_dir=str(tmp_path),
                      device="cpu", run="full")
    run_train(cfg)
    part = replace(cfg, run="part")
    with pytest.raises(Stop):
        run_train(part, callback=stop_after(1))
    assert load_checkpoint(tmp_path / "part" / "float.pt", allow_incomplete=True)["epoch"] == 1
    run_train(part, resume=True)
    full, resumed = load_checkpoint(tmp_path / "full" / "float.pt"), load_checkpoint(tmp_path / "part" / "float.pt")
    assert_same_state(full, resumed)
    assert resumed["complete"] and resumed["kind"] == "float" and resumed["model_name"] == "tinynet"
    assert (resumed["num_classes"], resumed["in_chans"], resumed["input_size"]) == (10, 1, 28)
    report = json.loads((tmp_path / "part" / "train.json").read_text())
    assert len(report["top1_per_epoch"]) == 2 and report["config"]["epochs"] == 2 and report["machine"]["cores"]


class NaNAfter(nn.Module):
    """tinynet whose output becomes NaN after a number of training forwards."""

    def __init__(self, after: int):
        super().__init__()
        self.net, self.after, self.calls = create_model("tinynet", in_chans=1), after, 0

    def forward(self, x):
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls > self.after:
                return out * float("nan")
        return out


def test_nan_loss_names_epoch_and_step_and_keeps_last_checkpoint(tmp_path):
    train, test = data.get_dataset(FAKE, "train"), data.get_dataset(FAKE, "test")
    r = Recipe(epochs=3, batch_size=32, lr=0.1)
    path = tmp_path / "float.pt"
    model = NaNAfter(after=4)  # 3 steps an epoch: the 2nd step of epoch 2 diverges
    with pytest.raises(TrainingDivergedError, match=r"epoch 2 step 2.*last good checkpoint.*epoch 1"):
        fit(model, train, test, r, init_distributed("cpu"), path,
            {"kind": "float", "model_name": "tinynet", "num_classes": 10, "in_chans": 1})
    assert load_checkpoint(path, allow_incomplete=True)["epoch"] == 1


def test_cli_train_eval_models(tmp_path, cli, one_error_line):
    args = ["train", "--model", "tinynet", "--dataset", FAKE, "--epochs", "1", "--batch-size", "32",
            "--out", tmp_path, "--run", "r", "--device", "cpu"]
    res = cli(*args)
    assert res.exit_code == 0, res.stderr
    report = json.loads((tmp_path / "r" / "train.json").read_text())
    assert report["test_count"] == 51
    again = one_error_line(cli(*args))
    assert "exists" in again and "--force" in again
    ev = cli("eval", tmp_path / "r" / "float.pt", "--device", "cpu")
    assert ev.exit_code == 0, ev.stderr
    assert f"{report['top1']:.4f}" in ev.stdout and "51" in ev.stdout
    assert "smallcnn" in cli("models").stdout
    line = one_error_line(cli("eval", tmp_path / "r" / "float.pt", "--dataset", "fake:classes=4"))
    assert "4 classes" in line and "10 outputs" in line
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert "junk.pt" in one_error_line(cli("eval", tmp_path / "junk.pt"))


@pytest.mark.parametrize("bad, words", [
    (["--model", "tinynett"], "did you mean tinynet"),
    (["--dataset", "fashion-mnst"], "did you mean fashion-mnist"),
    (["--dataset", "fashion-mnist", "--data-dir", "{tmp}/none"], "apt-get install dataset-fashion-mnist"),
])
def test_cli_train_bad_input(tmp_path, cli, one_error_line, bad, words):
    bad = [b.replace("{tmp}", str(tmp_path)) for b in bad]
    line = one_error_line(cli("train", "--model", "tinynet", "--epochs", "1", "--out", tmp_path / "out",
                              "--run", "r", *bad))
    assert words in line
    assert not (tmp_path / "out").exists()


def torchrun(*args, cwd: Path) -> subprocess.CompletedProcess:
    """Run `python -m asga_deploy ARGS` on 2 CPU processes (gloo) through torchrun."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "asga_deploy", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_torchrun_two_processes_train(tmp_path):
    out = torchrun("train", "--model", "tinynet", "--dataset", FAKE, "--epochs", "1", "--batch-size", "16",
                   "--out", tmp_path, "--name", "ddp", "--device", "cpu", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    files = sorted(p.name for p in (tmp_path / "ddp").iterdir())
    assert files == ["float.pt", "train.json"]
    ck = load_checkpoint(tmp_path / "ddp" / "float.pt", "float")
    assert ck["metrics"]["test_count"] == 51 and ck["metrics"]["world_size"] == 2  # all ranks' images, no padding
    assert out.stdout.count("final top-1") == 1  # rank 0 alone reports
