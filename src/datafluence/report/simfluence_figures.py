"""Figures of a Simfluence experiment: simulated vs real loss, held-out and counterfactual.

Numbers say how well a simulator scores; these pictures say where it goes wrong (an
additive roll-out that cannot saturate, a diverging one, an edit whose effect it misses).
Headless (Agg) and written atomically, like `datafluence.report.figures`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from datafluence.report.figures import _save as save_figure  # noqa: E402
from datafluence.simfluence.evaluate import SupportsPredict  # noqa: E402
from datafluence.simfluence.held_out import TRACIN  # noqa: E402

# The simulators drawn, in order, and how; the do-nothing reference is left out.
STYLE = {
    "linear": dict(color="C0"),
    "additive": dict(color="C1"),
    "multiplicative": dict(color="C2"),
    TRACIN: dict(color="C3", linestyle="--"),
}


def plot_trajectories(
    simulators: Mapping[str, SupportsPredict],
    curriculum: np.ndarray,
    real: np.ndarray,
    pool_ids: tuple[str, ...],
    test_ids: tuple[str, ...],
    folder: Path,
    n_examples: int = 6,
) -> Path:
    """Held-out run 0: real vs simulated loss of test examples spread over how much they moved."""
    change = real[-1] - real[0]
    order = np.argsort(change, kind="stable")
    picks = order[
        np.unique(np.linspace(0, len(order) - 1, min(n_examples, len(order))).round().astype(int))
    ]
    cols = 3
    rows = -(-len(picks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    steps = np.arange(real.shape[0])
    predicted = {k: simulators[k].predict(curriculum, real[0], pool_ids) for k in STYLE}
    for ax, z in zip(axes.flat, picks, strict=False):
        ax.plot(steps, real[:, z], color="black", linewidth=2.2, label="real")
        for kind, style in STYLE.items():
            ax.plot(steps, predicted[kind][:, z], linewidth=1.2, label=kind, **style)
        low, high = real[:, z].min(), real[:, z].max()
        pad = 0.5 * (high - low) + 0.1
        ax.set_ylim(min(0.0, low - pad), high + pad)  # keep a diverging roll-out from hiding it
        ax.set_title(f"{test_ids[z]}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("test loss")
    for ax in list(axes.flat)[len(picks) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Held-out run: real vs simulated loss trajectories (rolled out from L_0)")
    fig.tight_layout()
    return save_figure(fig, folder / "trajectories.png")


def plot_final_losses(
    simulators: Mapping[str, SupportsPredict],
    curricula: np.ndarray,
    real: np.ndarray,
    pool_ids: tuple[str, ...],
    evaluation: dict[str, dict[str, float]],
    folder: Path,
) -> Path:
    """Predicted vs real final loss of every test example in every held-out run."""
    kinds = list(STYLE)
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.8 * len(kinds), 3.8), squeeze=False)
    truth = real[:, -1].ravel()
    low, high = float(truth.min()), float(truth.max())
    pad = 0.1 * (high - low) + 0.05
    for ax, kind in zip(axes[0], kinds, strict=True):
        pred = simulators[kind].predict(curricula, real[:, 0], pool_ids)[:, -1].ravel()
        ax.scatter(
            truth,
            np.clip(pred, low - 4 * pad, high + 4 * pad),
            s=6,
            alpha=0.5,
            color=STYLE[kind]["color"],
        )
        ax.plot([low, high], [low, high], color="grey", linewidth=0.8)
        ax.set_xlim(low - pad, high + pad)
        ax.set_ylim(low - 4 * pad, high + 4 * pad)
        m = evaluation[kind]
        ax.set_title(
            f"{kind}\nSpearman {m['spearman_final_mean']:.3f}, MSE {m['mse_all_steps_mean']:.3g}",
            fontsize=9,
        )
        ax.set_xlabel("real final loss")
        ax.set_ylabel("predicted final loss (clipped)")
    fig.suptitle("Final losses of the test examples on held-out runs")
    fig.tight_layout()
    return save_figure(fig, folder / "final_losses.png")


def plot_counterfactuals(
    edited: dict[str, dict[str, np.ndarray]],
    linear: SupportsPredict,
    base: np.ndarray,
    base_losses: np.ndarray,
    pool_ids: tuple[str, ...],
    folder: Path,
) -> Path:
    """Per edit: mean loss of its targeted test examples, real vs linear simulator."""
    fig, axes = plt.subplots(1, len(edited), figsize=(3.6 * len(edited), 3.4), squeeze=False)
    pred_base = linear.predict(base, base_losses[0], pool_ids)
    steps = np.arange(base_losses.shape[0])
    for ax, (name, cf) in zip(axes[0], edited.items(), strict=True):
        pred = linear.predict(cf["curriculum"], base_losses[0], pool_ids)
        focus = cf["focus"]
        ax.plot(steps, base_losses[:, focus].mean(1), color="grey", label="real, original")
        ax.plot(
            steps, cf["losses"][:, focus].mean(1), color="black", linewidth=2, label="real, edited"
        )
        ax.plot(
            steps, pred_base[:, focus].mean(1), color="C0", linestyle=":", label="linear, original"
        )
        ax.plot(steps, pred[:, focus].mean(1), color="C0", linestyle="--", label="linear, edited")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("mean loss of the targeted test examples")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Counterfactual curricula: really trained vs predicted by the linear simulator")
    fig.tight_layout()
    return save_figure(fig, folder / "counterfactuals.png")
