"""The whole chain (train -> search -> finetune -> export -> latency -> report) on a tiny model and fake data."""

import json

from asga_deploy.demo import DemoConfig, run_demo


def test_demo_chain_runs_and_reuses_results(tmp_path):
    cfg = DemoConfig(model="tinynet", dataset="fake:classes=4,size=16,chans=1,train=96,test=48",
                     budget_bitops=0.125, proxy_size=32, train_epochs=1, search_epochs=1, finetune_epochs=1,
                     parity_images=48, latency_batches=(2,), latency_rounds=1, latency_iters=2,
                     out_dir=str(tmp_path / "demo"))
    s = run_demo(cfg)
    labels = [r["label"] for r in s["rows"]]
    assert labels[0] == "ASGA" and "W7A8" in labels and {"W4A2", "W2A4"} <= set(labels)  # ort: 7-bit weights
    for r in s["rows"]:
        assert r["parity_agreement"] >= 0.995
        if r["label"] != "W7A8":
            assert 0.97 * 0.125 <= r["bitops_vs_w8a8"] <= 0.125
    assert (tmp_path / "demo" / "report.md").read_text().count("|") > 20
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["float"]["top1"] == s["float"]["top1"]
    again = run_demo(cfg)  # every step reused: same numbers, much faster
    assert [r["top1"] for r in again["rows"]] == [r["top1"] for r in s["rows"]]
    assert again["times"]["total_s"] < s["times"]["total_s"]
