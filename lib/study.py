"""The study of one profile: every cached stage behind one object, computed on first use.

:class:`Study` ``(cfg, device)`` opens the stages in their order — ``backbone`` and ``map``
(:mod:`lib.pipeline`) → ``laplace`` (:mod:`lib.stages.laplace`) → the four perturbation banks
(:mod:`lib.stages.banks`) → ``subsets`` (:mod:`lib.stages.subsets`) per seed, ``curvature_quality``
(:mod:`lib.stages.quality`) on the first seed, and ``attribution`` (:mod:`lib.stages.attribution`)
over all seeds — each through :func:`lib.artifacts.cached`, so a stage is computed once per key
and loaded afterwards; within one object every stage is also opened only once. A chapter starts
with :func:`open_chapter` and asks for what it shows; it never recomputes a stage.

Analyses that only some chapters need take a :class:`Study` in their own modules (they are
imported only by the chapters that use them, so that their code does not enter the freshness of
the others); their cached stages name their own compute module as ``code`` and take the per-seed
records (:meth:`Study.seed`) and stages, not the :class:`Study`, so that their keys do not hash
this module's closure.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from typing import Any, NamedTuple

import pandas as pd
import torch

from lib.artifacts import Stage
from lib.attribution import Attribution
from lib.backbone import BackboneRecord, backbone_record
from lib.config import Config
from lib.laplace.posterior import LaplacePosterior
from lib.pipeline import MapRun, map_run, resolve_device
from lib.stages.attribution import AttributionTables, attribution_stage, load_attribution
from lib.stages.banks import build_bank
from lib.stages.laplace import fit_laplace
from lib.stages.quality import curvature_quality
from lib.stages.seed import SeedStudy
from lib.stages.subsets import subset_predictions


class Study:
    """The cached stages of the profile ``cfg`` on ``device``.

    Per training seed: :meth:`run` (MAP), :meth:`fit` (Laplace stage and posterior), :meth:`seed`
    (every per-seed stage, :class:`~lib.stages.seed.SeedStudy`); over the profile's seeds
    (``cfg.seeds``, in order): :attr:`runs`, :attr:`fits`, :attr:`seeds`; once: :attr:`backbone`,
    :attr:`curvature_quality` (first seed), and from the one
    ``attribution`` stage :attr:`attribution`, :attr:`ranks`, :attr:`shapley`, :attr:`validation`.
    A seed outside ``cfg.seeds`` may be asked for (e.g. an ensemble's extra members).
    """

    def __init__(self, cfg: Config, device: torch.device | str):
        if not isinstance(cfg, Config):
            raise ValueError(f"cfg must be a lib.config.Config (Config.from_dict(params)), got {type(cfg).__name__}")
        self.cfg = cfg
        self.device = torch.device(device)
        self._runs: dict[int, MapRun] = {}
        self._fits: dict[int, tuple[Stage, LaplacePosterior]] = {}
        self._seeds: dict[int, SeedStudy] = {}

    @cached_property
    def backbone(self) -> BackboneRecord | None:
        """Where the fine-tuned backbone comes from: shipped (``model.checkpoint``) or the ``backbone``
        pre-training stage, with its per-epoch history (:func:`lib.backbone.backbone_record`); None
        for profiles that do not pre-train one."""
        return backbone_record(self.cfg, self.device)

    def run(self, seed: int) -> MapRun:
        """The LoRA MAP model of ``seed`` (stage ``map``)."""
        if seed not in self._runs:
            self._runs[seed] = map_run(self.cfg, seed, self.device)
        return self._runs[seed]

    @property
    def runs(self) -> list[MapRun]:
        """:meth:`run` of every seed of the profile."""
        return [self.run(s) for s in self.cfg.seeds]

    def fit(self, seed: int) -> tuple[Stage, LaplacePosterior]:
        """The ``laplace`` stage of ``seed`` and its posterior (on the study's device)."""
        if seed not in self._fits:
            self._fits[seed] = fit_laplace(self.cfg, self.run(seed), self.device)
        return self._fits[seed]

    @property
    def fits(self) -> list[tuple[Stage, LaplacePosterior]]:
        """:meth:`fit` of every seed of the profile."""
        return [self.fit(s) for s in self.cfg.seeds]

    def seed(self, seed: int) -> SeedStudy:
        """Every per-seed stage of ``seed``: MAP, Laplace, the test, validation and control banks,
        and the subset predictions."""
        if seed not in self._seeds:
            cfg, device, run = self.cfg, self.device, self.run(seed)
            lap, post = self.fit(seed)
            bank_stage, bank = build_bank(cfg, run, post, lap, device)
            val = build_bank(cfg, run, post, lap, device, split="val")
            subsets = subset_predictions(cfg, run, bank, bank_stage, device, val)
            control, _ = build_bank(cfg, run, post, lap, device, control=True)
            control_val, _ = build_bank(cfg, run, post, lap, device, split="val", control=True)
            self._seeds[seed] = SeedStudy(seed, run, post, lap, bank_stage, subsets, val[0], control, control_val)
        return self._seeds[seed]

    @property
    def seeds(self) -> list[SeedStudy]:
        """:meth:`seed` of every seed of the profile, in ``cfg.seeds`` order."""
        return [self.seed(s) for s in self.cfg.seeds]

    @cached_property
    def curvature_quality(self) -> pd.DataFrame:
        """The curvature-quality table of the first seed (:mod:`lib.stages.quality`); a ValueError
        when ``laplace.quality_images`` is 0."""
        return curvature_quality(self.cfg, self.run(self.cfg.seeds[0]), self.device)[1]

    @cached_property
    def attribution_tables(self) -> AttributionTables:
        """Everything the ``attribution`` stage holds (:class:`~lib.stages.attribution.AttributionTables`)."""
        return load_attribution(attribution_stage(self.cfg, self.seeds, self.device))

    @property
    def attribution(self) -> Attribution:
        """Δ_ECE of every named posterior with its intervals, replicates and isotropic control
        (:func:`lib.attribution.attribution`)."""
        return self.attribution_tables.attribution

    @property
    def ranks(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Rank probabilities (blocks × ranks) and per-block rank intervals (:func:`lib.attribution.rank_analysis`)."""
        return self.attribution_tables.heat, self.attribution_tables.ranks

    @property
    def shapley(self) -> pd.DataFrame:
        """Shapley values of the blocks with their intervals (:func:`lib.attribution.shapley`)."""
        return self.attribution_tables.shapley

    @property
    def validation(self) -> pd.DataFrame:
        """Validation Δ_ECE of every named posterior (:func:`lib.attribution.validation_table`)."""
        return self.attribution_tables.validation


def open_study(profile: str, params: Mapping[str, Any]) -> Study:
    """The :class:`Study` of ``params`` (the validated dict the runner
    injects, :func:`lib.config.load_params`) on the device that ``params['device']`` resolves to
    (:func:`lib.pipeline.resolve_device`); ``profile`` names the params file in error messages."""
    cfg = Config.from_dict(params, source=f"params/{profile}.yml")
    return Study(cfg, resolve_device(cfg))


class Chapter(NamedTuple):
    """What a chapter starts from (:func:`open_chapter`): its :class:`Study`, the profile's
    :class:`~lib.config.Config` and the device the study computes on."""

    study: Study
    cfg: Config
    device: torch.device


def open_chapter(profile: str, params: Mapping[str, Any]) -> Chapter:
    """The chapter preamble, one line after the parameters cell::

        study, cfg, device = open_chapter(profile, params)

    (:func:`open_study` of the injected ``profile`` and ``params``). Opening the study computes
    nothing: a stage is computed, or loaded, when the chapter first asks for it."""
    study = open_study(profile, params)
    return Chapter(study, study.cfg, study.device)
