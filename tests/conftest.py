"""Shared fixtures: small threads, tiny generated datasets, a trained tiny float checkpoint, policy files."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
import torch

# Several test processes share two cores here: one thread each avoids OpenMP oversubscription stalls.
torch.set_num_threads(1)

FAKE = "fake:train=96,test=51"  # a tiny deterministic dataset (10 classes, 28x28, 1 channel)


def write_idx(path: Path, array: torch.Tensor) -> Path:
    """Write a uint8 tensor as a gzipped IDX file (big-endian header, then the bytes)."""
    header = bytes([0, 0, 0x08, array.dim()]) + struct.pack(f">{array.dim()}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.contiguous().numpy().tobytes())
    return path


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory) -> Path:
    """A folder with the four Fashion-MNIST IDX files, holding 40 train and 20 test random images."""
    d = tmp_path_factory.mktemp("fmnist")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 40), ("t10k", 20)):
        write_idx(d / f"{split}-images-idx3-ubyte.gz", torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8))
        write_idx(d / f"{split}-labels-idx1-ubyte.gz", (torch.arange(n) % 10).to(torch.uint8))
    return d


@pytest.fixture(scope="session")
def float_ckpt(tmp_path_factory) -> Path:
    """A tinynet float checkpoint trained one epoch on the tiny fake dataset."""
    from asga_deploy.train import TrainConfig, run_train

    out = tmp_path_factory.mktemp("float")
    cfg = TrainConfig(model="tinynet", dataset=FAKE, epochs=1, batch_size=32, lr=0.2, out_dir=str(out),
                      run="tiny", device="cpu")
    return run_train(cfg).checkpoint


@pytest.fixture
def policy_file(tmp_path):
    """Factory: write a uniform tinynet policy (target sim) and return its path."""
    from asga_deploy.policy import uniform_policy

    def make(w: int = 4, a: int = 4, model: str = "tinynet", name: str | None = None) -> Path:
        path = tmp_path / (name or f"{model}-w{w}a{a}.json")
        uniform_policy(model, w, a, target="sim").save(path, force=True)
        return path

    return make


@pytest.fixture
def cli():
    """Invoke the asga CLI in-process; returns typer's Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from asga_deploy.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return invoke


@pytest.fixture
def one_error_line():
    """Return a checker: a CLI result is a one-line error with exit code 2; it returns the line."""
    return _one_error_line


def _one_error_line(result, after_progress: bool = False) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    # an error raised mid-training follows that run's progress lines; any other comes alone
    assert len(errors) == 1 and lines[-1] == errors[0] and (after_progress or len(lines) == 1), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    return errors[0]


@pytest.fixture
def data_cache(tmp_path, monkeypatch) -> Path:
    """An empty on-disk dataset cache (data.CACHE_DIR) and an empty in-memory one, for this test only."""
    from asga_deploy import data

    cache = tmp_path / "data-cache"
    monkeypatch.setattr(data, "CACHE_DIR", cache)
    monkeypatch.setattr(data, "_MEMORY", {})
    return cache
