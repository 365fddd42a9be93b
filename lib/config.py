"""Typed, frozen configuration of one profile (``params/<profile>.yml``).

Every section is a frozen dataclass; :func:`load_params` parses a YAML file, rejects unknown or
mistyped keys with a one-line :class:`ParamsError` that names the file, the key and the fix, and
returns the validated plain ``dict`` that papermill injects into the chapters. Chapters turn that
dict back into a :class:`Config` with :meth:`Config.from_dict`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from lib.corruption_names import CORRUPTION_NAMES, SEVERITIES
from lib.paths import PARAMS, ROOT


DENSE_BLOCK_MAX_PARAMS = 32_768
"""Largest number of LoRA parameters ``P_ℓ`` of one transformer block for which a dense block GGN
(``laplace.structure: dense_block``, and the curvature-quality table of ``laplace.quality_images``)
is allowed: its ``P_ℓ²`` float32 entries take 4.3 GB at the limit (cifar10-transfer: 24,576
parameters, 2.4 GB; vit-b16-cifar100: 196,608, 155 GB, refused)."""

FarOodSet = Literal["natural", "digits", "synthetic"]
FAR_OOD_SET_NAMES: tuple[str, ...] = typing.get_args(FarOodSet)
"""The far-OOD sets of :mod:`lib.ood_sets` a profile may name in ``shift.far_ood_sets``."""
DIGITS = 1797
"""Images in scikit-learn's digits set (the largest ``shift.far_ood_images`` with ``digits``)."""

CIFAR_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
"""torchvision's folder of each real dataset inside ``data.root``."""


class ParamsError(ValueError):
    """A params file or dict is invalid; the message is one line naming the key and the fix."""


def _at_least(default: Any, low: float) -> Any:
    """A field whose value (when not None) must be ≥ ``low``."""
    return field(default=default, metadata={"low": low})


def _above(default: Any, low: float, high: float | None = None) -> Any:
    """A field whose value (when not None) must be > ``low`` (and < ``high`` when given)."""
    return field(default=default, metadata={"low": low, "open": True, "high": high})


@dataclass(frozen=True)
class SyntheticConfig:
    """Seeded class-conditional synthetic images (CI profile)."""

    n_train: int = _at_least(512, 1)
    n_val: int = _at_least(256, 1)
    n_test: int = _at_least(512, 1)
    native_size: int = _at_least(32, 4)
    noise: float = _at_least(0.6, 0.0)


@dataclass(frozen=True)
class DataConfig:
    """Dataset, class subset and the seeded train/validation/test split.

    ``root`` is relative to the repository root unless absolute. ``classes`` keeps only those
    original class ids (relabelled 0..k-1 in the given order). The validation split is carved out
    of the training set and is what prior precision and temperature are tuned on, never the test set.
    ``classes``, ``train_per_class``, ``val_size`` and ``test_size`` apply to CIFAR; synthetic data
    take their sizes from ``synthetic`` (setting them for synthetic data is an error).
    """

    name: Literal["synthetic", "cifar10", "cifar100"] = "synthetic"
    root: str = "data"
    download: bool = False
    classes: tuple[int, ...] | None = None
    num_classes: int = _at_least(10, 2)
    train_per_class: int | None = _at_least(None, 1)
    val_size: int = _at_least(500, 1)
    split_seed: int = 0
    test_size: int | None = _at_least(None, 1)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass(frozen=True)
