"""The shift and OOD evaluation of a study's seeds, as cached stages (:mod:`lib.shift` holds the metrics).

For each seed of the study (:attr:`lib.study.Study.seeds`): the corrupted test sets of the
profile's ``shift`` section (``corrupt`` stages, :mod:`lib.corruptions`), the probabilities of MAP, temperature
scaling and the chosen Laplace posteriors on them and on the OOD sets (``shift_probs`` stages,
one perturbation bank per image set, the same posterior samples as the study's test bank), and
from those the tables of :func:`evaluate_shift`.

Cost. The perturbation banks dominate: ``seeds × (|corruptions| · |severities| · max_images + near +
|far_ood_sets| · far_ood_images)`` bank images against ``seeds × (test + validation)`` for the study itself.
Measured on the shared 2-core CPU (one thread): generating all 12 corruptions × 5 severities of 1,000
CIFAR images takes 20 s (cached once, shared by the seeds); the OOD table of 15 methods on 5,000 +
5,000 images with 2,000 resamples 25 s on the CPU (the bootstraps run on ``device``); the whole
evaluation on the smoke profile (2 seeds, 4 corruptions × 3 severities × 96 images, three far-OOD
sets of 96 images) 24 s, 0.8 s when cached.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import Tensor
from tqdm import tqdm

from lib.artifacts import Stage, cached
from lib.config import Config, ShiftConfig
from lib.corruptions import CorruptedSplit, cached_corrupt_split
from lib.data import Split, batches
from lib.laplace.predictive import Bank, iter_subset_probs, perturbation_bank
from lib.pipeline import numerics
from lib.ood_sets import cached_ood_images, near_ood_images
from lib.shift import gain_intervals, ood_table, rank_agreement, shift_metrics
from lib.stages.seed import SeedStudy
from lib.temperature import apply_temperature
from lib.train import amp_dtype

__all__ = [
    "shift_config",
    "corrupted_test_set",
    "corrupted_test_sets",
    "ood_set_names",
    "ood_set",
    "ShiftPredictions",
    "clean_predictions",
    "shift_predictions",
    "corrupted_predictions",
    "ood_predictions",
    "ShiftResults",
    "evaluate_shift",
    "study_shift",
]


def shift_config(cfg: Config) -> ShiftConfig:
    """The profile's ``shift`` section; a ValueError naming the key when the profile has none."""
    if cfg.shift is None:
        raise ValueError(f"profile '{cfg.profile}' has no 'shift' section in its params; add one (see lib.config.ShiftConfig)")
    return cfg.shift


def corrupted_test_set(cfg: Config, test: Split, name: str, severity: int) -> CorruptedSplit:
    """Corruption ``name`` at ``severity`` applied to the test split, a cached ``corrupt`` stage
    keyed by the data section (without its root folder) and the shift settings, on the
    ``shift.max_images`` subset of test images that every corruption shares
    (:func:`lib.corruptions.subsample_index`)."""
    sc = shift_config(cfg)
    data = {k: v for k, v in cfg.section("data")["data"].items() if k != "root"}
    inputs = {"data": data, "split": "test", "images": len(test)}
    return cached_corrupt_split(test, inputs, name, severity, seed=sc.seed, max_images=sc.max_images)


def corrupted_test_sets(cfg: Config, test: Split) -> Iterator[CorruptedSplit]:
    """:func:`corrupted_test_set` of every corruption × severity of ``cfg.shift``, in that order."""
    sc = shift_config(cfg)
    for name in sc.corruptions:
        for severity in sc.severities:
            yield corrupted_test_set(cfg, test, name, severity)


def ood_set_names(cfg: Config) -> list[str]:
    """The OOD sets of the profile: ``'near'`` (the held-out classes, when the profile fine-tunes
    on some classes of a real dataset), then the far-OOD sets of ``shift.far_ood_sets``."""
    near = cfg.data.name != "synthetic" and cfg.data.classes is not None
    return (["near"] if near else []) + list(shift_config(cfg).far_ood_sets)


