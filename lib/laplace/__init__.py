"""Laplace approximation over the LoRA weights: curvature (K-FAC / diagonal GGN), posterior, evidence."""

from lib.laplace.curvature import (
    DiagCurvature,
    KronCurvature,
    KronFactor,
    fit_curvature,
    fit_diag,
    fit_kron,
)
from lib.laplace.posterior import DiagPosterior, KronPosterior, LaplacePosterior, build_posterior

__all__ = [
    "DiagCurvature",
    "DiagPosterior",
    "KronCurvature",
    "KronFactor",
    "KronPosterior",
    "LaplacePosterior",
    "build_posterior",
    "fit_curvature",
    "fit_diag",
    "fit_kron",
]
