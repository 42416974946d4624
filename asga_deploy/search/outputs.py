"""What a finished search writes beside its policy: the search log, the plots, then the policy itself."""

from __future__ import annotations

import json
from pathlib import Path

from ..io import atomic_write_text, check_writable
from ..naming import free_stem
from ..policy import Policy
from ..report.plots import plot_bits, plot_panels


def write_plots(pol: Policy, log: list[dict], out_dir: Path, stem: str) -> list[Path]:
    """Write <stem>.bits.png, <stem>.rho.png and <stem>.cost.png; return their paths."""
    names = list(pol.layers) + list(pol.float_layers)
    bits = plot_bits(names, {"weight bits": [pol.layers[n].weight_bits if n in pol.layers else None for n in names],
                             "activation bits": [pol.layers[n].act_bits if n in pol.layers else None for n in names]},
                     out_dir / f"{stem}.bits.png", f"{stem}: bit-widths per layer")
    steps = [r["step"] for r in log]
    rho = plot_panels(steps, {"rho": {"rho_t": [r["rho"] for r in log]},
                              "gap h": {"h_t = L_adv - L": [r["gap"] for r in log]},
                              "loss": {"L": [r["loss"] for r in log], "L_adv": [r["loss_adv"] for r in log]}},
                      out_dir / f"{stem}.rho.png", title=f"{stem}: radius, surrogate gap, loss")
    cost = plot_panels(steps, {"cost / W8A8": {"expected C(alpha)": [r["expected_cost"] for r in log],
                                               "argmax policy": [r["argmax_cost"] for r in log],
                                               "target T_t": [r["target_t"] for r in log]},
                               "lambda": {"lambda_used": [r["lambda"] for r in log]},
                               "temperature": {"tau": [r["temperature"] for r in log]}},
                       out_dir / f"{stem}.cost.png", title=f"{stem}: expected vs argmax cost")
    return [bits, rho, cost]


def finish(pol: Policy, state: dict, out_dir: str | Path, name: str | None, force: bool, stem: str) -> Path:
    """Write the search log and plots, then the policy (atomic, last: its presence marks a finished search).

    The file is <name>.json, or <stem>.json with -2, -3 ... appended while taken (unless force).
    """
    out_dir = Path(out_dir)
    stem = name or free_stem(out_dir, stem, force=force)
    path = check_writable(out_dir / f"{stem}.json", force)
    atomic_write_text(out_dir / f"{stem}.search.jsonl", "".join(json.dumps(r) + "\n" for r in state["log"]))
    write_plots(pol, state["log"], out_dir, stem)
    pol.provenance["search_log"] = f"{stem}.search.jsonl"
    return pol.save(path, force=force)
