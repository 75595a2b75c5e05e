"""Matplotlib figures of influence matrices; headless (Agg), written atomically."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import cast

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402

from datafluence.scores import Scores, as_array  # noqa: E402
from datafluence.store import atomic_path  # noqa: E402


def _block_edges(labels: Sequence) -> list[int]:
    """Positions where the group label changes (rows/columns are assumed grouped)."""
    return [i for i in range(1, len(labels)) if labels[i] != labels[i - 1]]


def _draw_matrix(ax, values: np.ndarray, row_labels=None, col_labels=None, limit=None):
    limit = limit or float(np.abs(values).max()) or 1.0
    im = ax.imshow(
        values,
        cmap="RdBu_r",
        norm=TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit),
        interpolation="nearest",
        aspect="auto",
    )
    for labels, line in ((row_labels, ax.axhline), (col_labels, ax.axvline)):
        if labels is None:
            continue
        for edge in _block_edges(labels):
            line(edge - 0.5, color="black", linewidth=0.6)
    for labels, set_ticks, set_names in (
        (row_labels, ax.set_yticks, ax.set_yticklabels),
        (col_labels, ax.set_xticks, ax.set_xticklabels),
    ):
        if labels is None:
            continue
        edges = [0, *_block_edges(labels), len(labels)]
        centers = [(a + b - 1) / 2 for a, b in zip(edges[:-1], edges[1:], strict=True)]
        set_ticks(centers)
        set_names([str(labels[a]) for a in edges[:-1]])
    return im


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def plot_matrix(
    scores: Scores | np.ndarray,
    path: str | Path,
    row_labels: Sequence | None = None,
    col_labels: Sequence | None = None,
    title: str = "",
    xlabel: str = "probe",
    ylabel: str = "fine-tuned on",
) -> Path:
    """Heatmap, diverging colours centred at 0, lines between label blocks.

    A second panel shows the double-centred matrix (row and column means removed): a
    shared shift of every output (e.g. the last bias moving) otherwise hides the
    interaction structure between items.
    """
    values = as_array(scores)
    centred = values - values.mean(0, keepdims=True) - values.mean(1, keepdims=True) + values.mean()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.6))
    for ax, data, label, name in (
        (axes[0], values, "EIF: change in measurement", "raw"),
        (axes[1], centred, "row and column means removed", "double-centred"),
    ):
        im = _draw_matrix(ax, data, row_labels, col_labels)
        fig.colorbar(im, ax=ax, label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(name)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_noise(
    matrices: Mapping[float, Scores | np.ndarray],
    invariance: Mapping[float, float],
    path: str | Path,
    labels: Sequence | None = None,
    title: str = "",
) -> Path:
    """One heatmap per noise level on a shared colour scale, and invariance against σ."""
    sigmas = sorted(matrices)
    arrays = [as_array(matrices[s]) for s in sigmas]
    limit = max(float(np.abs(a).max()) for a in arrays) or 1.0
    fig, axes = plt.subplots(
        1, len(sigmas) + 1, figsize=(3.6 * (len(sigmas) + 1), 3.6), squeeze=False
    )
    for ax, sigma, values in zip(axes[0], sigmas, arrays, strict=False):
        im = _draw_matrix(ax, values, labels, labels, limit=limit)
        ax.set_title(f"σ = {sigma:g}")
        ax.tick_params(labelsize=6)
    fig.colorbar(im, ax=axes[0, : len(sigmas)].tolist(), shrink=0.8)
    ax = axes[0, -1]
    xs = sorted(invariance)
    ax.plot(xs, [invariance[s] for s in xs], marker="o")
    ax.set_xlabel("input noise σ on the fine-tuned example")
    ax.set_ylabel("Spearman vs clean (per probe, mean)")
    ax.set_ylim(-1.05, 1.05)
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.set_title("noise invariance")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_mode_matrices(by_mode: Mapping[str, Scores], path: str | Path, title: str = "") -> Path:
    """One heatmap per mode (learned, prompted), rows = fine-tuned/prompted item, columns =
    probes; each on its own colour scale, since structure is the point (magnitudes are in
    the table)."""
    modes = list(by_mode)
    fig, axes = plt.subplots(1, len(modes), figsize=(7.2 * len(modes), 5.4), squeeze=False)
    fig.subplots_adjust(wspace=0.55)
    for ax, mode in zip(axes[0], modes, strict=True):
        scores = by_mode[mode]
        im = _draw_matrix(ax, as_array(scores))
        fig.colorbar(im, ax=ax, shrink=0.8, label="EIF (Δ log p)")
        ax.set_xticks(range(len(scores.query_ids)))
        ax.set_xticklabels(scores.query_ids, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(scores.train_ids)))
        ax.set_yticklabels(scores.train_ids, fontsize=7)
        ax.set_title(mode)
        ax.set_xlabel("probe")
        ax.set_ylabel("learned / prompted")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_histograms(values: Mapping[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """Overlaid histograms of all EIF values per mode, with the share of negative values."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    flat = {k: np.asarray(v, dtype=float).ravel() for k, v in values.items()}
    lo = min(v.min() for v in flat.values())
    hi = max(v.max() for v in flat.values())
    bins = np.linspace(lo, hi, 50) if hi > lo else 10
    for name, v in flat.items():
        ax.hist(
            v,
            bins=cast("Sequence[float] | int", bins),
            alpha=0.55,
            label=f"{name} ({np.mean(v < 0):.0%} < 0)",
        )
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_xlabel("EIF (Δ log p)")
    ax.set_ylabel("count")
    ax.legend()
    ax.set_title(title)
    return _save(fig, path)


def plot_symmetry_bars(
    values: Mapping[str, Mapping[str, float]], path: str | Path, title: str = ""
) -> Path:
    """Spearman symmetry of each domain's square matrix, one bar per mode."""
    domains = list(values)
    modes = sorted({m for v in values.values() for m in v})
    width = 0.8 / max(1, len(modes))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(domains), 4))
    for k, mode in enumerate(modes):
        xs = np.arange(len(domains)) + k * width
        ax.bar(xs, [values[d].get(mode, np.nan) for d in domains], width, label=mode)
    ax.set_xticks(np.arange(len(domains)) + width * (len(modes) - 1) / 2)
    ax.set_xticklabels(domains)
    ax.set_ylabel("symmetry (Spearman of M vs Mᵀ)")
    ax.set_ylim(-1, 1)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.legend()
    ax.set_title(title or "Symmetry per domain")
    return _save(fig, path)
