"""`asga search` end to end on the fake dataset; resume equivalence; bad inputs fail cleanly."""

from __future__ import annotations

import json

import pytest
import torch

from asga_deploy.errors import TrainingDivergedError
from asga_deploy.models import create_model
from asga_deploy.policy import Policy, validate_policy
from asga_deploy.search.run import SearchConfig, run_search

from .test_search_helpers import search_data

DATA = "fake:train=48,size=12"
BASE = ["search", "--model", "tinynet", "--dataset", DATA, "--subset", "48", "--batch-size", "16",
        "--epochs", "1"]


def test_three_step_search_writes_a_valid_policy(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = cli(*BASE, "--budget-bitops", "0.25", "--target", "tensorrt", "--allow-diagnostics")
    assert res.exit_code == 0, res.stderr
    files = sorted(p.name for p in (tmp_path / "policies").iterdir())
    assert files == ["tinynet-asga-r25-tensorrt.bits.png", "tinynet-asga-r25-tensorrt.cost.png",
                     "tinynet-asga-r25-tensorrt.json", "tinynet-asga-r25-tensorrt.rho.png",
                     "tinynet-asga-r25-tensorrt.search.jsonl"]
    pol = Policy.load(tmp_path / "policies" / "tinynet-asga-r25-tensorrt.json")
    validate_policy(pol, create_model("tinynet", 10, 1))
    assert pol.target == "tensorrt" and 0.97 * 0.25 <= pol.cost["bitops_vs_w8a8"] <= 0.25
    prov = pol.provenance
    assert prov["config"]["budget_bitops"] == 0.25 and prov["config"]["objective"] == "asga"
    assert prov["dataset"] == DATA and len(prov["dataset_fingerprint"]) == 16 and prov["seed"] == 0
    assert prov["supernet_init"] == {"init": "scratch"} and "asga search" in prov["command"]
    for k in ("argmax_last_change_epoch", "alpha_did_not_move", "extraction_far_from_argmax"):
        assert k in prov["metrics"]
    log = [json.loads(x) for x in (tmp_path / "policies" / "tinynet-asga-r25-tensorrt.search.jsonl").read_text().splitlines()]
    assert len(log) == 3
    for k in ("loss", "loss_adv", "gap", "rho", "lambda", "temperature", "expected_cost", "argmax_cost",
              "images_per_s"):
        assert all(isinstance(r[k], float) for r in log), k
    assert (tmp_path / "runs/search/tinynet-asga-r25-tensorrt-s0/checkpoint.pt").is_file()
    # the same search again: its run folder exists, so it needs --resume or --force
    res = cli(*BASE, "--budget-bitops", "0.25", "--target", "tensorrt")
    assert res.exit_code == 2 and "--resume" in res.stderr
    # another search landing on the same r25 keeps the reviewed policy and takes the next free name
    res = cli(*BASE, "--budget-bitops", "0.25", "--target", "tensorrt", "--allow-diagnostics", "--run-dir", "other")
    assert res.exit_code == 0, res.stderr
    assert Policy.load(tmp_path / "policies" / "tinynet-asga-r25-tensorrt.json").layers == pol.layers
    assert (tmp_path / "policies" / "tinynet-asga-r25-tensorrt-2.json").is_file()


class _Stop(KeyboardInterrupt):
    pass


def test_resume_reaches_the_same_policy(tmp_path):
    cfg = SearchConfig(model="tinyresnet", dataset="synthetic", epochs=2, budget_bitops=0.125,
                       weight_bits=(2, 4, 8), act_bits=(2, 4, 8), allow_diagnostics=True)
    full = run_search(cfg, search_data(3, 8), tmp_path / "a", tmp_path / "ra")

    def stop_after_first_epoch(ev):
        if ev.kind == "epoch" and ev.epoch == 1:
            raise _Stop

    with pytest.raises(_Stop):
        run_search(cfg, search_data(3, 8), tmp_path / "b", tmp_path / "rb", callback=stop_after_first_epoch)
    assert not (tmp_path / "b").exists()  # interrupted: no policy
    resumed = run_search(cfg, search_data(3, 8), tmp_path / "b", tmp_path / "rb", resume=True)
    assert resumed.policy.layers == full.policy.layers
    a = torch.load(tmp_path / "ra/checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "rb/checkpoint.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    la = [{k: v for k, v in r.items() if k != "images_per_s"} for r in a["state"]["log"]]
    lb = [{k: v for k, v in r.items() if k != "images_per_s"} for r in b["state"]["log"]]
    assert la == lb


def test_nan_loss_names_the_step_and_keeps_the_last_checkpoint(tmp_path):
    cfg = SearchConfig(model="tinynet", dataset="synthetic", epochs=3, budget_bitops=0.25)
    with pytest.raises(TrainingDivergedError, match=r"epoch 2 step 1 \(global step 4\).*epoch 1\) is kept"):
        run_search(cfg, search_data(3, 8, nan_at_epoch=2), tmp_path / "p", tmp_path / "r")
    assert torch.load(tmp_path / "r/checkpoint.pt", weights_only=True)["epoch"] == 1
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("args, expect", [
    (["--budget-bitops", "0.01"], "below the cheapest policy of these candidates; feasible range 0.0625..1.031"),
    (["--budget-bitops", "1e12"], "is a ratio of W8A8 BitOPs in (0, 1]; for absolute BitOPs write --budget-gbitops 1000"),
    (["--budget-gbitops", "1e12"], "above the most expensive"),
    (["--budget-bitops", "nan"], "must be a positive finite number"),
    (["--budget-bitops", "0.25", "--target", "tensorrt", "--act-bits", "8", "--no-replace"],
     "layer conv2: no candidate unsigned activation bit-width left on target tensorrt"),
    (["--weight-bits", "1,4"], "each must be in 2..8"),
    (["--act-bits", "4,9"], "each must be in 2..8"),
    (["--subset", "4000"], "subset of 4000 images asked"),
    (["--objective", "adam"], "objective 'adam' unknown"),
    (["--objective", "sam-align", "--rho-rule", "rel"], "--rho-rule rel applies to asga only"),
])
def test_bad_inputs_fail_in_one_line_and_write_nothing(cli, one_error_line, tmp_path, monkeypatch, args, expect):
    monkeypatch.chdir(tmp_path)
    argv = list(BASE)
    if "--subset" in args:
        i = argv.index("--subset")
        del argv[i:i + 2]
    res = cli(*argv, *args)
    assert expect in one_error_line(res)
    assert list(tmp_path.iterdir()) == []


def test_float_checkpoint_init_and_heldout_logits(float_ckpt, tmp_path):
    from asga_deploy.search.run import prepare

    cfg = SearchConfig(model="tinynet", dataset="synthetic", epochs=1, init=str(float_ckpt), alpha_data="heldout",
                       budget_bitops=0.25, allow_diagnostics=True)
    net, init, _ = prepare(cfg, search_data(2, 8))
    ck = torch.load(float_ckpt, weights_only=True)
    assert init["init"] == "float" and init["checkpoint"] == str(float_ckpt)
    assert torch.equal(net.model.get_submodule("conv2").weight, ck["model"]["conv2.weight"])
    res = run_search(cfg, search_data(2, 8), tmp_path / "p", tmp_path / "r")
    assert res.policy.provenance["supernet_init"]["init"] == "float"
    assert res.policy.provenance["config"]["alpha_data"] == "heldout"


def test_failed_diagnostics_stop_the_search_until_allowed(tmp_path):
    from asga_deploy.search.run import SearchDiagnosticError

    # a logit learning rate of 0: the logits never leave their start, whatever the loss says
    cfg = SearchConfig(model="tinynet", dataset="synthetic", epochs=1, alpha_lr=0.0, budget_bitops=0.25)
    with pytest.raises(SearchDiagnosticError, match="alpha_did_not_move.*--resume --allow-diagnostics"):
        run_search(cfg, search_data(2, 8), tmp_path / "p", tmp_path / "r")
    assert not (tmp_path / "p").exists() and (tmp_path / "r/checkpoint.pt").is_file()
    allowed = SearchConfig(**{**cfg.__dict__, "allow_diagnostics": True})
    res = run_search(allowed, search_data(2, 8), tmp_path / "p", tmp_path / "r", resume=True)
    assert res.metrics["alpha_did_not_move"] is True and res.metrics["alpha_still_fraction"] == 1.0
    assert res.metrics["allow_diagnostics"] is True and "alpha_did_not_move" in res.metrics["diagnostics_failed"]
    assert res.policy_path.is_file()


def test_cli_defaults_are_the_config_defaults():
    """Every `asga search` option that sets a SearchConfig field defaults to that field's default."""
    import dataclasses

    import typer

    from asga_deploy.cli.search_cmd import search

    fields = {f.name: f.default for f in dataclasses.fields(SearchConfig) if f.default is not dataclasses.MISSING}
    aliases = {"lam": "lam", "float_ckpt": None, "no_replace": None}
    checked = 0
    for name, p in __import__("inspect").signature(search).parameters.items():
        key = aliases.get(name, name)
        if key in fields and isinstance(p.default, typer.models.OptionInfo):
            default = p.default.default
            want = fields[key]
            if isinstance(want, tuple):
                default = tuple(int(b) for b in str(default).split(","))
            assert default == want, f"--{name.replace('_', '-')}: CLI {default!r} vs SearchConfig {want!r}"
            checked += 1
    assert checked >= 25


def test_float_init_that_never_saw_the_proxy(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = "fake:train=96,test=32,size=12"
    res = cli("train", "--model", "tinynet", "--dataset", data, "--epochs", "1", "--batch-size", "32",
              "--exclude-proxy", "40", "--proxy-seed", "3", "--run", "fl", "--device", "cpu")
    assert res.exit_code == 0, res.stderr
    ck = torch.load(tmp_path / "export/fl/float.pt", weights_only=True)
    assert ck["excluded_proxy"]["size"] == 40 and ck["metrics"]["history"][0]["train_top1"] >= 0
    args = ["search", "--model", "tinynet", "--dataset", data, "--subset", "40", "--batch-size", "20",
            "--epochs", "1", "--budget-bitops", "0.25", "--allow-diagnostics", "--float", "export/fl/float.pt"]
    assert cli(*args, "--proxy-seed", "3").exit_code == 0
    pol = Policy.load(next((tmp_path / "policies").glob("*.json")))
    assert pol.provenance["supernet_init"]["proxy_excluded_from_float"] is True
    assert cli(*args, "--proxy-seed", "4", "--force").exit_code == 0  # another proxy: the float model saw it
    pol = Policy.load(next((tmp_path / "policies").glob("*.json")))
    assert pol.provenance["supernet_init"]["proxy_excluded_from_float"] is False
