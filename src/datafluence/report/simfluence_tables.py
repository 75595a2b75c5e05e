"""Tables of a Simfluence experiment's metrics.json, for the log and for benchmarks.

They read only the saved metrics, so a finished run can be tabulated again without
recomputing anything.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from datafluence.simfluence.held_out import TRACIN


def summary_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """One row per simulator: held-out all-steps MSE and final-step Spearman, mean ± std."""
    rows = []
    for kind, m in metrics["evaluation"].items():
        rows.append(
            {
                "simulator": kind,
                "all-steps MSE": _pm(m["mse_all_steps_mean"], m["mse_all_steps_std"]),
                "final-step Spearman": _pm(m["spearman_final_mean"], m["spearman_final_std"]),
                "λ": f"{metrics['lambda'][kind]:g}" if kind in metrics["lambda"] else "-",
                "held-out runs": int(m["n_runs"]),
            }
        )
    return pd.DataFrame(rows).set_index("simulator")


def counterfactual_table(metrics: dict[str, Any], kind: str = "linear") -> pd.DataFrame:
    """One row per counterfactual curriculum: the `kind` simulator against real training."""
    rows = []
    for name, entry in metrics["counterfactuals"].items():
        m = entry[kind]
        rows.append(
            {
                "edit": name,
                "MSE": m["mse_all_steps"],
                "Spearman L_T": m["spearman_final"],
                "effect r": m["effect_pearson"],
                "effect ρ L_T": m["effect_spearman_final"],
                "real ΔL_T": m["real_effect_final"],
                "predicted ΔL_T": m["predicted_effect_final"],
                "(TracIn effect r)": entry[TRACIN]["effect_pearson"],
            }
        )
    table = pd.DataFrame(rows).set_index("edit").round(4)
    table.index.name = f"edit ({kind} simulator vs real training)"
    return table


def _pm(mean: float, std: float) -> str:
    """mean ± std, or the mean alone where the std is undefined (a single held-out run)."""
    return f"{mean:.4g} ± {std:.2g}" if np.isfinite(std) else f"{mean:.4g}"
