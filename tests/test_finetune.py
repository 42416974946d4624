"""QAT: loss goes down, weights stay on their grids, exact resume, policy checks, bad input, torchrun."""

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from asga_deploy import data
from asga_deploy.checkpoint import load_checkpoint, load_finetuned
from asga_deploy.errors import PolicyError
from asga_deploy.finetune import FinetuneConfig, default_warmup, run_finetune
from asga_deploy.models import create_model
from asga_deploy.policy import Policy, uniform_policy
from asga_deploy.quant import apply_policy, calibrate, quantized_layers
from asga_deploy.train import _loss, optimizer_for

from .conftest import FAKE
from .test_train import Stop, assert_same_state, stop_after, torchrun


def test_two_qat_steps_lower_a_finite_loss():
    torch.manual_seed(0)
    x, y = next(iter(data.make_loader(data.get_dataset(FAKE, "train"), 64, True, 0)))
    model = create_model("tinynet", in_chans=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    for _ in range(30):  # a float model that fits the batch, as QAT starts from a trained one
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    apply_policy(model, uniform_policy("tinynet", 4, 4, target="sim"))
    calibrate(model, [x])
    r = FinetuneConfig(policy="p.json").recipe()  # the paper's recipe: lr 0.04, Nesterov 0.9
    opt = optimizer_for(model, r)
    scales = {id(q.scale) for m in quantized_layers(model).values() for q in (m.weight_quantizer, m.input_quantizer)}
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-5, 0.0]
    assert {id(p) for p in opt.param_groups[1]["params"]} == scales  # no decay on step sizes
    assert opt.defaults["nesterov"] and opt.defaults["lr"] == 0.04 and opt.defaults["momentum"] == 0.9
    model.train()
    losses = []
    for _ in range(3):
        loss = _loss(model(x), y, r)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.isfinite(torch.tensor(losses))) and losses[2] < losses[1] < losses[0]


def test_default_warmup():
    assert [default_warmup(e) for e in (1, 4, 5, 10, 30, 90)] == [0, 0, 1, 2, 5, 5]


def cfg_for(policy, float_ckpt, out, **kw):
    return FinetuneConfig(policy=str(policy), float_checkpoint=str(float_ckpt), dataset=FAKE, epochs=2,
                          batch_size=32, out_dir=str(out), device="cpu", **kw)


def test_finetune_writes_grid_exact_checkpoint_and_resumes_exactly(tmp_path, float_ckpt, policy_file):
    pol = policy_file(3, 4)
    cfg = cfg_for(pol, float_ckpt, tmp_path, run="full", kd=True, freeze_bn_after=1)
    full = run_finetune(cfg)
    part = replace(cfg, run="part")
    with pytest.raises(Stop):
        run_finetune(part, callback=stop_after(1))
    run_finetune(part, resume=True)
    a, b = load_checkpoint(full.checkpoint, "finetuned"), load_checkpoint(tmp_path / "part" / "finetuned.pt")
    assert_same_state(a, b)
    assert Policy.from_dict(a["policy"]).diff(Policy.load(pol)) == []
    report = json.loads((tmp_path / "full" / "finetune.json").read_text())
    assert len(report["top1_per_epoch"]) == 2 and 0 <= report["float_top1"] <= 1 and report["time_s"] > 0
    model, _, _, _ = load_finetuned(full.checkpoint)
    layers = quantized_layers(model)
    assert list(layers) == ["conv1", "conv2", "conv3", "fc"]
    for name, m in layers.items():
        wq = m.weight_quantizer
        codes = wq.integer(m.weight)
        assert codes.min() >= wq.qmin and codes.max() <= wq.qmax, name
        assert (wq.qmin, wq.qmax) == ((-3, 3) if name in ("conv2", "conv3") else (-127, 127))
        step = wq.step().reshape(-1, *([1] * (m.weight.dim() - 1)))
        assert torch.allclose(m.quantized_weight(), codes.float() * step, rtol=1e-6, atol=0), name


