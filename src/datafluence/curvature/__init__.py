"""Inverse-curvature strategies behind one interface (`Curvature.solve`), by name.

identity, diagonal, explicit (dense GN or Hessian), cg, lissa, arnoldi, kfac, ekfac. All use
the same scale: G = mean over examples of per-example GN/Hessian, losses summed over tokens.
"""

from datafluence.curvature.arnoldi import Arnoldi
from datafluence.curvature.base import REGISTRY, Curvature, FitContext, make_curvature
from datafluence.curvature.damping import Damping
from datafluence.curvature.explicit import Explicit
from datafluence.curvature.fisher import FISHER
from datafluence.curvature.iterative import CG, LiSSA
from datafluence.curvature.kfac import EKFAC, KFAC
from datafluence.curvature.operator import CurvatureOperator
from datafluence.curvature.persist import FactorMismatchError
from datafluence.curvature.simple import Diagonal, Identity

__all__ = [
    "CG",
    "EKFAC",
    "FISHER",
    "KFAC",
    "REGISTRY",
    "Arnoldi",
    "Curvature",
    "CurvatureOperator",
    "Damping",
    "Diagonal",
    "Explicit",
    "FactorMismatchError",
    "FitContext",
    "Identity",
    "LiSSA",
    "make_curvature",
]
