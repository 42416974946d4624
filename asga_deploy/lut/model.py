"""The latency model: how the measured times combine into a table, and a whole model's predicted latency.

    T(policy) = rest + sum over layers L of entry_L(kernel of L's choice)                  (the additive entries)
    float layer in predict(): int8_L + island step_L - side saving_L x (its sides that face float neighbours)
    the search (search_terms): the float entry at int8 + island step, plus pair terms of neighbours = predict()

A float layer's cost depends on its neighbours (an island among int8 layers pays the layout changes and Q/DQ on
both sides, a layer inside a float chain on neither), which an additive table cannot say: the additive entries
mix both anchors in the float entry so that the int8 and the every-layer-float models come out exact (what a
table without the side model prices with); `predict` (predict_latency, the checks) and the search
(search_terms, pair terms) use the side model.

Each layer's units run in sequences (worker.py): all layers' int8 units one after the other in model order,
then their requantized units, then their float islands, so that every unit finds the caches as the layers
before it leave them in the whole model of that kind. From their medians:

    int8, requant   unit - session cost (the overhead unit) - the Transposes ORT puts at its boundaries (in the
                    whole model consecutive integer layers stay NHWC, with no Transpose between them); requant
                    + rho x those Transposes, rho the share that remains in the measured 4-bit model (an Add's
                    output requantized as DequantizeLinear -> Clip -> QuantizeLinear runs in NCHW)
    float           int8 + w x (int8-anchored step) + (1 - w) x (float-anchored step):
                    int8-anchored = float_unit + kappa x transition_alone - int8: float_unit = island unit -
                    session cost + its neighbours' boundary Transposes; transition_alone = (the int8 model with
                    this one layer float - the int8 model) - (float_unit - int8 entry), what the island does to its
                    neighbours when it is alone; kappa the share of it that remains when float layers are spread
                    over the model (fitted on the two models with every other layer float);
                    float-anchored = the every-layer-float model - the same with this one layer int8;
                    w (anchor_mix) such that the every-layer-float model comes out as measured.
                    (tables before format 2 also had `float_before_requant`, the island measured in the 4-bit
                    model, used when every layer right after it requantizes; now `float_island_step_requant`)
    edge (a, b)     (the int8 model with a and b float) - (with a float) - (with b float) + the int8 model:
                    two float layers in a row skip the Q/DQ and layout changes between them (recorded; the side
                    model below accounts for it per side)
    rest            the int8 whole model - the sum of its layers' int8 entries (input quantization, residual
                    Adds, pooling, one session cost)

Why the float entry is measured in place: a float layer between integer ones changes the layout of what is
around it (NCHW Conv vs NHWC QLinearConv: ORT adds Transposes, and runs a residual QLinearAdd in NCHW with
Transposes on its other input and output). Measured on ResNet-18 at batch 1 (VNNI EPYC, 2 threads): every
other layer float spent 1.17 ms of 7.7 ms in 19 Transposes (45 us in the int8 model), and the island units
with their own boundary Transposes predicted 15% less than measured.
"""

from __future__ import annotations

from collections.abc import Mapping


def kernel_of(choice: str, act_bits_max: int = 8) -> str:
    """Return the kernel a choice key runs: "float", "int8" (activations at the top bits) or "requant"."""
    if choice == "float":
        return "float"
    return "int8" if choice == "w8a8" or choice.endswith(f"a{act_bits_max}") else "requant"


def entry_key(layer: str, kernels: Mapping[str, str], successors: Mapping[str, list[str]] | None) -> str:
    """Return which entry of a layer a policy uses: its kernel's, and for a float layer whose every successor is
    requantized (activations below 8 bits) the float entry measured before requantized layers."""
    k = kernels[layer]
    after = (successors or {}).get(layer) or []
    if k == "float" and after and all(kernels.get(m) == "requant" for m in after):
        return "float_before_requant"
    return k


