"""The demo's report: a Markdown page with the comparison table and PNG plots."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..io import atomic_write_text
from .plots import plot_scatter


def summary_rows(summary: dict) -> list[dict]:
    """Return table rows (float first): label, top-1, BitOPs ratio, weight MB, latency and speed-up per batch."""
    lat = summary["latency"]["batches"]
    rows = [{"label": "float", "top1": summary["float"]["top1"], "bitops_vs_w8a8": None,
             "weight_mb": summary["float"]["weight_bytes_total"] / 1e6, "integer_layers": "",
             **{f"ms_b{b}": v["median_ms"]["float"] for b, v in lat.items()},
             **{f"x_b{b}": 1.0 for b in lat}}]
    for r in summary["rows"]:
        rows.append({"label": r["label"], "top1": r["top1"], "bitops_vs_w8a8": r["bitops_vs_w8a8"],
                     "weight_mb": r["weight_bytes_total"] / 1e6, "integer_layers": r["integer_layers"],
                     **{f"ms_b{b}": v["median_ms"][r["label"]] for b, v in lat.items()},
                     **{f"x_b{b}": 1.0 / v["vs_float"][r["label"]] for b, v in lat.items()}})
    return rows


def write_report(summary: dict, root: str | Path) -> Path:
    """Write <root>/report.md with the table, the search plots and an accuracy-vs-BitOPs plot."""
    root = Path(root)
    cfg = summary["config"]
    rows = summary_rows(summary)
    batches = list(summary["latency"]["batches"])
    acc = plot_scatter({r["label"]: (100 * r["bitops_vs_w8a8"], 100 * r["top1"]) for r in summary["rows"]},
                       root / "accuracy_vs_bitops.png", "BitOPs (% of W8A8)", "test top-1 (%)",
                       hline=("float", 100 * summary["float"]["top1"]),
                       title=f"{cfg['model']} on {cfg['dataset']}: top-1 after QAT vs BitOPs")
    head = ["policy", "top-1 %", "BitOPs % W8A8", "weights MB", "integer convs"] + [
        h for b in batches for h in (f"ORT ms b{b}", f"speed-up b{b}")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], f"{100 * r['top1']:.2f}",
                 "" if r["bitops_vs_w8a8"] is None else f"{100 * r['bitops_vs_w8a8']:.2f}",
                 f"{r['weight_mb']:.4f}", r["integer_layers"]]
        cells += [c for b in batches for c in (f"{r[f'ms_b{b}']:.3f}", f"{r[f'x_b{b}']:.2f}x")]
        lines.append("| " + " | ".join(cells) + " |")
    stem = Path(next(r["policy"] for r in summary["rows"] if r["label"] == "ASGA")).stem
    pol_dir = root / "policies"
    plots = []
    for kind in ("bits", "rho", "cost"):
        src = pol_dir / f"{stem}.{kind}.png"
        if src.exists():
            shutil.copyfile(src, root / f"search.{kind}.png")
            plots.append(f"![{kind}](search.{kind}.png)")
    t = summary["times"]
    m = summary["machine"]
    text = f"""# asga demo: {cfg['model']} on {cfg['dataset']}

Float model trained {cfg['train_epochs']} epochs; ASGA search on a {cfg['proxy_size']}-image class-balanced
proxy at {100 * cfg['budget_bitops']:g}% of W8A8 BitOPs (target `{cfg['target']}`, {cfg['search_epochs']} epochs,
init {cfg['search_init']}); every policy fine-tuned {cfg['finetune_epochs']} epochs with the same recipe on the full
training set, exported to ONNX QDQ (parity checked on {cfg['parity_images']} test images) and timed in
ONNX Runtime ({summary['latency']['threads']} threads in one pool shared by every session, median of
{cfg['latency_rounds']} alternating rounds of about 20 ms per model). Speed-up is fp32 latency / model latency in
the same run.

{chr(10).join(lines)}

Every quantized conv runs on ONNX Runtime's 8-bit integer kernels whatever its bit-width: below 8 bits
the gain is size and BitOPs, not CPU latency. Machine: {m['cpu']}, {m['cores']} cores. Total time {t['total_s'] / 60:.1f} min
(train {t['train_s']:.0f} s, search {t['search_s']:.0f} s).

![accuracy vs BitOPs]({acc.name})

{chr(10).join(plots)}
"""
    return atomic_write_text(root / "report.md", text)