def ood_set(cfg: Config, name: str, size: int) -> tuple[Tensor, dict, list[Stage]]:
    """The images of OOD set ``name`` (:func:`ood_set_names`) at ``size`` px, uint8 (N, 3, size, size),
    the key that names them in a ``shift_probs`` stage and their upstream stages: the near-OOD
    images (:func:`lib.ood_sets.near_ood_images`, not a stage) or a far-OOD ``ood_images`` stage."""
    sc = shift_config(cfg)
    if name == "near":
        return (near_ood_images(cfg, max_images=sc.near_ood_images, seed=sc.seed),
                {"set": "near", "data": cfg.data.name, "classes": list(cfg.data.classes), "n": sc.near_ood_images,
                 "seed": sc.seed}, [])
    far = cached_ood_images(name, sc.far_ood_images, seed=sc.seed, size=size)
    return far.images, {"ood_images": far.stage.key}, [far.stage]


@dataclass(frozen=True)
class ShiftPredictions:
    """Predictive probabilities of every method of one seed on one image set.

    Attributes:
        names: the study's named posteriors.
        probs: (P, N, C) their GLM predictive, each at its covariance scale κ_S of the study.
        det: (N, C) MAP softmax. ts: (N, C) temperature-scaled MAP (the study's temperature).
        labels: (N,) int64 (zeros for OOD images without labels).
    """

    names: tuple[str, ...]
    probs: Tensor
    det: Tensor
    ts: Tensor
    labels: Tensor

    def methods(self, posteriors: Sequence[str]) -> dict[str, Tensor]:
        """``{'MAP': det, 'temperature scaling': ts, 'Laplace, <name>': probs of name}`` for the given
        posteriors (e.g. ``'all'``, ``'single 3'``), in that order, ready for :func:`lib.shift.shift_metrics`."""
        unknown = [p for p in posteriors if p not in self.names]
        if unknown:
            raise ValueError(f"posteriors {unknown} are not named posteriors of the study; use some of {list(self.names)}")
        out = {"MAP": self.det, "temperature scaling": self.ts}
        out.update({f"Laplace, {p}": self.probs[self.names.index(p)] for p in posteriors})
        return out


def _posteriors(study: SeedStudy) -> tuple[list[str], Tensor, Tensor, float]:
    """Names, bool masks (P, L), scales κ_S (P,) and temperature of the study's named posteriors."""
    named = study.named()
    return list(named["names"]), named["masks"], named["scales"], float(named["temperature"])


def _predict(bank: Bank, names: list[str], masks: Tensor, scales: Tensor, temperature: float, method: str,
             device: torch.device) -> dict:
    probs = torch.cat([p.cpu() for _, p in iter_subset_probs(bank.to(device), masks.to(device), method=method,
                                                             scales=scales)])
    return {"names": names, "probs": probs, "det": torch.softmax(bank.map_logits.float(), -1),
            "ts": apply_temperature(bank.map_logits, temperature), "labels": bank.labels}


def clean_predictions(cfg: Config, study: SeedStudy, device: torch.device) -> ShiftPredictions:
    """:class:`ShiftPredictions` on the study's own test set, from its cached test bank (no new bank)."""
    names, masks, scales, temperature = _posteriors(study)
    d = _predict(study.test_bank(), names, masks, scales, temperature, cfg.predictive.method, device)
    return ShiftPredictions(tuple(d["names"]), d["probs"], d["det"], d["ts"], d["labels"])