def test_resume_with_another_policy_is_refused(tmp_path, float_ckpt, policy_file, cli, one_error_line):
    pol = policy_file(4, 4, name="p.json")
    run_finetune(replace(cfg_for(pol, float_ckpt, tmp_path), epochs=1))
    uniform_policy("tinynet", 2, 4, target="sim").save(pol, force=True)
    with pytest.raises(PolicyError, match=r"conv2 \(W4A4 vs W2A4\), conv3 \(W4A4 vs W2A4\)"):
        run_finetune(replace(cfg_for(pol, float_ckpt, tmp_path), epochs=1), resume=True)
    line = one_error_line(cli("finetune", pol, "--float", float_ckpt, "--dataset", FAKE, "--epochs", "1",
                              "--batch-size", "32", "--out", tmp_path, "--resume", "--device", "cpu"))
    assert "conv2" in line and "conv3" in line


def test_cli_finetune_and_eval(tmp_path, float_ckpt, policy_file, cli):
    pol = policy_file(4, 4)
    res = cli("finetune", pol, "--float", float_ckpt, "--dataset", FAKE, "--epochs", "1", "--batch-size", "32",
              "--out", tmp_path, "--device", "cpu")
    assert res.exit_code == 0, res.stderr
    report = json.loads((tmp_path / pol.stem / "finetune.json").read_text())
    ev = cli("eval", tmp_path / pol.stem / "finetuned.pt", "--device", "cpu")
    assert ev.exit_code == 0 and f"{report['top1']:.4f}" in ev.stdout and "finetuned" in ev.stdout


def _renamed_layer_policy(tmp_path):
    d = uniform_policy("tinynet", 4, 4, target="sim").to_dict()
    d["layers"]["conv9"] = d["layers"].pop("conv2")
    path = tmp_path / "renamed.json"
    path.write_text(json.dumps(d))
    return path


@pytest.mark.parametrize("case, words", [
    ("other-model", ["tinynet model", "for smallcnn"]),
    ("renamed-layer", ["conv9 is not a Conv2d/Linear", "missing from the policy: conv2"]),
    ("class-count", ["4 classes", "10 outputs", "asga train --dataset"]),
    ("no-weights", ["--float", "--weights torchvision"]),
    ("nan", ["loss is nan at epoch 1 step", "no checkpoint was written"]),
])
def test_cli_finetune_bad_input(tmp_path, float_ckpt, policy_file, cli, one_error_line, case, words):
    pol = policy_file(4, 4, model="smallcnn") if case == "other-model" else (
        _renamed_layer_policy(tmp_path) if case == "renamed-layer" else policy_file(4, 4))
    args = ["finetune", pol, "--float", float_ckpt, "--dataset", FAKE, "--epochs", "1", "--batch-size", "32",
            "--out", tmp_path / "out", "--device", "cpu"]
    if case == "class-count":
        args[args.index(FAKE)] = "fake:classes=4"
    if case == "no-weights":
        del args[2:4]
    if case == "nan":
        args += ["--lr", "1e38"]
    line = one_error_line(cli(*args), after_progress=case == "nan")
    for w in words:
        assert w in line, line
    assert not list((tmp_path / "out").glob("*/*.pt"))  # no partial checkpoint


@pytest.mark.slow
def test_torchrun_two_processes_finetune(tmp_path, float_ckpt, policy_file):
    pol = policy_file(4, 4)
    out = torchrun("finetune", pol, "--float", float_ckpt, "--dataset", FAKE, "--epochs", "1",
                   "--batch-size", "16", "--out", tmp_path, "--device", "cpu", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / pol.stem).iterdir()) == ["finetune.json", "finetuned.pt"]
    ck = load_checkpoint(tmp_path / pol.stem / "finetuned.pt", "finetuned")
    assert ck["metrics"]["test_count"] == 51 and ck["metrics"]["world_size"] == 2
    assert out.stdout.count("final top-1") == 1
