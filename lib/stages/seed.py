"""One training seed's stages, and the readers of what they saved (not a stage itself)."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from lib.artifacts import Stage
from lib.laplace.posterior import LaplacePosterior
from lib.laplace.predictive import Bank
from lib.pipeline import MapRun
from lib.stages.banks import load_bank


@dataclass
class SeedStudy:
    """All cached stages of one training seed: the MAP ``run``, the ``laplace`` stage and its
    ``posterior``, the test ``bank``, ``val_bank`` (the validation images' bank, which tunes κ_S and
    chooses blocks), ``control`` / ``control_val`` (the isotropic control's test and validation
    banks) and ``subsets`` (:mod:`lib.stages.subsets`)."""

    seed: int
    run: MapRun
    posterior: LaplacePosterior
    laplace: Stage
    bank: Stage
    subsets: Stage
    val_bank: Stage
    control: Stage
    control_val: Stage

    def named(self) -> dict:
        """The named posteriors' predictions: {names, masks (P, L), scales (P,), probs (P, N, C),
        labels (N,), det (N, C), ts (N, C), temperature} (see :func:`lib.stages.subsets.subset_predictions`)."""
        return torch.load(self.subsets.file("named.pt"), weights_only=True)

    def metrics(self) -> pd.DataFrame:
        """Test metrics per named posterior and temperature scaling (``metrics.csv``)."""
        return pd.read_csv(self.subsets.file("metrics.csv"))

    def scales(self) -> pd.DataFrame:
        """Per named posterior: κ_S, validation NLL at κ_S and κ = 1, test metrics at κ = 1."""
        return pd.read_csv(self.subsets.file("scales.csv"))

    def subset_ece(self) -> Tensor:
        """ECE (R+1, 2^L) of every block subset: row 0 the test set, rows 1..R bootstrap replicates."""
        return torch.load(self.subsets.file("subset_ece.pt"), weights_only=True)

    def test_bank(self) -> Bank:
        """The perturbation bank of the test set (CPU fp32)."""
        return load_bank(self.bank)

    def validation_bank(self) -> Bank:
        """The perturbation bank of the validation images that tune κ_S (CPU fp32)."""
        return load_bank(self.val_bank)

    def control_bank(self) -> Bank:
        """The isotropic control's perturbation bank of the test set, unit variance (CPU fp32)."""
        return load_bank(self.control)

    def control_validation_bank(self) -> Bank:
        """The isotropic control's bank of the validation images that tune its σ² (CPU fp32)."""
        return load_bank(self.control_val)

    def validation_logits(self) -> tuple[Tensor, Tensor]:
        """MAP logits (N_val, C) and labels (N_val,) of the whole validation split (temperature scaling's data)."""
        return torch.load(self.run.stage.file("val_logits.pt"), weights_only=True), self.run.splits.val.y