def shift_predictions(
    cfg: Config,
    study: SeedStudy,
    images: Tensor,
    labels: Tensor | None,
    key: Mapping,
    device: torch.device,
    upstream: Sequence[Stage] = (),
) -> ShiftPredictions:
    """Probabilities of MAP, temperature scaling and the study's posteriors on new ``images``.

    A perturbation bank of the images (:func:`lib.laplace.predictive.perturbation_bank`, the
    study's seed, samples and batching) gives each named posterior its GLM predictive at the
    study's κ_S; MAP and temperature scaling use the MAP logits and the study's temperature.
    Cached as a ``shift_probs`` stage downstream of the study's ``subsets`` stage and ``upstream``
    (e.g. the images' ``corrupt`` stage); ``key`` (JSON-able) names the image set. On the study's
    test images it reproduces the study's probabilities. The stage is keyed by this module's code
    (:func:`lib.artifacts.cached`).

    Args:
        images: uint8 (N, 3, H, W). labels: (N,) int64, or None for OOD images (stored as zeros).
    """
    pc = cfg.predictive
    if labels is None:
        labels = torch.zeros(images.shape[0], dtype=torch.int64)
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must be (N,) = ({images.shape[0]},); got {tuple(labels.shape)}")

    def compute(st: Stage) -> None:
        names, masks, scales, temperature = _posteriors(study)
        bank = perturbation_bank(
            study.run.model, study.posterior,
            batches(Split(images, labels), pc.batch_size, preprocess=study.run.preprocess, device=device),
            n_samples=pc.n_samples, seed=study.seed, device=device, dtype=amp_dtype(device) or torch.float32,
        )
        torch.save(_predict(bank, names, masks, scales, temperature, pc.method, device), st.file("probs.pt"))

    st = cached("shift_probs", {"images": dict(key), "n_samples": pc.n_samples,
                                "batch_size": pc.batch_size, "method": pc.method, "numerics": numerics(device)},
                code=__name__, compute=compute, upstream=[study.subsets, *upstream])
    d = torch.load(st.file("probs.pt"), weights_only=True)
    return ShiftPredictions(tuple(d["names"]), d["probs"], d["det"], d["ts"], d["labels"])


def corrupted_predictions(cfg: Config, study: SeedStudy, cs: CorruptedSplit, device: torch.device) -> ShiftPredictions:
    """:func:`shift_predictions` of ``study`` on the corrupted test set ``cs`` (:func:`corrupted_test_set`),
    downstream of its ``corrupt`` stage."""
    return shift_predictions(cfg, study, cs.split.x, cs.split.y, {"corrupt": cs.stage.key}, device,
                             upstream=[cs.stage])


def ood_predictions(cfg: Config, study: SeedStudy, images_key_upstream: tuple[Tensor, dict, list[Stage]],
                    device: torch.device) -> ShiftPredictions:
    """:func:`shift_predictions` of ``study`` on an OOD set, given as :func:`ood_set` returns it (no labels)."""
    images, key, upstream = images_key_upstream
    return shift_predictions(cfg, study, images, None, key, device, upstream=upstream)


@dataclass(frozen=True)
class ShiftResults:
    """Tables of :func:`evaluate_shift`.

    Attributes:
        metrics: :func:`lib.shift.shift_metrics` rows for the clean test set (severity 0) and every
            corruption × severity, per ``seed``.
        gains: ECE gain ``severity, reference, method, gain, lower, upper``, averaged over seeds
            (:func:`lib.shift.gain_intervals`; severity 0: the clean test set, else all corruptions of
            that severity pooled, images resampled as clusters): over ``reference = 'MAP'`` of
            temperature scaling and the reported posteriors, and over ``'temperature scaling'`` of
            the posteriors (ECE_TS − ECE_m, paired: the same resamples).
        ood: :func:`lib.shift.ood_table` rows for the near-OOD set (``ood_set = 'near'``, when the
            profile has held-out classes) and each far-OOD set of ``shift.far_ood_sets`` (``ood_set``
            its name, :mod:`lib.ood_sets`), with differences to MAP, per ``seed``.
        ranks: per seed and severity, Kendall's τ-b between the single-block ΔECE on the clean subset
            and on its corrupted copies (corruptions of that severity pooled), with its interval:
            ``seed, severity, tau, lower, upper``.
    """

    metrics: pd.DataFrame
    gains: pd.DataFrame
    ood: pd.DataFrame
    ranks: pd.DataFrame