def predecessors(successors: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """Return {layer: the searched layers that feed it directly} from {layer: the ones it feeds directly}."""
    out: dict[str, list[str]] = {n: [] for n in successors}
    for n, after in successors.items():
        for m in after:
            out.setdefault(m, []).append(n)
    return out


def float_step(layer: str, entry: Mapping[str, float], kernels: Mapping[str, str], successors: Mapping[str, list[str]],
               before: Mapping[str, list[str]]) -> float:
    """Return what a float layer costs over its int8 entry: its step as an island among quantized layers (measured
    in the 4-bit model when every layer after it requantizes: entry_key), less its side saving for each side
    (input, output) whose direct neighbours are float (by the share that are)."""
    saved = 0.0
    for nb in (before.get(layer) or [], successors.get(layer) or []):
        if nb:
            saved += sum(kernels[m] == "float" for m in nb) / len(nb)
    island = entry["float_island_step" if entry_key(layer, kernels, successors) == "float"
                   else "float_island_step_requant"]
    return island - entry["float_side_saving"] * saved


def island_step_requant(k: Mapping[str, float], kappa: float) -> float:
    """Return a float layer's island step where every layer after it requantizes (measured in the 4-bit model)."""
    return k["float_island_step"] + kappa * (k["transition_alone_requant"] - k["transition_alone"])


def complete_kernels(kernels: dict, kappa: float | None) -> dict:
    """Return the kernels of a format-2 table with `float_island_step_requant` where a table written before that
    entry lacks it (the same formula as combine())."""
    return {n: k if "float_side_saving" not in k or "float_island_step_requant" in k or kappa is None else
            {**k, "float_island_step_requant": island_step_requant(k, float(kappa))} for n, k in kernels.items()}


def predict(entries: Mapping[str, Mapping[str, float]], rest_ms: float, edges: list[dict],
            kernels: Mapping[str, str], successors: Mapping[str, list[str]] | None = None) -> float:
    """Return the latency (ms) of {layer: kernel}: rest + each layer's entry.

    Tables with both anchors (`float_side_saving` entries): a float layer costs int8 + float_step (its island step
    less a saving per side that faces float neighbours); older tables: the entry (entry_key) + the edges of
    float pairs."""
    if successors is not None and all("float_side_saving" in entries[n] for n in kernels):
        before = predecessors(successors)
        return rest_ms + sum(entries[n][k] if k != "float" else
                             entries[n]["int8"] + float_step(n, entries[n], kernels, successors, before)
                             for n, k in kernels.items())
    total = rest_ms + sum(entries[n][entry_key(n, kernels, successors)] for n in kernels)
    return total + sum(e["ms"] for e in edges if kernels[e["from"]] == "float" and kernels[e["to"]] == "float")


def sharing(kernels: dict, t: dict, alternating: dict[str, list[str]]) -> float:
    """Return the share (0..1) of a float island's layout changes that remain when float layers are spread over the
    model: measured on the models with every other layer float (each float layer an island, neighbouring islands
    sharing the Transposes between them) as (their time - the int8 model - their islands' own units) / (the sum of
    their islands' layout changes measured alone)."""
    excess = alone = 0.0
    for key, floats in alternating.items():
        excess += t[key] - t["whole|int8"] - sum(kernels[n]["float_unit"] - kernels[n]["int8"] for n in floats)
        alone += sum(kernels[n]["transition_alone"] for n in floats)
    return min(max(excess / alone, 0.0), 1.0) if alone > 0 else 1.0


def anchor_mix(kernels: dict, float_minus_int8: float) -> float:
    """Return w in [0, 1] for the search's additive float entries: int8 + w x the island step (its float island in
    the int8 model) + (1 - w) x the float-anchored step (what its int8 island saves in the every-layer-float
    model), w such that the every-layer-float model comes out as measured (islands alone count the layout changes
    and Q/DQ around them once per layer; along a chain of float layers most of those are gone: on resnet20-w0.5
    at batch 32 the islands' sum predicted the float model 1.43x high)."""
    s_int8 = sum(k["float_int8_anchored"] - k["int8"] for k in kernels.values())
    s_float = sum(k["float_anchored_step"] for k in kernels.values())
    if abs(s_int8 - s_float) < 1e-12:
        return 1.0
    return min(max((float_minus_int8 - s_float) / (s_int8 - s_float), 0.0), 1.0)


def combine(times: dict[str, dict], info: dict) -> dict:
    """Return the table body from the units' medians: lut (per layer, per choice), kernels, edges, rest_ms, the
    references, and the check of the model on two measured whole models it was not built from."""
    t = {k: v["median_ms"] for k, v in times.items()}
    s = t["overhead"]

    def tr(unit: str, side: str | None = None) -> float:
        return sum(max(t[k.split(":", 1)[1]] - s, 0.0) for k in info["transposes"][unit]
                   if side is None or k.startswith(side + ":"))

    names = list(info["layers"])
    delta = {k: v["delta_ms"] for k, v in times.items() if "delta_ms" in v}
    kernels = {n: {"int8": t[f"int8/int8|{n}"] - s - tr(f"int8|{n}"),
                   "requant": t[f"requant/requant|{n}"] - s - tr(f"requant|{n}"),
                   "float_unit": t[f"float/float|{n}"] - s + tr(f"int8|{n}")} for n in names}
    rest = t["whole|int8"] - sum(k["int8"] for k in kernels.values())
    # in the 4-bit model part of the requantized units' layout changes remain (the requantization of an Add's output
    # runs as DequantizeLinear -> Clip -> QuantizeLinear in NCHW): their share, from the measured 4-bit model
    req_tr = {n: tr(f"requant|{n}") for n in names}
    excess = t["whole|requant"] - rest - sum(k["requant"] for k in kernels.values())
    rho = max(excess / sum(req_tr.values()), 0.0) if sum(req_tr.values()) > 0 else 0.0
    for n, k in kernels.items():
        k["requant"] += rho * req_tr[n]
    for n, k in kernels.items():  # what the island adds in place beyond its own unit: the layout changes around it
        k["transition_alone"] = k["int8"] + delta[f"island|{n}"] - k["float_unit"]
        k["transition_alone_requant"] = k["requant"] + delta[f"islandR|{n}"] - k["float_unit"]
    kappa = sharing(kernels, t, info["alternating"])
    for n, k in kernels.items():
        k["transition"] = kappa * k["transition_alone"]
        k["float_int8_anchored"] = k["float_unit"] + k["transition"]
        k["float_anchored_step"] = -delta[f"islandF|{n}"]  # what its int8 island saves in the every-layer-float model
    pairs = [{"from": a, "to": b, "ms": delta[f"island|{a}|{b}"] - sum(kernels[n]["float_int8_anchored"]
                                                                       - kernels[n]["int8"] for n in (a, b))}
             for a, b in info["edges"]]
    w = anchor_mix(kernels, t["whole|float_layers"] - t["whole|int8"])
    for k in kernels.values():
        k["float"] = k["int8"] + w * (k["float_int8_anchored"] - k["int8"]) + (1 - w) * k["float_anchored_step"]
    edges = pairs  # what two float layers in a row save over two islands (the side model has it per side)
    # the side model (predict): a float layer among quantized neighbours costs its island step; each of its sides
    # (input, output) that faces float neighbours saves what the layout change and Q/DQ there cost. The island step
    # counts both sides, the float-anchored step (an int8 island in the float model) takes them off for each side
    # with a searched neighbour: side saving = (island step - float-anchored step) / (2 x such sides). Sides with
    # no searched neighbour (the input, a residual Add, pooling) face quantized tensors in every policy
    before = predecessors(info["successors"])
    for n, k in kernels.items():
        sides = sum(bool(nb) for nb in (before.get(n), info["successors"].get(n)))
        k["float_island_step"] = k["float_int8_anchored"] - k["int8"]
        k["float_side_saving"] = (k["float_island_step"] - k["float_anchored_step"]) / (2 * sides) if sides else 0.0
        k["float_island_step_requant"] = island_step_requant(k, kappa)
    lut = {n: {c: kernels[n][kernel_of(c, info["act_max"][n])] for c in info["choices"][n]} for n in names}
    checks = {}
    for label, policy in (("every layer float", dict.fromkeys(names, "float")),
                          ("every other layer float (module order)", info["alt_float"])):
        key = "whole|float_layers" if label.startswith("every layer") else "whole|alt_float"
        pred = predict(kernels, rest, edges, policy, info["successors"])
        checks[label] = {"measured_ms": t[key], "predicted_ms": pred, "ratio": pred / t[key],
                         "independent": key == "whole|float_layers"}  # the alternating ones set the share
    for key, share in (info.get("random_float") or {}).items():  # float at seeded random places: not fitted to
        floats = set(key.split("|")[1:])
        pred = predict(kernels, rest, edges, {n: "float" if n in floats else "int8" for n in names},
                       info["successors"])
        checks[f"{share:.0%} of layers float at random ({len(floats)})"] = {
            "measured_ms": t[key], "predicted_ms": pred, "ratio": pred / t[key], "independent": True}
    return {"layers": lut, "kernels": kernels, "transition_share": kappa, "requant_layout_share": rho,
            "anchor_mix": w, "act_max": info["act_max"], "edges": edges,
            "successors": info["successors"],
            "rest_ms": rest,
            "overhead_ms": s, "reference_ms": {"w8a8": t["whole|int8"], "float_layers": t["whole|float_layers"],
                                               "fp32_model": t["whole|fp32"]},
            "rest_check": checks}


def search_terms(table: Mapping) -> tuple[dict[str, dict[str, float]], list[dict]]:
    """Return the side model in the form the search and its extraction price exactly: per-layer entries whose float
    entry is the layer's island price (int8 + its island step), and pair terms on neighbouring layers:

        (a float, b float) for each edge a -> b:    - (saving_a / |successors of a| + saving_b / |predecessors of b|)
        (a float, b requantized) where b is a's only successor: island_step_requant_a - island_step_a

    so that rest + sum of entries + the pair terms that apply = predict() for every policy (a float layer with
    several successors that all requantize is priced at its plain island step: predict() says more; the search
    records both). Tables without the side model (no `float_side_saving`): the additive entries, no pairs."""
    kernels, successors = table.get("kernels") or {}, table.get("successors") or {}
    lut = {n: dict(row) for n, row in table["layers"].items()}
    if not kernels or not all("float_side_saving" in kernels.get(n, {}) for n in lut):
        return lut, []
    act_max = table.get("act_max") or {}
    before = predecessors(successors)
    kernels = complete_kernels(kernels, table.get("transition_share"))  # tables written before that entry
    for n, row in lut.items():
        if "float" in row:
            row["float"] = kernels[n]["int8"] + kernels[n]["float_island_step"]

    def requant(n: str) -> list[str]:
        return sorted(c for c in lut[n] if kernel_of(c, act_max.get(n, 8)) == "requant")

    pairs = []
    for a, after in successors.items():
        if a not in lut or "float" not in lut[a]:
            continue
        for b in after:
            if b not in lut:
                continue
            if "float" in lut[b]:
                ms = -(kernels[a]["float_side_saving"] / len(after)
                       + kernels[b]["float_side_saving"] / len(before[b]))
                pairs.append({"first": a, "second": b, "first_choices": ["float"], "second_choices": ["float"],
                              "ms": ms})
            if len(after) == 1 and requant(b):
                ms = kernels[a]["float_island_step_requant"] - kernels[a]["float_island_step"]
                pairs.append({"first": a, "second": b, "first_choices": ["float"], "second_choices": requant(b),
                              "ms": ms})
    return lut, pairs
