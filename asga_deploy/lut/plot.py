"""PNG plot of a latency table: ms per layer for each kernel (int8, int8 with sub-8-bit requantization, float)."""

from __future__ import annotations

from pathlib import Path

from .table import LatencyTable

KERNELS = (("w8a8", "int8 (8-bit activations)"), ("w8a4", "int8, activations below 8 bits"), ("float", "float"))


def kernel_rows(table: LatencyTable) -> dict[str, dict[str, float]]:
    """Return {kernel label: {layer: ms}}: one representative choice key per distinct kernel."""
    out: dict[str, dict[str, float]] = {}
    for key, label in KERNELS:
        row = {}
        for n, choices in table.lut.items():
            k = key if key in choices else next((c for c in choices if c.endswith(key[2:]) and c != "float"), None)
            if k is not None:
                row[n] = choices[k]
        out[label] = row
    return out


def plot_lut(table: LatencyTable, path: str | Path) -> Path:
    """Write a grouped bar chart of the table (ms per layer per kernel, the rest of the graph in the title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..io import atomic_write_bytes

    rows = kernel_rows(table)
    names = table.layers
    x = np.arange(len(names))
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(names) + 2), 4.2))
    for i, (label, row) in enumerate(rows.items()):
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, [row.get(n, np.nan) for n in names], width, label=label)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("ms in the whole model")
    k = table.key
    ax.set_title(f"{k.get('model')} {k.get('target')} batch {k.get('batch')} {k.get('input_shape')}, "
                 f"{k.get('threads')} threads, {k.get('isa')}; rest of graph {table.rest_ms:.3g} ms", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(Path(path), buf.getvalue())
