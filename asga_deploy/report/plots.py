"""Generic PNG plots (matplotlib, Agg backend): bit-widths per layer, curves over steps, panels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from ..io import atomic_write_bytes


def _figure(rows: int = 1, width: float = 8.0, height: float = 3.0):
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, 1, figsize=(width, height * rows), squeeze=False)
    return plt, fig, [a[0] for a in axes]


def _save(plt, fig, path: str | Path) -> Path:
    import io

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def plot_bits(layers: Sequence[str], series: Mapping[str, Sequence[float | None]], path: str | Path,
              title: str = "bit-width per layer") -> Path:
    """Write a grouped bar chart of bit-widths per layer (one bar group per series, e.g. weights/acts)."""
    plt, fig, (ax,) = _figure(width=max(6.0, 0.45 * len(layers) + 2))
    n = max(len(series), 1)
    width = 0.8 / n
    for k, (label, vals) in enumerate(series.items()):
        xs = [i + (k - (n - 1) / 2) * width for i in range(len(layers))]
        ax.bar(xs, [v if v is not None else 0 for v in vals], width, label=label)
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("bits")
    ax.set_yticks([2, 3, 4, 5, 6, 7, 8])
    ax.set_ylim(0, 8.5)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_panels(x: Sequence[float], panels: Mapping[str, Mapping[str, Sequence[float | None]]],
                path: str | Path, xlabel: str = "step", title: str = "") -> Path:
    """Write stacked line panels sharing x: {panel y-label: {curve label: values}}; None values skipped."""
    plt, fig, axes = _figure(rows=max(len(panels), 1))
    for ax, (ylabel, curves) in zip(axes, panels.items(), strict=False):
        for label, ys in curves.items():
            pts = [(a, b) for a, b in zip(x, ys, strict=False) if b is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, linewidth=1)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[-1].set_xlabel(xlabel)
    if title:
        axes[0].set_title(title)
    return _save(plt, fig, path)


def plot_scatter(points: Mapping[str, tuple[float, float]], path: str | Path, xlabel: str, ylabel: str,
                 hline: tuple[str, float] | None = None, title: str = "") -> Path:
    """Write a labelled scatter plot of {label: (x, y)}, with an optional reference line (label, y)."""
    plt, fig, (ax,) = _figure(width=6.5, height=4.0)
    for label, (x, y) in points.items():
        ax.scatter([x], [y], s=30)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if hline is not None:
        ax.axhline(hline[1], color="gray", linestyle="--", linewidth=1, label=hline[0])
        ax.legend(fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(plt, fig, path)


def plot_front(series: Mapping[str, Sequence[tuple[float, float]]], path: str | Path, xlabel: str, ylabel: str,
               hline: tuple[str, float] | None = None, title: str = "") -> Path:
    """Write one line-and-marker curve per series of (x, y) points (sorted by x), e.g. an accuracy front."""
    plt, fig, (ax,) = _figure(width=6.5, height=4.0)
    for label, pts in series.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linewidth=1, label=label)
    if hline is not None:
        ax.axhline(hline[1], color="gray", linestyle="--", linewidth=1, label=hline[0])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(plt, fig, path)


def plot_heatmaps(rows: Sequence[str], cols: Sequence[str], panels: Mapping[str, Sequence[Sequence[float]]],
                  path: str | Path, title: str = "") -> Path:
    """Write one heatmap per panel ({title: matrix rows x cols}), diverging colours centred on 0."""
    plt, fig, axes = _figure(rows=max(len(panels), 1), width=max(6.0, 0.35 * len(cols) + 3),
                             height=max(2.5, 0.25 * len(rows) + 1.2))
    for ax, (name, m) in zip(axes, panels.items(), strict=False):
        lim = max((abs(v) for r in m for v in r if v == v), default=1.0) or 1.0
        im = ax.imshow(m, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(rows, fontsize=6)
        ax.set_xticks(range(len(cols)))
        ax.set_xticklabels(cols, rotation=90, fontsize=6)
        ax.set_title(name, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.03)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(plt, fig, path)
