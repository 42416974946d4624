"""Measured latency tables (asga lut) on tiny models with a fake timer: every key, the cache key, the rest term,
the file round trip, predict_latency, the TensorRT graphs' static check, and float layers in the middle of a
policy exported on integer kernels."""

from __future__ import annotations

import copy
import itertools
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

from asga_deploy.cost import CostTable  # noqa: E402
from asga_deploy.lut import build, measure  # noqa: E402
from asga_deploy.lut.build import LutConfig, run_lut  # noqa: E402
from asga_deploy.lut.table import LatencyTable, LutError, load_lut, predict_latency  # noqa: E402
from asga_deploy.policy import LayerBits, Policy, costs_at, uniform_policy  # noqa: E402
from asga_deploy.targets import get_target  # noqa: E402

LAYERS = ("conv1", "conv2", "conv3", "fc")  # tinynet
INT8 = {"conv1": 0.30, "conv2": 0.20, "conv3": 0.10, "fc": 0.05}
OVERHEAD, TRANSPOSE, REST = 0.01, 0.02, 0.40
# a world where a float layer costs CORE plus SIDE for each of its two sides that faces a quantized neighbour (a
# searched int8 layer, or nothing searched: the input, pooling): tinynet is the chain conv1 -> conv2 -> conv3 | fc
CORE, SIDE = 0.5, 0.15
SUCC = {"conv1": ["conv2"], "conv2": ["conv3"], "conv3": [], "fc": []}
PRED = {"conv1": [], "conv2": ["conv1"], "conv3": ["conv2"], "fc": []}
ALTERNATING = {"whole|alt_float": {"conv2", "fc"}, "whole|float_even": {"conv1", "conv3"}}


def world(floats: set, requant: bool = False) -> float:
    """The whole model's time with these layers float (the rest int8, or requantized)."""
    ms = REST + sum(INT8.values()) + (0.05 * (len(INT8) - len(floats)) if requant else 0.0)
    for n in floats:
        sides = [not nb or any(m not in floats for m in nb) for nb in (PRED[n], SUCC[n])]
        ms += CORE + SIDE * sum(sides)
    return ms


WHOLE_FLOAT = world(set(LAYERS))


def fake_median_times(units, batch, cfg, callback=None, sequences=None):
    """Deterministic times by key: int8 units INT8 + their transposes, requant +0.05, float islands x3; every whole
    model (island variants, the int8 / 4-bit / float / alternating models) as `world` says."""
    out = {}
    for seq, keys in (sequences or {}).items():
        for k in keys:
            kernel, layer = k.split("|", 1)
            base = INT8[layer] + OVERHEAD
            ms = {"int8": base, "requant": base + 0.05, "float": 3 * base}[kernel]
            out[f"{seq}/{k}"] = {"median_ms": ms, "p10_ms": ms, "p90_ms": ms, "runs": 1}
    for k in units:
        if any(k in s for s in (sequences or {}).values()):
            continue
        kind, *layers = k.split("|")
        if k == "overhead":
            ms = OVERHEAD
        elif kind == "transpose":
            ms = OVERHEAD + TRANSPOSE
        elif kind in ("island", "islandR"):
            ms = world(set(layers), kind == "islandR")
        elif kind == "islandF":
            ms = world(set(LAYERS) - set(layers))
        elif k in ALTERNATING:
            ms = world(ALTERNATING[k])
        elif kind == "random":
            ms = world(set(layers))
        else:
            ms = {"whole|int8": world(set()), "whole|requant": world(set(), True)}.get(k, WHOLE_FLOAT)
        out[k] = {"median_ms": ms, "p10_ms": ms, "p90_ms": ms, "runs": 1}
    return out


@pytest.fixture
def fake_timer(monkeypatch):
    calls = []

    def timer(*args, **kwargs):
        calls.append(args[0])
        return fake_median_times(*args, **kwargs)

    monkeypatch.setattr(measure, "median_times", timer)
    return calls