def evaluate_shift(
    cfg: Config,
    studies: Sequence[SeedStudy],
    device: torch.device,
    posteriors: Sequence[str],
) -> ShiftResults:
    """Calibration under shift, OOD detection and the per-block ranking under shift.

    ``posteriors``: named posteriors reported next to MAP and temperature scaling; with a
    ``baselines`` section in the profile, also the LoRA ensembles of its ``ensemble.sizes`` (rows
    ``'LoRA ensemble, M = m'``: the mean of the softmax of the studied seeds' MAP models, the
    members of :mod:`lib.baselines.ensemble`, which costs no new stage).
    The rank agreement uses every ``'single ℓ'`` posterior and pools the corruptions of a
    severity; its bootstrap (like that of ``gains``) resamples test images, each with all its
    corrupted copies (cluster bootstrap, :func:`lib.shift.cluster_counts`). Intervals:
    ``stats.n_boot`` resamples at level ``1 − stats.alpha``, drawn on ``device`` (the bootstraps run
    there) from generators seeded by the training seed (per-seed tables) or by ``shift.seed``
    (``gains``, one draw shared by all seeds).
    """
    sc, st = shift_config(cfg), cfg.stats
    if not studies:
        raise ValueError("studies is empty: pass the SeedStudy of at least one seed (lib.study.Study.seeds)")
    seeds = [study.seed for study in studies]
    sizes = sorted(cfg.baselines.ensemble.sizes) if cfg.baselines is not None else []
    if sizes and max(sizes) > len(seeds):
        raise ValueError(f"baselines.ensemble.sizes {sizes} need as many studied seeds; got {len(seeds)} ({seeds})")
    ensembles = [f"LoRA ensemble, M = {m}" for m in sizes]
    compared = ["temperature scaling", *[f"Laplace, {p}" for p in posteriors], *ensembles]

    def generator(seed: int) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(seed)

    def on_device(probs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.to(device) for k, v in probs.items()}

    size = studies[0].run.splits.test.x.shape[-1]
    ood_sets = {name: ood_set(cfg, name, size) for name in ood_set_names(cfg)}

    # Phase 1: every seed's predictions on the clean, corrupted and OOD images (cached stages).
    cleans, shifted, oods = [], [], []
    for study in studies:
        cleans.append(clean_predictions(cfg, study, device))
        shifted.append([(cs, corrupted_predictions(cfg, study, cs, device))
                        for cs in tqdm(list(corrupted_test_sets(cfg, study.run.splits.test)),
                                       desc=f"shift (seed {study.seed})", disable=None)])
        oods.append({name: ood_predictions(cfg, study, images_key_upstream, device)
                     for name, images_key_upstream in ood_sets.items()})
    labels = cleans[0].labels
    if any(not torch.equal(c.labels, labels) for c in cleans):
        raise ValueError("the studies' test sets differ; the seeds of one profile must share data.split_seed")

    def methods(i: int, preds: Sequence[ShiftPredictions]) -> dict[str, Tensor]:
        """Seed i's methods on one image set (``preds``: every seed's predictions on it): MAP,
        temperature scaling, the posteriors, and the LoRA ensembles of the seeds' MAP models, member
        j being seed ``seeds[(i + j) mod S]`` (:func:`lib.baselines.ensemble.member_seeds`)."""
        out = preds[i].methods(posteriors)
        for m, name in zip(sizes, ensembles):
            out[name] = torch.stack([preds[(i + j) % len(preds)].det for j in range(m)]).mean(0)
        return out

    # Phase 2: the tables.
    metrics, ood, ranks, clean_methods, pooled = [], [], [], [], []
    for i, (study, clean) in enumerate(zip(studies, cleans)):
        singles = [clean.names.index(n) for n in clean.names if n.startswith("single ")]
        clean_methods.append(methods(i, cleans))
        metrics.append(shift_metrics(clean_methods[i], clean.labels, corruption="clean", severity=0,
                                     n_bins=st.n_bins).assign(seed=study.seed))
        by_severity: dict[int, list[tuple[ShiftPredictions, Tensor, dict[str, Tensor]]]] = {}
        for k, (cs, pred) in enumerate(shifted[i]):
            ms = methods(i, [sh[k][1] for sh in shifted])
            metrics.append(shift_metrics(ms, pred.labels, corruption=cs.name, severity=cs.severity,
                                         n_bins=st.n_bins).assign(seed=study.seed))
            by_severity.setdefault(cs.severity, []).append((pred, cs.index, ms))
        seed_pooled = {}
        for severity, preds in sorted(by_severity.items()):
            idx = torch.cat([ix for _, ix, _ in preds])
            det = torch.cat([p.det for p, _, _ in preds])
            seed_pooled[severity] = (idx, det, torch.cat([torch.stack([m[k] for k in compared]) for _, _, m in preds], 1))
            if len(singles) >= 2:
                res = rank_agreement(
                    (clean.det[idx].to(device), clean.probs[singles][:, idx].to(device)),
                    (det.to(device), torch.cat([p.probs[singles] for p, _, _ in preds], 1).to(device)),
                    clean.labels[idx].to(device), n_resamples=st.n_boot, generator=generator(study.seed),
                    groups=idx.to(device), n_bins=st.n_bins, alpha=st.alpha,
                )
                ranks.append({"seed": study.seed, "severity": severity, "tau": res.tau, "lower": res.lower,
                              "upper": res.upper})
        pooled.append(seed_pooled)
        for set_name in ood_sets:
            ood.append(ood_table(on_device(clean_methods[i]), on_device(methods(i, [o[set_name] for o in oods])),
                                 ood_set=set_name, n_resamples=st.n_boot, generator=generator(study.seed),
                                 alpha=st.alpha, reference="MAP").assign(seed=study.seed))

    gains = []
    sets = {0: (None, labels, torch.stack([c.det for c in cleans]),
                torch.stack([torch.stack([c[k] for k in compared]) for c in clean_methods]))}
    for severity, (idx, _, _) in pooled[0].items():
        sets[severity] = (idx, labels[idx], torch.stack([p[severity][1] for p in pooled]),
                          torch.stack([p[severity][2] for p in pooled]))
    for severity, (groups, y, det, probs) in sets.items():
        g = None if groups is None else groups.to(device)
        for reference, ref, others, names in (("MAP", det, probs, compared),
                                              ("temperature scaling", probs[:, 0], probs[:, 1:], compared[1:])):
            if not names:
                continue
            est, lo, hi = gain_intervals(ref.to(device), others.to(device), y.to(device), n_resamples=st.n_boot,
                                         generator=generator(sc.seed), groups=g, n_bins=st.n_bins, alpha=st.alpha)
            gains += [{"severity": severity, "reference": reference, "method": k, "gain": float(e), "lower": float(a),
                       "upper": float(b)} for k, e, a, b in zip(names, est, lo, hi)]
    return ShiftResults(pd.concat(metrics, ignore_index=True), pd.DataFrame(gains), pd.concat(ood, ignore_index=True),
                        pd.DataFrame(ranks, columns=["seed", "severity", "tau", "lower", "upper"]))


def study_shift(study: Any, posteriors: Sequence[str]) -> ShiftResults:
    """:func:`evaluate_shift` of every seed of ``study`` (a :class:`lib.study.Study` whose profile
    has a ``shift`` section) on its device: the analysis behind the chapter "Shift and
    out-of-distribution". Its stages take the per-seed records (``study.seeds``), not the study."""
    return evaluate_shift(study.cfg, study.seeds, study.device, posteriors)
