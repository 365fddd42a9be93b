"""Laplace approximation over the LoRA weights: curvature (K-FAC / diagonal / exact dense-block GGN), posterior, evidence."""

from lib.laplace.curvature import (
    DiagCurvature,
    KronCurvature,
    KronFactor,
    fit_curvature,
    fit_diag,
    fit_kron,
)
from lib.laplace.exact import DenseCurvature, fit_block_ggn
from lib.laplace.posterior import DenseBlockPosterior, DiagPosterior, KronPosterior, LaplacePosterior, build_posterior

__all__ = [
    "DenseBlockPosterior",
    "DenseCurvature",
    "DiagCurvature",
    "DiagPosterior",
    "KronCurvature",
    "KronFactor",
    "KronPosterior",
    "LaplacePosterior",
    "build_posterior",
    "fit_block_ggn",
    "fit_curvature",
    "fit_diag",
    "fit_kron",
]