class ModelConfig:
    """A timm ViT by name; ``pretrained`` loads hub weights, ``checkpoint`` a local file instead.

    ``checkpoint``: a timm state dict, ``.safetensors`` or a ``torch.save`` file; with
    ``checkpoint_sha256`` (64 hex digits) the file must have exactly that SHA-256 (a backbone
    shipped with the project, :mod:`lib.backbone`), so a replaced or corrupted file is an error,
    never a silently different study.

    ``kwargs`` go to ``timm.create_model``; its dropout rates (``*drop_rate``, ``drop_path_rate``)
    must stay 0: dropout draws from the global random stream, so a resumed run would not be
    bit-identical and the Laplace fit would linearise a stochastic network.
    """

    name: str = "vit_tiny_patch16_224"
    pretrained: bool = False
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PretrainConfig:
    """Backbone pre-training from scratch on a disjoint class subset (cifar10-transfer profile)."""

    classes: tuple[int, ...] = (0, 1, 2, 3, 4)
    seed: int = 0
    epochs: int = _at_least(30, 1)
    batch_size: int = _at_least(256, 1)
    lr: float = _above(1e-3, 0.0)
    weight_decay: float = _at_least(0.05, 0.0)
    warmup_epochs: int = _at_least(2, 0)
    label_smoothing: float = field(default=0.1, metadata={"low": 0.0, "high": 1.0})
    augment: bool = True
    compile: bool = False


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters (peft) on the attention and MLP projections of every block (no adapter
    dropout: it would make the MAP network stochastic, see :class:`ModelConfig`)."""

    r: int = _at_least(8, 1)
    alpha: float = _above(16.0, 0.0)
    targets: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")


@dataclass(frozen=True)
class TrainConfig:
    """MAP fine-tuning of LoRA + head: Adam with warm-up and cosine schedule.

    ``weight_decay`` is the *coupled* L2 coefficient ``λ`` on the mean loss (part of the
    objective, not AdamW's decoupled decay), so that the optimum is the MAP under the Gaussian
    prior of precision ``δ = λ·N``; see :mod:`lib.train`.
    """

    epochs: int = _at_least(2, 1)
    batch_size: int = _at_least(64, 1)
    lr: float = _above(1e-3, 0.0)
    weight_decay: float = _at_least(1e-4, 0.0)
    warmup_epochs: float = _at_least(0.0, 0.0)
    grad_clip: float | None = _above(1.0, 0.0)
    augment: bool = False
    compile: bool = False


@dataclass(frozen=True)
class LaplaceConfig:
    """Laplace approximation over the LoRA parameters.

    ``prior_init`` None starts from δ = λ·N, the prior precision the MAP training used (see
    :mod:`lib.train`); ``rank`` truncates large Kronecker factors to their top eigenpairs.
    ``fit_size`` limits the training examples used for the curvature (None: all);
    ``class_chunk`` output vectors share one batched backward pass in the curvature fit (a speed
    knob: same factors, peak memory grows with it; see :mod:`lib.laplace.curvature`).
    ``structure: dense_block`` keeps the exact GGN of each block's LoRA parameters dense
    (:mod:`lib.laplace.exact`; ``kfac`` and ``rank`` do not apply), allowed for blocks of at most
    :data:`DENSE_BLOCK_MAX_PARAMS` parameters. ``quality_images``: fit-set images on which chapter 3
    compares K-FAC-expand, K-FAC-reduce and the diagonal GGN with the exact block GGN
    (:mod:`lib.laplace.quality`; 0: no comparison; also limited to dense-sized blocks).
    """

    structure: Literal["kron", "diag", "dense_block"] = "kron"
    kfac: Literal["expand", "reduce"] = "reduce"
    fisher: Literal["exact", "mc"] = "exact"
    mc_samples: int = _at_least(1, 1)
    prior_tuning: Literal["marglik", "none"] = "marglik"
    prior_per_block: bool = True
    prior_init: float | None = _above(None, 0.0)
    rank: int | None = _at_least(None, 1)
    restricted_prior: Literal["inherit", "retune"] = "inherit"
    fit_size: int | None = _at_least(None, 1)
    batch_size: int = _at_least(64, 1)
    class_chunk: int = _at_least(10, 1)
    quality_images: int = _at_least(0, 0)

    @property
    def approximation(self) -> str:
        """The curvature approximation in words, as tables and chapters name it: ``K-FAC-reduce`` or
        ``K-FAC-expand`` (``structure: kron``, after ``kfac``), ``diagonal`` (``diag``), ``dense block``
        (``dense_block``: the exact GGN of each block kept dense)."""
        return {"kron": f"K-FAC-{self.kfac}", "diag": "diagonal", "dense_block": "dense block"}[self.structure]


@dataclass(frozen=True)
class PredictiveConfig:
    """Linearised (GLM) predictive: MC over logits and probit.

    ``scale``: ``'val_nll'`` multiplies each subset's posterior covariance by ``κ_S``, the value
    of a log grid (``scale_range`` end points, ``scale_points`` values) with the lowest
    validation NLL, computed from a perturbation bank of the first ``scale_images`` validation
    images (None: all); ``'none'`` keeps ``κ = 1`` (:mod:`lib.laplace.scale`).

    ``control_range`` / ``control_points``: the log grid of the isotropic control's noise variance
    ``σ²`` (:mod:`lib.laplace.isotropic`), tuned per block on the same validation images and by the
    same rule as ``κ_S`` whatever ``scale`` says. It is a variance per LoRA weight, not a multiple of a
    posterior covariance, so it spans more decades than ``scale_range``; a ``σ²`` at either end of
    it is reported (:func:`lib.attribution_findings.control_findings`).
    """

    n_samples: int = _at_least(32, 2)
    batch_size: int = _at_least(64, 1)
    method: Literal["mc", "probit"] = "mc"
    scale: Literal["none", "val_nll"] = "none"
    scale_range: tuple[float, ...] = (1e-4, 10.0)
    scale_points: int = _at_least(26, 2)
    scale_images: int | None = _at_least(None, 1)
    control_range: tuple[float, ...] = (1e-9, 1e1)
    control_points: int = _at_least(41, 2)


@dataclass(frozen=True)
class StatsConfig:
    """Calibration bins, bootstrap sizes and the levels of every interval and test.

    ``n_boot`` replicates for every interval: each draws one resample of the test images and one of
    the validation images, shared by every seed, and re-chooses κ_S, the control's σ² and the
    temperature on the latter (:func:`lib.stats.tuned_bootstrap`); ``n_boot_shapley`` does the same
    for the ECE of the block subsets behind the Shapley values (:mod:`lib.stages.subsets`): all
    2^L of them when ``shapley_permutations`` is None (exact values), else the prefixes of that many
    sampled block orderings, in antithetic pairs, whose Monte Carlo error widens the intervals
    (:mod:`lib.shapley`); ``n_boot_mc`` resamples the
    predictive's posterior samples for its Monte Carlo error (:func:`lib.stats.mc_error_delta_ece`).

    Every interval for the models at hand is a two-sided basic interval at level ``1 − alpha``
    (:func:`lib.stats.basic_interval`; davison1997bootstrap), which subtracts the upward bias of
    binned ECE that the replicates repeat instead of adding it as the percentile interval does;
    the interval over training runs is :func:`lib.stats.seed_spread_interval`. BCa
    (efron1987better) would need the jackknife acceleration of the whole procedure, which is
    ill-defined for a statistic that jumps between grid values of κ_S. Coverage is checked by
    simulation (:mod:`lib.coverage`, ``tests/test_coverage.py``, ``benchmarks/bench_coverage.py``).

    ``equivalence_margin``: the margin m (a fraction; 0.005 = 0.5 pp of ECE) within which a paired
    difference of ΔECE is called equivalent to zero, by two one-sided tests at level ``alpha``
    (:mod:`lib.equivalence`, schuirmann1987comparison); an interval that merely holds zero is
    "cannot be distinguished", never "equivalent".
    """

    n_bins: int = _at_least(15, 1)
    n_boot: int = _at_least(2000, 1)
    n_boot_shapley: int = _at_least(200, 1)
    n_boot_mc: int = _at_least(200, 1)
    shapley_permutations: int | None = _at_least(None, 4)
    alpha: float = _above(0.05, 0.0, 1.0)
    top_k: int = _at_least(3, 1)
    equivalence_margin: float = _above(0.005, 0.0, 1.0)


@dataclass(frozen=True)
class DeployConfig:
    """Latency and memory measurement of the predictive for each choice of Bayesian blocks: the
    median and inter-quartile range over ``n_iters`` timed batches after ``n_warmup`` untimed ones
    (:func:`lib.deploy.time_call`); the quartiles need a few dozen batches to be stable."""

    batch_size: int = _at_least(64, 1)
    n_warmup: int = _at_least(3, 0)
    n_iters: int = _at_least(25, 1)


@dataclass(frozen=True)
class ShiftConfig:
    """Calibration under dataset shift and OOD detection (:mod:`lib.shift`, :mod:`lib.corruptions`,
    :mod:`lib.ood_sets`).

    ``corruptions`` at ``severities`` are applied to ``max_images`` test images (a seeded subset,
    the same for every corruption; None: all), seeded by ``seed``. ``near_ood_images`` limits the
    held-out-class test images of a real dataset (None: all). ``far_ood_sets``: the far-OOD sets of
    :data:`lib.ood_sets.FAR_OOD_SETS` evaluated (``natural``: patches of scikit-learn's sample
    photographs, ``digits``: its handwritten digits, ``synthetic``: uniform noise and smooth
    colour blobs), each of ``far_ood_images`` images (at most 1,797 with ``digits``), seeded by ``seed``.
    """

    corruptions: tuple[str, ...] = (
        "gaussian_noise", "shot_noise", "gaussian_blur", "defocus_blur", "brightness", "fog",
        "contrast", "jpeg_compression", "pixelate", "saturate",
    )
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    max_images: int | None = _at_least(1000, 1)
    seed: int = 0
    near_ood_images: int | None = _at_least(None, 1)
    far_ood_sets: tuple[FarOodSet, ...] = FAR_OOD_SET_NAMES
    far_ood_images: int = _at_least(1000, 1)


@dataclass(frozen=True)
class FinetuneConfig:
    """The brief fine-tune from the MAP adapters of the same seed that the trained baselines (MC
    dropout, the variational LoRA) run with the MAP recipe (:mod:`lib.baselines.finetune`):
    ``epochs``, the peak ``lr`` (None: ``train.lr``) and ``warmup_epochs``."""

    epochs: int = _at_least(6, 1)
    lr: float | None = _above(None, 0.0)
    warmup_epochs: float = _at_least(0.5, 0.0)


@dataclass(frozen=True)
class LastLayerConfig:
    """Last-layer Laplace (:mod:`lib.baselines.last_layer`).

    ``structure``: the head's GGN kept ``full`` or ``kron``; the prior is one scalar δ for the
    whole head (laplace-torch 0.3's last-layer classes accept a scalar or a full diagonal, not one
    δ per tensor); ``prior_init``: δ where the marginal-likelihood search starts (None: δ = λ·N of
    the MAP training); ``marglik_steps``/``marglik_lr``: Adam steps and step size on log δ;
    ``batch_size``: images per curvature and prediction batch.
    """

    structure: Literal["full", "kron"] = "kron"
    prior_init: float | None = _above(None, 0.0)
    marglik_steps: int = _at_least(100, 1)
    marglik_lr: float = _above(0.1, 0.0)
    batch_size: int = _at_least(64, 1)


@dataclass(frozen=True)
class EnsembleConfig:
    """LoRA ensembles of the study's MAP models (:mod:`lib.baselines.ensemble`): the sizes M
    reported (nested, each at most the number of ``seeds``)."""

    sizes: tuple[int, ...] = (3, 5)


@dataclass(frozen=True)
class McDropoutConfig:
    """MC dropout (:mod:`lib.baselines.mc_dropout`): ``rate``, the LoRA dropout p of the fine-tune
    and of the test passes; ``samples``, the K stochastic forward passes per image."""

    rate: float = _above(0.1, 0.0, 1.0)
    samples: int = _at_least(16, 1)


@dataclass(frozen=True)
class VariationalConfig:
    """The variational LoRA's own settings (:mod:`lib.baselines.variational`, formulas there; the
    point parameters follow the fine-tune's MAP recipe).

    ``log_alpha_lr``: Adam step size of log α (constant); ``init_log_alpha``: log α of every rank
    at the start (−4: gate std 0.14); ``kl_scale``: c (the seed's 0.05–0.1); ``kl_freeze_epochs``,
    ``beta_warmup_epochs``: the KL warm-up β_e; ``sample_warmup_epochs``: epochs at the gate mean
    before the gates are drawn; ``prune_every``, ``prune_start_epoch`` (None: after the KL
    warm-up), ``prune_threshold``, ``min_ranks``: pruning; ``samples``: gate draws K per test image.
    """

    log_alpha_lr: float = _above(0.05, 0.0)
    init_log_alpha: float = -4.0
    kl_scale: float = _above(0.1, 0.0)
    kl_freeze_epochs: int = _at_least(0, 0)
    beta_warmup_epochs: int = _at_least(2, 1)
    sample_warmup_epochs: int = _at_least(0, 0)
    prune_every: int = _at_least(3, 1)
    prune_start_epoch: int | None = _at_least(None, 1)
    prune_threshold: float = 3.0
    min_ranks: int = _at_least(2, 1)
    samples: int = _at_least(16, 1)


@dataclass(frozen=True)
class BaselinesConfig:
    """The baselines of the study (:mod:`lib.baselines`): the brief ``finetune`` of the trained
    ones, each method's own section, ``seeds``: on how many of the study's seeds (the first ones in
    ``seeds`` order; None: all) the baselines are run and compared with the Laplace posteriors
    (the ensembles still draw their members from all of the study's seeds), the timing batch (first ``timing_batch`` test images,
    ``timing_iters`` timed calls) and the importance scores' data (the first ``importance_batches``
    training minibatches of ``importance_batch_size`` images; the Fisher trace on the first
    ``fisher_examples`` of their images)."""

    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    last_layer: LastLayerConfig = field(default_factory=LastLayerConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    mc_dropout: McDropoutConfig = field(default_factory=McDropoutConfig)
    variational: VariationalConfig = field(default_factory=VariationalConfig)
    timing_batch: int = _at_least(64, 1)
    timing_iters: int = _at_least(5, 1)
    importance_batches: int = _at_least(64, 1)
    importance_batch_size: int = _at_least(32, 1)
    fisher_examples: int = _at_least(512, 1)
    seeds: int | None = _at_least(None, 1)


@dataclass(frozen=True)
class Config:
    """One profile: every section plus the training seeds and the device."""

    profile: str = "smoke"
    description: str = ""
    seeds: tuple[int, ...] = (0,)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig | None = None
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    laplace: LaplaceConfig = field(default_factory=LaplaceConfig)
    predictive: PredictiveConfig = field(default_factory=PredictiveConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)
    shift: ShiftConfig | None = None
    baselines: BaselinesConfig | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "params") -> "Config":
        """Build a validated config; ``source`` names the file in error messages."""
        return _build(cls, d, source, "")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able dict (tuples become lists)."""
        return _plain(dataclasses.asdict(self))

    def section(self, *names: str) -> dict[str, Any]:
        """The named sections as a plain dict, e.g. the inputs of an artifact stage."""
        full = self.to_dict()
        return {n: full[n] for n in names}

    @property
    def data_root(self) -> Path:
        """``data.root`` resolved against the repository root."""
        root = Path(self.data.root).expanduser()
        return root if root.is_absolute() else ROOT / root


def params_path(profile: str) -> Path:
    """``params/<profile>.yml``."""
    return PARAMS / f"{profile}.yml"


_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def parse_override(text: str) -> tuple[str, Any]:
    """``"stats.n_bins=20"`` → ``("stats.n_bins", 20)``: a dotted key into the params file and a
    value parsed as YAML (``seeds=[0,1]`` is a list, ``laplace.rank=null`` is None, ``x=kron`` a
    string), exactly as it would be read from the file. The key is checked when the overrides are
    validated with the file (:func:`load_params`)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not _DOTTED.fullmatch(key) or not value.strip():
        raise ParamsError(f"--set {text!r}: write KEY=VALUE with a dotted key and a YAML value, "
                          "e.g. --set stats.n_bins=20 or --set seeds=[0,1] (null for None)")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise ParamsError(f"--set {text!r}: the value is not valid YAML ({str(err).splitlines()[0]})") from None


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[tuple[str, Any]], source: str) -> dict[str, Any]:
    """A copy of the parsed params file ``raw`` with each ``(dotted key, value)`` set in turn (the
    last one wins); a section missing from the file is created, so its defaults apply to the keys
    not set. Raises :class:`ParamsError` when a key runs through a value that is not a section."""
    out = copy.deepcopy(dict(raw))
    for key, value in overrides:
        node, parts = out, key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ParamsError(f"{source}: '{'.'.join(parts[: i + 1])}' is {child!r}, not a section, so "
                                  f"--set {key}=… cannot set a key inside it")
            node = child
        node[parts[-1]] = copy.deepcopy(value)
    return out


def override_source(path: Path, overrides: Sequence[tuple[str, Any]]) -> str:
    """How error messages name a params file read with overrides: ``params/smoke.yml with --set stats.n_bins=20``."""
    if not overrides:
        return str(path)
    return f"{path} with " + " ".join(f"--set {k}={json.dumps(v, ensure_ascii=False)}" for k, v in overrides)


def load_params(path: str | Path, *, check_data: bool = True,
                overrides: Sequence[tuple[str, Any]] = ()) -> dict[str, Any]:
    """Read and validate a params YAML file; returns the full dict with defaults filled in.

    ``overrides`` (:func:`parse_override` pairs) are set into the parsed file before validation,
    so they are checked by the same rules and named in the same one-line errors.
    Raises :class:`ParamsError` (one line) for a missing file, unknown/mistyped keys, wrong types,
    or (with ``check_data``) a missing data root for a dataset that cannot be downloaded.
    """
    path = Path(path)
    if not path.is_file():
        available = ", ".join(sorted(p.stem for p in PARAMS.glob("*.yml"))) or "none"
        raise ParamsError(
            f"{path}: params file not found; pass one of the profiles in params/ ({available}) "
            f"or create {path.name}"
        )
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML ({str(err).splitlines()[0]}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    source = override_source(path, overrides)
    cfg = Config.from_dict(apply_overrides(raw, overrides, source), source=source)
    if check_data:
        check_data_root(cfg, source=source)
    return cfg.to_dict()


def check_data_root(cfg: Config, source: str = "params") -> None:
    """Fail with one line when a real dataset's folder in ``data.root`` is missing and cannot be downloaded."""
    if cfg.data.name == "synthetic" or cfg.data.download:
        return
    folder = cfg.data_root / CIFAR_DIRS[cfg.data.name]
    if not folder.is_dir():
        hint = (
            "materialize the CIFAR-10 JPEG copy with `python -m lib.data materialize-cifar10 "
            f"{cfg.data.root}`"
            if cfg.data.name == "cifar10"
            else "set data.download: true on a machine with internet"
        )
        raise ParamsError(
            f"{source}: data.root '{cfg.data.root}' has no {CIFAR_DIRS[cfg.data.name]}/ ({folder} does not exist); {hint}, "
            "or point data.root at a folder holding the torchvision-format dataset"
        )


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _build(cls: type, d: Any, source: str, prefix: str) -> Any:
    if dataclasses.is_dataclass(d):
        d = dataclasses.asdict(d)
    if not isinstance(d, Mapping):
        raise ParamsError(f"{source}: '{prefix.rstrip('.') or 'top level'}' must be a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    kwargs = {}
    for key, value in d.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            fix = f"did you mean '{prefix}{close[0]}'?" if close else "remove it"
            raise ParamsError(
                f"{source}: unknown key '{prefix}{key}'; {fix} (valid keys: {', '.join(names)})"
            )
        kwargs[key] = _coerce(hints[key], value, source, f"{prefix}{key}")
        _check_range(fields[key].metadata, kwargs[key], source, f"{prefix}{key}")
    obj = cls(**kwargs)
    check = _CHECKS.get(cls)
    if check is not None:
        check(obj, source, prefix)
    return obj


def _check_range(meta: Mapping[str, Any], value: Any, source: str, key: str) -> None:
    """Apply a field's ``low``/``high``/``open`` bounds (:func:`_at_least`, :func:`_above`)."""
    if value is None or "low" not in meta:
        return
    low, high, is_open = meta["low"], meta.get("high"), meta.get("open", False)
    if (value <= low if is_open else value < low) or (high is not None and value >= high):
        need = f"> {low}" if is_open else f"≥ {low}"
        need += f" and < {high}" if high is not None else ""
        raise ParamsError(f"{source}: '{key}' is {value!r}; it must be {need}")


def _check_data(cfg: DataConfig, source: str, prefix: str) -> None:
    if cfg.name != "synthetic":
        return
    default = DataConfig()
    for key in ("classes", "train_per_class", "val_size", "test_size"):
        if getattr(cfg, key) != getattr(default, key):
            raise ParamsError(
                f"{source}: '{prefix}{key}' applies to cifar10/cifar100 only; synthetic data take their "
                f"sizes from '{prefix}synthetic' (n_train, n_val, n_test): remove '{prefix}{key}'"
            )


def _check_model(cfg: ModelConfig, source: str, prefix: str) -> None:
    if cfg.checkpoint_sha256 is not None:
        if cfg.checkpoint is None:
            raise ParamsError(f"{source}: '{prefix}checkpoint_sha256' is set but '{prefix}checkpoint' is not; "
                              "set the checkpoint file or remove the hash")
        if not re.fullmatch(r"[0-9a-f]{64}", cfg.checkpoint_sha256):
            raise ParamsError(f"{source}: '{prefix}checkpoint_sha256' must be 64 lower-case hex digits "
                              f"(sha256sum of the file), got {cfg.checkpoint_sha256!r}")
    for key, value in cfg.kwargs.items():
        if key.endswith("drop_rate") or key == "drop_path_rate":
            if value:
                raise ParamsError(
                    f"{source}: '{prefix}kwargs.{key}' is {value!r}; dropout must stay 0 (it draws from the "
                    "global random stream and makes the linearised network stochastic): remove it"
                )


def _check_predictive(cfg: PredictiveConfig, source: str, prefix: str) -> None:
    for key in ("scale_range", "control_range"):
        r = getattr(cfg, key)
        if len(r) != 2 or not 0 < r[0] < r[1]:
            raise ParamsError(f"{source}: '{prefix}{key}' is {list(r)}; give two numbers [low, high] with 0 < low < high")


def _check_stats(cfg: StatsConfig, source: str, prefix: str) -> None:
    n = cfg.shapley_permutations
    if n is not None and n % 2:
        raise ParamsError(f"{source}: '{prefix}shapley_permutations' is {n}; the orderings come in antithetic pairs, "
                          "so give an even number (or null for exact Shapley values over all 2^L subsets)")


def _check_shift(cfg: ShiftConfig, source: str, prefix: str) -> None:
    unknown = [c for c in cfg.corruptions if c not in CORRUPTION_NAMES]
    if unknown or not cfg.corruptions:
        raise ParamsError(
            f"{source}: {prefix}corruptions has unknown names {unknown or '(empty list)'}; "
            f"use a non-empty list of {', '.join(CORRUPTION_NAMES)}"
        )
    bad = [s for s in cfg.severities if s not in SEVERITIES]
    if bad or not cfg.severities:
        raise ParamsError(f"{source}: {prefix}severities must be a non-empty list of 1..5; got {list(cfg.severities)}")
    if not cfg.far_ood_sets or len(set(cfg.far_ood_sets)) != len(cfg.far_ood_sets):
        raise ParamsError(f"{source}: {prefix}far_ood_sets is {list(cfg.far_ood_sets)}; give a non-empty list of "
                          f"distinct names of {', '.join(FAR_OOD_SET_NAMES)}")
    if "digits" in cfg.far_ood_sets and cfg.far_ood_images > DIGITS:
        raise ParamsError(f"{source}: {prefix}far_ood_images is {cfg.far_ood_images}, but the 'digits' set has "
                          f"{DIGITS} images; use at most {DIGITS} or drop 'digits' from {prefix}far_ood_sets")


def _check_ensemble(cfg: EnsembleConfig, source: str, prefix: str) -> None:
    if not cfg.sizes or any(m < 1 for m in cfg.sizes) or len(set(cfg.sizes)) != len(cfg.sizes):
        raise ParamsError(f"{source}: '{prefix}sizes' is {list(cfg.sizes)}; give distinct ensemble sizes M >= 1")


def lora_block_params(model: ModelConfig, lora: LoraConfig) -> int:
    """LoRA parameters of one transformer block, ``r · Σ_targets (in + out)``, read off the timm
    architecture built on the meta device (no weights are allocated or loaded)."""
    import timm
    import torch

    with torch.device("meta"):
        vit = timm.create_model(model.name, pretrained=False, **model.kwargs)
    block = vit.blocks[0]
    maps = {"qkv": block.attn.qkv, "proj": block.attn.proj, "fc1": block.mlp.fc1, "fc2": block.mlp.fc2}
    return lora.r * sum(maps[t].in_features + maps[t].out_features for t in lora.targets if t in maps)


def _check_config(cfg: "Config", source: str, prefix: str) -> None:
    if cfg.baselines is not None and cfg.baselines.seeds is not None and cfg.baselines.seeds > len(cfg.seeds):
        raise ParamsError(f"{source}: '{prefix}baselines.seeds' is {cfg.baselines.seeds}, but '{prefix}seeds' has "
                          f"{len(cfg.seeds)}; use at most {len(cfg.seeds)} (or null for all of them)")
    if cfg.baselines is not None and max(cfg.baselines.ensemble.sizes) > len(cfg.seeds):
        raise ParamsError(
            f"{source}: '{prefix}baselines.ensemble.sizes' is {list(cfg.baselines.ensemble.sizes)}, but the ensembles' "
            f"members are the study's MAP models and '{prefix}seeds' has {len(cfg.seeds)}; add seeds or lower the sizes"
        )
    lc = cfg.laplace
    if lc.structure != "dense_block" and lc.quality_images == 0:
        return
    size = lora_block_params(cfg.model, cfg.lora)
    if size <= DENSE_BLOCK_MAX_PARAMS:
        if lc.structure == "dense_block" and lc.rank is not None:
            raise ParamsError(f"{source}: '{prefix}laplace.rank' applies to kron only; remove it for structure dense_block")
        return
    fix = (f"use '{prefix}laplace.structure: kron' or 'diag'" if lc.structure == "dense_block"
           else f"set '{prefix}laplace.quality_images: 0'")
    key = "structure" if lc.structure == "dense_block" else "quality_images"
    raise ParamsError(
        f"{source}: '{prefix}laplace.{key}' needs a dense block GGN, but a block has {size} LoRA parameters, "
        f"more than the limit {DENSE_BLOCK_MAX_PARAMS} (lib.config.DENSE_BLOCK_MAX_PARAMS); {fix}"
    )


_CHECKS = {DataConfig: _check_data, ModelConfig: _check_model, PredictiveConfig: _check_predictive, StatsConfig: _check_stats,
           ShiftConfig: _check_shift, EnsembleConfig: _check_ensemble, Config: _check_config}


def _coerce(tp: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, source, key)
            except ParamsError as err:
                errors.append(err)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, source, key + ".")
    if origin is Literal:
        if value not in args:
            raise ParamsError(f"{source}: '{key}' is {value!r}; use one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{source}: '{key}' must be a list, got {value!r}")
        return tuple(_coerce(args[0], v, source, key) for v in value)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ParamsError(f"{source}: '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ParamsError(
                f"{source}: '{key}' must be {tp.__name__}, got {value!r} ({type(value).__name__})"
            )
        return value
    raise ParamsError(f"{source}: '{key}' has unsupported type {tp}")
