"""The latency model: how the measured times combine into a table, and a whole model's predicted latency.

    T(policy) = rest + sum over layers L of entry_L(kernel of L's choice) + sum of float-pair edges

Each layer's units run in sequences (worker.py): all layers' int8 units one after the other in model order,
then their requantized units, then their float islands, so that every unit finds the caches as the layers
before it leave them in the whole model of that kind. From their medians:

    int8, requant   unit - session cost (the overhead unit) - the Transposes ORT puts at its boundaries (in the
                    whole model consecutive integer layers stay NHWC, with no Transpose between them); requant
                    + rho x those Transposes, rho the share that remains in the measured 4-bit model (an Add's
                    output requantized as DequantizeLinear -> Clip -> QuantizeLinear runs in NCHW)
    float           float_unit + kappa x transition_alone: float_unit = island unit - session cost + its
                    neighbours' boundary Transposes; transition_alone = (the int8 model with this one layer float
                    - the int8 model) - (float_unit - int8 entry), what the island does to its neighbours when it
                    is alone; kappa the share of it that remains when float layers are spread over the model
                    (fitted on the two models with every other layer float). `float_before_requant`: the same
                    measured in the 4-bit model, used when every layer right after it requantizes
    edge (a, b)     (the int8 model with a and b float) - (with a float) - (with b float) + the int8 model:
                    two float layers in a row skip the Q/DQ and layout changes between them
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


def predict(entries: Mapping[str, Mapping[str, float]], rest_ms: float, edges: list[dict],
            kernels: Mapping[str, str], successors: Mapping[str, list[str]] | None = None) -> float:
    """Return the latency (ms) of {layer: kernel}: rest + each layer's entry (entry_key) + the edges of float pairs."""
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
    for k in kernels.values():
        k["transition"] = kappa * k["transition_alone"]
        k["float"] = k["float_unit"] + k["transition"]
        k["float_before_requant"] = k["float_unit"] + kappa * k["transition_alone_requant"]
    edges = [{"from": a, "to": b, "ms": delta[f"island|{a}|{b}"] - sum(kernels[n]["float"] - kernels[n]["int8"]
                                                                       for n in (a, b))} for a, b in info["edges"]]
    lut = {n: {c: kernels[n][kernel_of(c, info["act_max"][n])] for c in info["choices"][n]} for n in names}
    checks = {}
    for label, policy in (("every layer float", dict.fromkeys(names, "float")),
                          ("every other layer float (module order)", info["alt_float"])):
        key = "whole|float_layers" if label.startswith("every layer") else "whole|alt_float"
        pred = predict(kernels, rest, edges, policy, info["successors"])
        checks[label] = {"measured_ms": t[key], "predicted_ms": pred, "ratio": pred / t[key],
                         "independent": key == "whole|float_layers"}  # the alternating ones set the share
    return {"layers": lut, "kernels": kernels, "transition_share": kappa, "requant_layout_share": rho, "act_max": info["act_max"], "edges": edges,
            "successors": info["successors"],
            "rest_ms": rest,
            "overhead_ms": s, "reference_ms": {"w8a8": t["whole|int8"], "float_layers": t["whole|float_layers"],
                                               "fp32_model": t["whole|fp32"]},
            "rest_check": checks}
