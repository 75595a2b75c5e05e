"""Kept for imports: RegressionTask lives in `datafluence.tasks` beside ClassificationTask."""

from datafluence.tasks import RegressionTask

__all__ = ["RegressionTask"]
