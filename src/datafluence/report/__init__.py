"""Figures for run directories."""

from datafluence.report.figures import plot_matrix, plot_noise

__all__ = ["plot_matrix", "plot_noise"]