@pytest.fixture(scope="module")
def tiny_table(tmp_path_factory):
    """A tinynet table built once with the fake timer (the graphs, cuts and transposes are real)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(measure, "median_times", fake_median_times)
    try:
        out = tmp_path_factory.mktemp("lut") / "tiny.json"
        return run_lut(LutConfig("tinynet", "ort", 2, threads=1, out=str(out), rounds=1))
    finally:
        mp.undo()


def test_table_has_every_key_of_the_target(tiny_table):
    ort = get_target("ort")
    assert tiny_table.layers == list(LAYERS)
    for n, row in tiny_table.lut.items():
        signed = tiny_table.data["layer_info"][n]["input_signed"]
        want = {f"w{w}a{a}" for w in ort.weight_bits for a in ort.act_bits(signed)} | {"w8a8", "float"}
        assert set(row) == want, n
        assert all(math.isfinite(v) for v in row.values())


def test_entries_follow_the_kernels_and_the_rest_term_closes_the_int8_model(tiny_table):
    d = tiny_table.data
    for n in LAYERS:
        k = d["kernels"][n]
        row = tiny_table.lut[n]
        assert row["w8a8"] == row["w7a8"] == k["int8"]
        assert row["w4a4"] == row["w2a7"] == k["requant"]
        assert row["float"] == k["float"]
        n_tr, n_req = (len(d["unit_transposes"][f"{u}|{n}"]) for u in ("int8", "requant"))
        assert k["int8"] == pytest.approx(INT8[n] - n_tr * TRANSPOSE)  # the boundary Transposes come off
        rho = d["requant_layout_share"]  # the share of them the measured 4-bit model keeps
        assert k["requant"] == pytest.approx(INT8[n] + 0.05 - (1 - rho) * n_req * TRANSPOSE)
        assert k["float_int8_anchored"] == pytest.approx(k["float_unit"] + k["transition"])
        assert k["transition"] == pytest.approx(d["transition_share"] * k["transition_alone"])
        w = d["anchor_mix"]
        assert k["float"] == pytest.approx(k["int8"] + w * (k["float_int8_anchored"] - k["int8"])
                                           + (1 - w) * k["float_anchored_step"])
        assert k["float_island_step"] == pytest.approx(k["float_int8_anchored"] - k["int8"])
    assert any(d["unit_transposes"].values())  # ORT changes layout around integer convs
    whole = d["reference_ms"]["w8a8"]
    assert tiny_table.rest_ms == pytest.approx(whole - sum(d["kernels"][n]["int8"] for n in LAYERS))
    assert predict_latency(tiny_table, uniform_policy("tinynet", 8, 8, "ort")) == pytest.approx(whole)
    four = REST + sum(INT8.values()) + 0.05 * len(INT8)  # the 4-bit model comes out as measured, too
    assert predict_latency(tiny_table, _policy({n: (7, 4) for n in LAYERS})) == pytest.approx(four)


def test_float_pairs_get_an_edge_and_the_check_is_recorded(tiny_table):
    edges = tiny_table.edges
    assert [(e["from"], e["to"]) for e in edges] == [("conv1", "conv2"), ("conv2", "conv3")]
    for e in edges:  # a float pair shares the side between them: 2 x SIDE less than two islands
        assert e["ms"] == pytest.approx(-2 * SIDE)
    checks = tiny_table.data["rest_check"]
    assert {"every layer float", "every other layer float (module order)"} <= set(checks)
    assert checks["every layer float"]["measured_ms"] == WHOLE_FLOAT
    # independent checks: whole models with 25% / 50% of the layers float at seeded random places
    randoms = {k: v for k, v in checks.items() if "at random" in k}
    assert len(randoms) == 2 and all(v["independent"] for v in randoms.values())
    for key in tiny_table.data["units"]:
        if key.startswith("random|"):
            assert set(key.split("|")[1:]) <= set(LAYERS)
    for v in randoms.values():  # the side model is exact in this world of core + per-side costs
        assert v["ratio"] == pytest.approx(1.0)


def test_float_layers_cost_their_core_and_the_sides_that_face_quantized_neighbours(tiny_table):
    """In a world of core + per-side costs, the table recovers the side model from the islands: the int8, the
    every-layer-float and both alternating models, and float pairs, come out as measured; the search's additive
    entries still close both anchor models."""
    d = tiny_table.data
    assert d["transition_share"] == pytest.approx(1.0)
    assert d["kernels"]["conv2"]["float_side_saving"] == pytest.approx(SIDE)
    for floats in [set(), set(LAYERS), *ALTERNATING.values(), {"conv1", "conv2"}, {"conv2", "conv3", "fc"}]:
        policy = _policy({n: None if n in floats else (7, 8) for n in LAYERS})
        assert predict_latency(tiny_table, policy) == pytest.approx(world(floats)), floats
    additive = tiny_table.rest_ms + sum(tiny_table.lut[n]["float"] for n in LAYERS)
    assert additive == pytest.approx(WHOLE_FLOAT)  # the anchor mix closes the float model for the search too


CHOICES = {"int8": (7, 8), "requant": (4, 4), "float": (32, 32)}


def _side_priced(tiny_table, counted, fixed=None) -> CostTable:
    from asga_deploy.cost import PairTerm
    from asga_deploy.lut.model import search_terms
    from asga_deploy.models import create_model

    lut, pairs = search_terms(tiny_table.data)
    costs = costs_at(create_model("tinynet", 10, 1), (1, 28, 28), "tinynet")
    return CostTable(costs, counted, fixed, lut, tiny_table.rest_ms, tuple(PairTerm.from_dict(p) for p in pairs))


def test_the_search_prices_every_policy_as_the_side_model_does(tiny_table):
    """The search's cost (entries at the island price + pair terms of neighbours) equals predict_latency for every
    int8 / requantized / float policy of the chain, with every layer counted and with fixed edge layers."""
    table = _side_priced(tiny_table, LAYERS)
    assert table.counted_pairs()  # float neighbours, and a float layer before a requantized one
    for kinds in itertools.product(CHOICES, repeat=len(LAYERS)):
        bits = {n: CHOICES[k] for n, k in zip(LAYERS, kinds, strict=True)}
        policy = _policy({n: None if b == CHOICES["float"] else b for n, b in bits.items()})
        got = (table.constant("latency") + table.total("latency", bits)) / 1e6
        assert got == pytest.approx(predict_latency(tiny_table, policy), abs=1e-5), kinds
    for edge in ("int8", "float"):  # the pairs with a fixed layer move into the counted layer's unit cost
        fixed = {"conv1": CHOICES[edge], "fc": CHOICES["int8"]}
        table = _side_priced(tiny_table, ("conv2", "conv3"), fixed)
        for k2, k3 in itertools.product(CHOICES, repeat=2):
            bits = {"conv2": CHOICES[k2], "conv3": CHOICES[k3]}
            policy = _policy({n: None if b == CHOICES["float"] else b for n, b in (fixed | bits).items()})
            got = (table.constant("latency") + table.total("latency", bits)) / 1e6
            assert got == pytest.approx(predict_latency(tiny_table, policy), abs=1e-5), (edge, k2, k3)


def test_the_extraction_with_pair_terms_equals_brute_force(tiny_table):
    """Budget.solve with the side model's pair terms (an integer program with their products) finds the best
    policy under latency bounds, as enumerating every policy does."""
    import numpy as np

    from asga_deploy.budget import Budget, parse_latency

    table = _side_priced(tiny_table, LAYERS)
    options = {n: list(CHOICES.values()) for n in LAYERS}
    rng = np.random.default_rng(0)
    everything = [dict(zip(LAYERS, c, strict=True)) for c in itertools.product(CHOICES.values(), repeat=len(LAYERS))]
    whole = [(table.constant("latency") + table.total("latency", b)) / 1e6 for b in everything]
    for trial in range(6):
        values = {n: rng.normal(size=3) for n in LAYERS}
        bound = float(np.quantile(whole, 0.2 + 0.12 * trial))
        budget = Budget((parse_latency(f"{bound:.6f}ms"),))
        choice, info = budget.solve(table, options, values)
        assert info["method"] == "milp"

        def value(b, values=values):
            return sum(values[n][list(CHOICES.values()).index(b[n])] for n in LAYERS)

        feasible = [b for b in everything if budget.meets(table, b)]
        assert budget.meets(table, choice) and len(feasible) < len(everything)  # the bound binds
        assert value(choice) == pytest.approx(max(value(b) for b in feasible)), trial


def test_the_file_round_trips_and_feeds_a_cost_table(tiny_table):
    again = load_lut(tiny_table.path)
    assert again.lut == tiny_table.lut and again.rest_ms == tiny_table.rest_ms and again.edges == tiny_table.edges
    assert again.data["schema"] == "asga-lut/1" and Path(tiny_table.path).with_suffix(".png").is_file()
    lut, rest = again.cost_inputs()
    from asga_deploy.models import create_model

    costs = costs_at(create_model("tinynet", 10, 1), (1, 28, 28), "tinynet")
    table = CostTable(costs, ("conv2", "conv3"), {"conv1": (7, 8), "fc": (7, 8)}, lut, rest)
    assert table.unit_cost("latency", "conv2", 4, 4) == round(lut["conv2"]["w4a4"] * 1e6)
    assert table.constant("latency") == round(lut["conv1"]["w7a8"] * 1e6) + round(lut["fc"]["w7a8"] * 1e6) + round(
        rest * 1e6)
    with pytest.raises(LutError, match="other settings"):
        load_lut(tiny_table.path, expect={"batch": 64})


def test_a_table_written_before_the_requantized_island_entry_predicts_the_same(tiny_table, tmp_path):
    """Format-2 tables measured before `float_island_step_requant` existed (the latency front's batch-32 table)
    raised KeyError for a float layer whose successors all requantize; loading derives it by the same formula."""
    d = json.loads(Path(tiny_table.path).read_text())
    for k in d["kernels"].values():
        del k["float_island_step_requant"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(d))
    policy = _policy({"conv1": (7, 8), "conv2": None, "conv3": (4, 4), "fc": (4, 4)})  # float before requant
    assert predict_latency(load_lut(old), policy) == pytest.approx(predict_latency(tiny_table, policy))
    from asga_deploy.lut.model import search_terms  # the search reads the raw file: the same pair terms

    assert search_terms(json.loads(old.read_text())) == search_terms(tiny_table.data)


def test_a_broken_file_is_a_one_line_lut_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "asga-lut/1", "key": {}, "layers": {"a": {"float": "x"}}}))
    with pytest.raises(LutError, match="malformed"):
        load_lut(bad)
    with pytest.raises(LutError, match="does not exist"):
        load_lut(tmp_path / "missing.json")


def test_cache_key_changes_with_threads_isa_and_batch(monkeypatch, tmp_path):
    from asga_deploy.export import ort as export_ort

    target = get_target("ort")
    shape = (1, 28, 28)
    base = LutConfig("tinynet", "ort", 1, threads=1)
    paths = {}
    k1 = build.table_key(base, target, shape, 1)
    assert build.table_key(base, target, shape, 2) != k1
    assert build.table_key(LutConfig("tinynet", "ort", 32), target, shape, 1) != k1
    assert build.table_key(base, target, (1, 32, 32), 1) != k1
    for kind in ("VNNI", "AVX2, no VNNI"):
        monkeypatch.setattr(export_ort, "cpu_isa", lambda kind=kind: {"kind": kind})
        paths[kind] = build.default_path(build.table_key(base, target, shape, 1))
    assert paths["VNNI"] != paths["AVX2, no VNNI"]
    assert "tinynet-ort-b1-1x28x28-t1-vnni-ort" in paths["VNNI"].name


def test_a_cached_table_is_reused_unless_forced(fake_timer, tmp_path):
    cfg = LutConfig("tinynet", "ort", 1, threads=1, out=str(tmp_path / "t.json"), rounds=1)
    first = run_lut(cfg)
    n = len(fake_timer)
    again = run_lut(cfg)
    assert len(fake_timer) == n and again.data.get("cached") and again.lut == first.lut
    run_lut(cfg, force=True)
    assert len(fake_timer) == 2 * n


def _policy(choices: dict) -> Policy:
    layers = {n: LayerBits(*c, False) for n, c in choices.items() if c is not None}
    return Policy("tinynet", "ort", layers, [n for n, c in choices.items() if c is None])


def test_predict_latency_sums_rest_layers_and_float_pair_edges():
    lut = {"a": {"w4a4": 1.0, "w7a8": 2.0, "float": 5.0}, "b": {"w4a4": 0.5, "w7a8": 1.5, "float": 4.0},
           "c": {"w4a4": 0.25, "w7a8": 0.75, "float": 3.0}}
    table = LatencyTable({"model": "tinynet"}, lut, 10.0, [{"from": "a", "to": "b", "ms": -0.5}])
    assert predict_latency(table, _policy({"a": (4, 4), "b": (7, 8), "c": None})) == pytest.approx(10 + 1 + 1.5 + 3)
    assert predict_latency(table, _policy({"a": None, "b": (4, 4), "c": (4, 4)})) == pytest.approx(10 + 5 + 0.75)
    assert predict_latency(table, _policy({"a": None, "b": None, "c": None})) == pytest.approx(10 + 12 - 0.5)
    from asga_deploy.errors import PolicyError

    with pytest.raises(PolicyError, match="not in the policy: c"):
        predict_latency(table, _policy({"a": (4, 4), "b": (4, 4)}))
    with pytest.raises(PolicyError, match="no entry for a"):
        predict_latency(table, _policy({"a": (2, 2), "b": (4, 4), "c": (4, 4)}))


def test_tensorrt_is_refused_in_one_line_without_it(cli, one_error_line):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed")
    except ImportError:
        pass
    line = one_error_line(cli("lut", "tinynet", "--target", "tensorrt"))
    assert "TensorRT is not installed" in line


def test_the_tensorrt_graphs_pass_the_static_check():
    from asga_deploy.lut.trt import trt_graphs

    graphs, costs = trt_graphs("tinynet", get_target("tensorrt"), (1, 28, 28), 10)
    assert set(graphs) == {"int8", "requant", "float"} and list(costs) == list(LAYERS)
    halves = {i.name for i in graphs["float"].graph.initializer if i.name.endswith(".weight.fp16")}
    assert halves == {f"{n}.weight.fp16" for n in LAYERS}


def test_lut_cli_prints_the_table(cli, fake_timer, tmp_path):
    out = tmp_path / "cli.json"
    r = cli("lut", "tinynet", "--batch-size", "2", "--threads", "1", "--rounds", "1", "--out", str(out))
    assert r.exit_code == 0, r.stderr
    assert "conv2" in r.stdout and "rest of the graph" in r.stdout and out.is_file()
    r = cli("lut", "tinynet", "--batch-size", "0")
    assert r.exit_code == 2


def test_bad_lut_inputs_fail_in_one_line(cli, one_error_line, tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "other.json").write_text("{}")
    assert "unknown model" in one_error_line(cli("lut", "nosuchnet"))
    assert "unknown target" in one_error_line(cli("lut", "tinynet", "--target", "nope"))
    assert "afile is a file" in one_error_line(cli("lut", "tinynet", "--out", tmp_path / "afile" / "t.json"))
    assert "not a latency table" in one_error_line(cli("lut", "tinynet", "--out", tmp_path / "other.json"))
    assert (tmp_path / "other.json").read_text() == "{}" and not list(tmp_path.glob("*.png"))


def test_export_times_a_latency_budgeted_policy_against_its_budget(tiny_table, tmp_path, monkeypatch):
    """A policy that records a latency budget and its table: `asga export` times the model as the table was
    measured (its batch and threads) and reports measured, predicted and budget side by side."""
    from asga_deploy.export.run import ExportConfig, run_export
    from asga_deploy.lut import check

    monkeypatch.setattr(check, "STATE_WAIT_S", 0.0)  # the fake table's times are not this machine's: no waiting

    from .test_export_helpers import make_checkpoint

    pol = uniform_policy("tinynet", 4, 4, "ort")
    predicted = predict_latency(tiny_table, pol)
    pol.provenance["metrics"] = {"latency": {"predicted_ms": predicted, "budget_ms": 1e3, "lut": tiny_table.path}}
    ppath, cpath, _ = make_checkpoint(tmp_path, "tinynet", 4, 4, "ort", policy=pol)
    rep = run_export(ExportConfig(str(ppath), str(cpath), out_dir=str(tmp_path / "x"), latency_seconds=0.2))
    lb = rep["latency_budget"]
    assert lb["status"] == "measured" and lb["batch"] == 2 and lb["threads"] == 1 and lb["runs"] >= 10
    assert lb["predicted_ms"] == pytest.approx(predicted) and lb["meets_budget"] is True and lb["measured_ms"] > 0
    st = lb["machine_state"]  # the table's W8A8 model timed again beside it (the fake table's time is 0.6 ms)
    assert st["w8a8_table_ms"] == tiny_table.reference_ms["w8a8"] and st["w8a8_now_ms"] > 0
    assert st["ratio"] == pytest.approx(st["w8a8_now_ms"] / st["w8a8_table_ms"])
    assert st["same_state"] == (abs(st["ratio"] - 1) <= 0.1)
    assert json.loads((tmp_path / "x" / "report.json").read_text())["latency_budget"]["budget_ms"] == 1e3
    gone = copy.deepcopy(pol)  # the table moved away: exported, and the report says why it was not timed
    gone.provenance["metrics"]["latency"]["lut"] = str(tmp_path / "missing.json")
    ppath, cpath, _ = make_checkpoint(tmp_path / "g", "tinynet", 4, 4, "ort", policy=gone)
    rep = run_export(ExportConfig(str(ppath), str(cpath), out_dir=str(tmp_path / "y"), latency_seconds=0.2))
    assert rep["latency_budget"]["status"].startswith("not measured") and "missing.json" in rep["latency_budget"]["status"]


def test_export_says_when_the_machine_is_not_in_the_tables_state(tiny_table, tmp_path, monkeypatch):
    """The table's own W8A8 model is timed beside the export: 1.3x its table time means the machine runs in another
    state than the table describes; the export times again (it often passes) and keeps every attempt, and the CLI
    says so next to the measured latency when the state stays off (not at 1.0x, not once it came back)."""
    from typer.testing import CliRunner

    from asga_deploy.cli import app
    from asga_deploy.lut import check

    from .test_export_helpers import make_checkpoint

    monkeypatch.setattr(check, "STATE_WAIT_S", 0.0)
    pol = uniform_policy("tinynet", 4, 4, "ort")
    pol.provenance["metrics"] = {"latency": {"predicted_ms": 1.0, "budget_ms": 1e3, "lut": tiny_table.path}}
    ppath, cpath, _ = make_checkpoint(tmp_path, "tinynet", 4, 4, "ort", policy=pol)
    ref = tiny_table.reference_ms["w8a8"]
    for states, out in (([1.0], "same"), ([1.3, 1.3, 1.3], "slow"), ([1.3, 0.95], "back")):
        seen = iter(states)

        def timer(units, batch, cfg, callback=None, sequences=None, seen=seen):
            assert set(units) == {"exported", "whole|int8"} and batch == 2 and cfg.threads == 1
            slow = next(seen)
            return {"exported": {"median_ms": 0.9 * slow, "runs": 10},
                    "whole|int8": {"median_ms": slow * ref, "runs": 10}}

        monkeypatch.setattr(measure, "median_times", timer)
        r = CliRunner().invoke(app, ["export", str(ppath), "--checkpoint", str(cpath), "--out", str(tmp_path / out),
                                     "--parity-images", "32"])
        assert r.exit_code == 0, r.output
        assert next(seen, None) is None  # timed once in the table's state, up to three times outside it
        lb = json.loads((tmp_path / out / "report.json").read_text())["latency_budget"]
        st = lb["machine_state"]
        assert st["ratio"] == pytest.approx(states[-1]) and st["same_state"] == (states[-1] != 1.3)
        assert [a["state_ratio"] for a in lb["attempts"]] == pytest.approx(states)
        assert lb["measured_ms"] == pytest.approx(0.9 * states[-1])
        assert ("machine state" in r.output and "1.30x its table time" in " ".join(r.output.split())) == (out == "slow")

    def broken(*args, **kwargs):
        raise measure.MeasureError("the timing process failed (exit 1): boom")

    monkeypatch.setattr(measure, "median_times", broken)  # the export stands; the report says why it was not timed
    r = CliRunner().invoke(app, ["export", str(ppath), "--checkpoint", str(cpath), "--out", str(tmp_path / "broken"),
                                 "--parity-images", "32"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "broken" / "model.qdq.onnx").is_file()
    rep = json.loads((tmp_path / "broken" / "report.json").read_text())["latency_budget"]
    assert rep["status"].startswith("not measured") and "boom" in rep["status"]


def test_island_deltas_are_paired_by_round():
    """Load that drifts between rounds, and a round where only the reference was slow, must not shift the delta of
    every variant timed with that reference (the difference of medians would say -3.5 here)."""
    from asga_deploy.lut.build import paired_delta

    ref = {"median_ms": 14.0, "per_round_ms": [10.0, 10.0, 14.0, 14.0, 14.0]}
    var = {"median_ms": 10.5, "per_round_ms": [10.5, 10.5, 10.5, 14.5, 14.5]}  # +0.5 but in round 3
    assert paired_delta(var, ref) == pytest.approx(0.5)
    assert paired_delta({"median_ms": 3.0}, {"median_ms": 2.0}) == pytest.approx(1.0)  # no rounds: the medians


def test_a_table_timed_while_other_processes_ran_records_it_and_warns(tmp_path, fake_timer, monkeypatch):
    """Small units suffer more from a loaded machine than whole models (a MobileNetV2 table timed beside another
    job had its units 2.8x slow and failed its own checks): the share of the CPU that other processes took is
    recorded in the table and a share above measure.OTHERS_MAX is reported."""
    events = []
    monkeypatch.setattr(measure, "others_share", lambda start: 0.4)
    t = run_lut(LutConfig("tinynet", "ort", 2, threads=1, out=str(tmp_path / "t.json"), rounds=1),
                callback=events.append)
    assert t.data["timing"]["others_cpu_share"] == 0.4
    assert any("other processes took 40%" in e.message and "quiet machine" in e.message for e in events)


def test_the_cpu_share_of_other_processes_counts_an_unwaited_child():
    """others_share: CPU time of processes other than this one and its waited children, over wall x cores."""
    import os
    import subprocess
    import sys
    import time

    start = measure.cpu_clock()
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                              "while time.process_time() - t < 0.5: pass"])
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: not yet in RUSAGE_CHILDREN
    share = measure.others_share(start)
    wall = time.perf_counter() - start[0]
    child.wait()
    assert share >= 0.8 * 0.5 / (wall * (os.cpu_count() or 1))  # at least the child's 0.5 CPU s (others add)
