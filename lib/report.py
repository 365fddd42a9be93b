"""Result tables of the book and the number formatting the chapters state them with.

Chapters call these so that every number in the book comes from the run that produced the
figures; nothing is typed by hand. ΔECE and its intervals are shown in percentage points (pp).
The chapters write their own sentences over the findings of lib (:mod:`lib.answer`,
:mod:`lib.fit_findings`, :mod:`lib.study_scale`); the tables are stored by :mod:`lib.results`.
"""

from __future__ import annotations

import json

import pandas as pd
import torch

from lib.answer import MATERIAL
from lib.attribution import SET_SHARE
from lib.backbone import BackboneRecord
from lib.calibration import calibration_summary
from lib.config import Config
from lib.interval import Interval
from lib.model import count_parameters, data_config, n_blocks
from lib.names import display_name
from lib.pipeline import MapRun
from lib.results import load_table, results_dir, save_table  # noqa: F401  (chapters 04-06 still import them from here)
from lib.study_scale import model_scale

PP = 100.0


def signed(x: float, digits: int) -> str:
    """``x`` with an explicit sign and a typographic minus, e.g. ``+0.0123``, ``−0.0046``."""
    return f"{x:+.{digits}f}".replace("-", "−")


def pp(x: float) -> str:
    """A fraction as signed percentage points with a typographic minus, e.g. ``+1.23``, ``−0.40``."""
    return signed(PP * x, 2)


def ci(delta: float, lower: float, upper: float) -> str:
    """``+1.23 [+0.80, +1.70]`` (pp)."""
    return f"{pp(delta)} [{pp(lower)}, {pp(upper)}]"


def pp_interval(iv: Interval) -> str:
    """An :class:`lib.interval.Interval` of a fraction as ``+1.23 [+0.80, +1.70]`` (pp)."""
    return ci(iv.estimate, iv.lower, iv.upper)


def words(items: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    items = list(items)
    return ", ".join(items[:-1]) + (" and " if len(items) > 1 else "") + items[-1] if items else ""


def blocks_text(blocks) -> str:
    """Block numbers for prose: ``no block``, ``block 3``, ``blocks 1 and 4``, ``blocks 0–3`` (a run of three or more)."""
    blocks = sorted(int(b) for b in blocks)
    if not blocks:
        return "no block"
    if len(blocks) == 1:
        return f"block {blocks[0]}"
    if len(blocks) > 2 and blocks == list(range(blocks[0], blocks[-1] + 1)):
        return f"blocks {blocks[0]}–{blocks[-1]}"
    return "blocks " + words(list(map(str, blocks)))


def level(alpha: float) -> str:
    """The confidence level of intervals at ``alpha``: ``'95%'`` for 0.05, ``'90%'`` for 0.1."""
    return f"{100 * (1 - alpha):.3g}%"


KAPPA_S = r"$\kappa_S$"
"""The covariance scale of a subset in prose (math, so both HTML and PDF show the subscript)."""
KAPPA_ALL = r"$\kappa_{\mathrm{all}}$"
"""The all-block posterior's covariance scale in prose."""
CONTROL_DIFF = r"$\Delta_{\mathrm{ECE}}^{\mathrm{Laplace}}-\Delta_{\mathrm{ECE}}^{\mathrm{iso}}$"
"""The paired difference of a block's Laplace and isotropic-control gains, as math for the prose."""
TS_DIFF = r"$\mathrm{ECE}_{\mathrm{TS}}-\mathrm{ECE}$"
"""Temperature scaling's ECE minus a posterior's, as math for the prose."""
DELTA_DEF = r"$\mathrm{ECE}_{\det} - \mathrm{ECE}_{\mathrm{Bayes}}$"
"""The definition of ΔECE in prose."""


FORMATS = {
    "delta_pp": "differences in percentage points (ΔECE, its bounds, signed ECE): signed, 2 decimals",
    "pp": "errors and spreads in percentage points (SE, SD): 2 decimals",
    "percent": "ECE and accuracy in %: 2 decimals",
    "p": "p-values: 3 decimals, '<0.001' below 0.0005",
    "ratio": "ratios and shares: 2 decimals",
    "seconds": "times in s: 1 decimal",
    "rate": "throughput (images/s): integer with thousands separators",
    "count": "counts: integer with thousands separators",
    "kappa": "covariance scales κ and prior precisions δ: 3 significant digits",
    "metric": "NLL and Brier score (and their differences): 4 decimals",
    "evidence": "log evidence: 1 decimal",
    "tolerance": "numerical differences and tolerances: 2 significant digits, scientific",
}
"""The one display rule per quantity of the book's tables (:func:`format_number`)."""


def format_number(x: float, quantity: str) -> str:
    """``x`` as the book shows a ``quantity`` of :data:`FORMATS` (typographic minus; ``–`` for NaN)."""
    if quantity not in FORMATS:
        raise ValueError(f"quantity {quantity!r} has no display rule; use one of {', '.join(FORMATS)}")
    if x is None or pd.isna(x):
        return "–"
    x = float(x)
    if quantity == "delta_pp":
        return signed(x, 2)
    if quantity == "p":
        return "<0.001" if x < 0.0005 else f"{x:.3f}"
    text = {"pp": f"{x:.2f}", "percent": f"{x:.2f}", "ratio": f"{x:.2f}", "seconds": f"{x:.1f}",
            "rate": f"{x:,.0f}", "count": f"{x:,.0f}", "kappa": f"{x:.3g}", "metric": f"{x:.4f}",
            "evidence": f"{x:.1f}", "tolerance": f"{x:.1e}"}[quantity]
    return text.replace("-", "−")


def setup_table(cfg: Config, run: MapRun, backbone: BackboneRecord | None = None) -> pd.DataFrame:
    """Data, model, LoRA and training settings of the profile as a two-column table, with the
    scale of the study (:func:`lib.study_scale.model_scale`): transformer blocks, backbone parameters
    (head left out) and, from the backbone's record ``backbone`` (:attr:`lib.study.Study.backbone`),
    its pre-training images."""
    s, d = run.splits, data_config(run.model)
    scale = model_scale(cfg, backbone)
    counts = count_parameters(run.model)
    data = cfg.data
    rows = [
        ("Dataset", data.name if data.classes is None else f"{data.name}, classes {list(data.classes)}"),
        ("Classes (fine-tuning)", ", ".join(s.class_names)),
        ("Train / validation / test images", f"{len(s.train):,} / {len(s.val):,} / {len(s.test):,}"),
        ("Backbone", cfg.model.name + (" (" + ", ".join(f"{k} {v}" for k, v in cfg.model.kwargs.items()) + ")"
                                       if cfg.model.kwargs else "")),
        ("Backbone weights", "pre-trained by this project (see below)" if cfg.pretrain
         else ("timm pretrained" if cfg.model.pretrained else "random initialisation (frozen)")),
        ("Input", f"{d['input_size'][1]}×{d['input_size'][2]} px, mean {d['mean']}, std {d['std']}"),
        ("Transformer blocks", f"{n_blocks(run.model)} ({scale.tokens} tokens per image)"),
        ("Backbone parameters", f"{scale.parameters:,} (frozen; head left out)"),
        ("LoRA", f"r = {cfg.lora.r}, α = {cfg.lora.alpha:g} on {', '.join(cfg.lora.targets)} of every block"),
        ("Trainable parameters", f"{counts['lora']:,} LoRA + {counts['head']:,} head"),
        ("Fine-tuning", f"{cfg.train.epochs} epochs, batch {cfg.train.batch_size}, Adam lr {cfg.train.lr:g}, cosine, "
                        f"L2 λ = {cfg.train.weight_decay:g}"),
        ("Prior precision implied by λ (δ = λN)", f"{cfg.train.weight_decay * len(s.train):g}"),
        ("Training seeds", ", ".join(map(str, cfg.seeds))),
        ("Laplace", cfg.laplace.approximation
                    + (", exact GGN" if cfg.laplace.fisher == "exact" else ", Monte Carlo Fisher")
                    + (", prior precision tuned by the evidence" if cfg.laplace.prior_tuning == "marglik"
                       else ", prior precision not tuned")),
        ("Predictive", "linearised, " + ("Monte Carlo (softmax averaged)" if cfg.predictive.method == "mc" else "probit")
                       + f", K = {cfg.predictive.n_samples} posterior samples, covariance scale "
                       + ("tuned per subset on validation NLL" if cfg.predictive.scale != "none" else "κ = 1")),
        ("Statistics", f"ECE with M = {cfg.stats.n_bins} equal-width bins; {cfg.stats.n_boot:,} bootstrap replicates "
                       f"({cfg.stats.n_boot_shapley:,} per seed for Shapley values); α = {cfg.stats.alpha:g}"),
    ]
    if cfg.pretrain:
        p = cfg.pretrain
        rows.insert(5, ("Backbone pre-training", f"classes {list(p.classes)}, {p.epochs} epochs, batch {p.batch_size}, "
                                                  f"AdamW lr {p.lr:g}, wd {p.weight_decay:g}, label smoothing {p.label_smoothing:g}"))
    if backbone is not None:
        rows.insert(6, ("Pre-training images", f"{scale.pretrain_images:,} per epoch, {scale.pretrain_epochs} epochs; validation "
                                               f"accuracy {PP * backbone.val_accuracy:.1f}% on the pre-training classes"))
    return pd.DataFrame(rows, columns=["Setting", "Value"])


def deterministic_table(runs: list[MapRun], n_bins: int) -> pd.DataFrame:
    """Test metrics of the deterministic (MAP) model per seed, from the cached test logits."""
    rows = []
    for r in runs:
        logits = torch.load(r.stage.file("test_logits.pt"), weights_only=True)
        m = calibration_summary(torch.softmax(logits.float(), -1), r.splits.test.y, n_bins)
        rows.append({"seed": r.seed, "accuracy": m["accuracy"], "ece": m["ece"], "signed_ece": m["signed_ece"],
                     "nll": m["nll"], "brier": m["brier"], "val_accuracy": r.history[-1]["val_acc"],
                     "train_seconds": sum(h["seconds"] for h in r.history)})
    return pd.DataFrame(rows)


def display_layer_table(table: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """Attribution rows formatted for reading: ΔECE with its ``1 − alpha`` interval, Δ NLL/Brier/accuracy, Holm p."""
    out = pd.DataFrame({
        "Posterior": table.posterior.map(display_name),
        "ECE (%)": (PP * table.ece).map(lambda v: format_number(v, "percent")),
        f"ΔECE, pp [{level(alpha)} CI]": [ci(d, lo, hi) for d, lo, hi in zip(table.delta, table.lower, table.upper)],
        "ΔNLL": table.d_nll.map(lambda v: signed(v, 4)),
        "ΔBrier": table.d_brier.map(lambda v: signed(v, 4)),
        "Δacc. (pp)": table.d_acc.map(pp),
    })
    if "p_holm" in table:
        out["Holm p"] = table.p_holm.map(lambda v: "" if pd.isna(v) else format_number(v, "p"))
    return out


def display_rank_table(ranks: pd.DataFrame, top_k: int, alpha: float) -> pd.DataFrame:
    """:func:`lib.attribution.rank_analysis` rows formatted for reading (ΔECE in pp, the ``1 − alpha``
    simultaneous rank interval)."""
    return pd.DataFrame({
        "Block": ranks.block,
        "ΔECE (pp)": ranks.delta.map(pp),
        "Rank": ranks["rank"],
        f"{level(alpha)} rank interval": [f"[{lo}, {hi}]" for lo, hi in zip(ranks.rank_lower, ranks.rank_upper)],
        f"P(top {top_k})": ranks.p_top_k.map(lambda v: f"{v:.2f}"),
        f"May be top {top_k}": ranks.top_k_candidate.map({True: "yes", False: "no"}),
        f"Certified top {top_k}": ranks.surely_top_k.map({True: "yes", False: "no"}),
    })


READABLE = {
    "block": "Block", "posterior": "Posterior", "seed": "Seed", "pair": "Pair", "check": "Check",
    "delta": "ΔECE", "lower": "lower", "upper": "upper", "seed_sd": "SD over seeds",
    "seed_lower": "over-runs lower", "seed_upper": "over-runs upper",
    "percentile_lower": "percentile lower", "percentile_upper": "percentile upper",
    "bca_lower": "BCa lower", "bca_upper": "BCa upper",
    "mc_se": "MC SE", "halving": "finite-K bias: Δ(K/2) − Δ(K)", "test_se": "test-set SE", "mc_share": "MC SE / test-set SE",
    "p_holm": "Holm p", "improves": "improves", "interaction": "interaction",
    "accuracy": "accuracy", "ece": "ECE", "signed_ece": "signed ECE", "nll": "NLL", "brier": "Brier",
    "val_accuracy": "val. accuracy", "train_seconds": "train s",
    "fit_images": "fit images", "fit_seconds": "fit s", "fit_images_per_s": "images / s",
    "prior_init": "initial δ", "log_marginal_likelihood": "log evidence", "device": "device",
    "max_abs_diff": "max abs. difference", "max_rel_diff": "max rel. difference", "tolerance": "rel. tolerance",
    "ok": "within tolerance", "kappa_own": "own κ (median)",
    "own κ_S": "own κ", "shared κ_all": "all-block κ",
    "trace_ratio": "trace ratio", "trace_ratio_min": "min", "trace_ratio_max": "max",
    "frobenius_error": "Frobenius error", "kl": "KL", "logit_variance_ratio": "logit var. ratio",
    "logit_variance_error": "logit var. error", "kl_scaled": "KL, scale fitted",
    "logit_variance_corr": "logit var. correlation",
}
"""Reader-facing column names of the result tables (units stay in the table captions); table
cells and headers hold no ``$…$`` math (pandas tables reach Quarto as HTML, where it would stay
raw text), so the covariance scale of a subset is "own κ" there and κ_S (as math) in the prose."""

QUANTITIES = {
    **dict.fromkeys(["delta", "lower", "upper", "seed_lower", "seed_upper", "percentile_lower", "percentile_upper", "bca_lower", "bca_upper",
                     "halving", "interaction", "signed_ece", "phi", "equal-width ECE", "equal-mass ECE",
                     "debiased ℓ2 ECE", "smooth ECE", "own κ_S", "shared κ_all", "κ = 1"], "delta_pp"),
    **dict.fromkeys(["seed_sd", "mc_se", "test_se"], "pp"),
    **dict.fromkeys(["accuracy", "ece", "val_accuracy"], "percent"),
    "p_holm": "p", "mc_share": "ratio", "train_seconds": "seconds", "fit_seconds": "seconds",
    "fit_images_per_s": "rate", "fit_images": "count", "kappa_own": "kappa", "prior_init": "kappa",
    "nll": "metric", "brier": "metric", "log_marginal_likelihood": "evidence",
    "max_abs_diff": "tolerance", "max_rel_diff": "tolerance", "tolerance": "tolerance",
}
"""The :data:`FORMATS` rule of each result-table column that :func:`readable` formats
(``delta_seed<s>`` columns: ``delta_pp``); the ΔECE-like columns must already be in pp (:func:`in_pp`)."""


def in_pp(df: pd.DataFrame, columns: list[str], digits: int = 3) -> pd.DataFrame:
    """``df`` with the fraction-valued ``columns`` (ECE, ΔECE, accuracy, their errors) in percentage
    points, rounded to ``digits``, so that every table reads in the units of the text."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"in_pp: columns {missing} not in the table (it has {list(df.columns)})")
    out = df.copy()
    out[columns] = (PP * out[columns]).round(digits)
    return out


def readable(df: pd.DataFrame, alpha: float | None = None) -> pd.DataFrame:
    """``df`` for reading: numeric columns formatted by their :data:`QUANTITIES` rule, posterior
    keys (a ``posterior`` column or index) by :func:`display_name`, boolean columns as yes/no, and
    columns and index names renamed by :data:`READABLE` (``delta_seed<s>`` → ``seed <s>``; with
    ``alpha``, ``lower``/``upper`` → ``95% lower``/``95% upper`` at its level); other values
    unchanged, unknown names kept."""
    df = df.copy()
    for col in df.columns:
        rule = "delta_pp" if str(col).startswith("delta_seed") else QUANTITIES.get(col)
        if rule and pd.api.types.is_numeric_dtype(df[col]) and df[col].dtype != bool:
            df[col] = df[col].map(lambda v, r=rule: format_number(v, r))
    if "posterior" in df.columns:
        df["posterior"] = df["posterior"].map(display_name)
    if "posterior" in df.index.names and df.index.nlevels == 1:
        df.index = df.index.map(display_name).rename("posterior")

    def name(n):
        if isinstance(n, str) and n.startswith("delta_seed"):
            return f"seed {n[len('delta_seed'):]}"
        if alpha is not None and n in ("lower", "upper"):
            return f"{level(alpha)} {n}"
        return READABLE.get(n, n)

    out = df.rename(columns=name)
    out.index = out.index.set_names([name(n) for n in out.index.names])
    for col in out.columns[out.dtypes == bool]:
        out[col] = out[col].map({True: "yes", False: "no"})
    return out


def book_table(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` as the book shows a table, under one header row: the name of the row labels (the
    index) moves into the header's corner cell, where pandas writes the columns' name; index levels
    after the first become leading columns. pandas writes index names on a header row of their own,
    below the column names, which Quarto's Typst PDF shows as an empty table row. Every table a
    chapter displays goes through this, last."""
    if df.index.nlevels > 1:
        df = df.reset_index(level=list(range(1, df.index.nlevels)))
    if df.index.name is None:
        return df
    return df.rename_axis(index=None, columns=df.index.name)


def _blocks_text(blocks: list[int]) -> str:
    blocks = sorted(blocks)
    if not blocks:
        return "no block"
    if blocks == list(range(blocks[0], blocks[-1] + 1)) and len(blocks) > 2:
        return f"blocks {blocks[0]}–{blocks[-1]}"
    if len(blocks) == 1:
        return f"block {blocks[0]}"
    return "blocks " + ", ".join(map(str, blocks[:-1])) + f" and {blocks[-1]}"


def _signed_blocks(singles: pd.DataFrame) -> tuple[list[int], list[int]]:
    """Single blocks whose interval lies above zero, and those whose interval lies below it."""
    return singles[singles.lower > 0].block.tolist(), singles[singles.upper < 0].block.tolist()


NOTHING_SINGLED_OUT = "No block's interval excludes zero; the data do not single out a block."
"""What the summaries say when no single-block interval excludes zero."""


def attribution_summary(table: pd.DataFrame, ranks: pd.DataFrame, shapley: pd.DataFrame, alpha: float, top_k: int,
                        best: int) -> str:
    """One paragraph: the all-block gain, the best single block ``best`` as chosen on validation data
    (:func:`lib.attribution.choose_single`) with its test-set gain, which single blocks have an interval
    that excludes zero (saying so plainly when none does), how sure the ranking is, Shapley values (as
    shares of the all-block gain only when its interval excludes zero)."""
    singles = table[table.kind == "single"].sort_values("block")
    full = table[table.kind == "all"].iloc[0]
    top = singles.set_index("block").loc[best]
    improving = singles[singles.improves].block.tolist()
    sure = ranks[ranks.surely_top_k].block.tolist()
    cands = ranks[ranks.top_k_candidate].block.tolist()
    shap = shapley.sort_values("phi", ascending=False)
    total = shapley.phi.sum()
    share = shap.phi.iloc[0] / total
    above, below = _signed_blocks(singles)
    parts = [
        f"Making all blocks Bayesian gives ΔECE = {ci(full.delta, full.lower, full.upper)} pp "
        f"(positive: lower ECE) with an accuracy change of {pp(full.d_acc)} pp.",
        f"Chosen on the validation images, the best single block is block {best}; on the test set its ΔECE is "
        f"{ci(top.delta, top.lower, top.upper)} pp.",
    ]
    if not above and not below:
        parts.append(NOTHING_SINGLED_OUT)
    else:
        parts.append(("The intervals of " + _blocks_text(above) + " lie above zero" if above else "No interval lies above zero")
                     + (f"; those of {_blocks_text(below)} lie below it." if below else "."))
    if improving:
        parts.append(f"After Holm correction at α = {alpha:g}, {_blocks_text(improving)} improve calibration on their own.")
    else:
        parts.append(f"After Holm correction at α = {alpha:g}, no single block improves calibration significantly on its own.")
    parts.append(
        f"The {100 * (1 - alpha):.0f}% simultaneous rank confidence set cannot exclude {_blocks_text(cands)} "
        f"from the top {top_k}"
        + (f" and certifies {_blocks_text(sure)} as members." if sure else "; no block is certified as a member.")
    )
    lead = shap.iloc[0]
    parts.append(f"By Shapley value, {lead.layer} contributes most on the test set, "
                 + ci(lead.phi, lead.lower, lead.upper) + " pp" + (f" ({100 * share:.0f}% of the all-block gain)" if _clear_gain(full) else "")
                 + f"; the Shapley values of all blocks sum to the all-block gain, {pp(total)} pp.")
    return " ".join(parts)


def _clear_gain(full: pd.Series) -> bool:
    """Whether the all-block gain's interval excludes zero from above, so that shares of it mean something."""
    return float(full.lower) > 0


def statistics_summary(table: pd.DataFrame, ranks: pd.DataFrame, n_seeds: int, alpha: float, top_k: int) -> str:
    """What the data do and do not support, from the tests and rank sets."""
    singles = table[table.kind == "single"]
    sig = singles[singles.improves].block.tolist()
    worse = singles[singles.upper < 0].block.tolist()
    unclear = singles[(singles.lower <= 0) & (singles.upper >= 0)].block.tolist()
    uncorrected = singles[(singles.lower > 0) & ~singles.improves.astype(bool)].block.tolist()
    width = float((singles.upper - singles.lower).median())
    above, below = _signed_blocks(singles)
    out = [
        f"With {n_seeds} training seed{'s' if n_seeds > 1 else ''}, the median {level(alpha)} interval of a single-block ΔECE is "
        f"{PP * width:.2f} pp wide (basic bootstrap intervals for these training runs that include the choice of {KAPPA_S} on the validation images).",
        *([NOTHING_SINGLED_OUT] if not above and not below else []),
        (f"Supported: {_blocks_text(sig)} improve{'s' if len(sig) == 1 else ''} calibration (Holm-adjusted one-sided "
         f"test, family-wise error {alpha:g}).") if sig else
        "Not supported: that any single block, on its own, improves calibration (no Holm-adjusted test rejects).",
    ]
    if uncorrected:
        out.append(f"For {_blocks_text(uncorrected)} the {level(alpha)} interval lies above zero, but the "
                   f"Holm-adjusted test does not reject: the gain is not established once the {len(singles)} blocks "
                   "are tested together.")
    if worse:
        out.append(f"{_blocks_text(worse).capitalize()} make{'s' if len(worse) == 1 else ''} calibration worse "
                   "(interval entirely below zero).")
    if unclear:
        out.append(f"For {_blocks_text(unclear)} the data cannot tell the sign of the effect.")
    sure = ranks[ranks.surely_top_k].block.tolist()
    out.append(f"Rank statements: {_blocks_text(sure)} {'is' if len(sure) == 1 else 'are'} certainly in the top "
               f"{top_k}." if sure else f"Rank statements: no block is certainly in the top {top_k}; the ranking beyond "
               "the point estimates is not supported at this sample size.")
    return " ".join(out)


def _posterior_names(names) -> str:
    """Named posteriors for prose: ``block 3 only and the all-block posterior`` (:func:`display_name`)."""
    shown = ["the all-block posterior" if n == "all" else display_name(n) for n in names]
    return _join(shown) if shown else ""


def _leader(agreement: pd.DataFrame, ranks: pd.DataFrame) -> tuple[int, bool, pd.DataFrame]:
    """The block ranked first under the reference of :func:`lib.attribution.ranking_agreement`,
    whether the rank confidence set certifies it as first, and the rows whose leader differs."""
    top = int(agreement.top_block_study.iloc[0])
    certified = bool(ranks.set_index("block").loc[top, "rank_upper"] == 1)
    return top, certified, agreement[agreement.top_block != top]


def _agreement_text(agreement: pd.DataFrame, ranks: pd.DataFrame, reference: str, article: str, gain: str) -> list[str]:
    """Sentences on :func:`lib.attribution.ranking_agreement` against ``reference`` (e.g. "the
    equal-width ECE"); ``article`` precedes the alternatives' names ("the " or ""); ``gain`` names
    the reference gain (e.g. "the equal-width gain")."""
    top, certified, differ = _leader(agreement, ranks)
    n = int(agreement.blocks.iloc[0])
    taus = ", ".join(f"{t:.2f} ({e}; {int(d)} of {int(m)} block pairs ordered differently)"
                     for e, t, d, m in zip(agreement.estimator, agreement.kendall_tau, agreement.discordant,
                                           agreement.pairs))
    text = [f"Against {reference}, Kendall's τ of the single-block ΔECE is {taus}."]
    if differ.empty:
        text.append(f"Block {top} ranks first under every one of them.")
    else:
        text.append(f"Block {top} ranks first under {reference}, but "
                    + "; ".join(f"block {int(r.top_block)} under {article}{r.estimator}" for r in differ.itertuples())
                    + (", so which block leads depends on this choice." if certified else
                       f"; since the simultaneous rank confidence set (@sec-statistics-ranks) does not single out a "
                       f"leader under {reference} in the first place, this is no evidence against the ranking."))
    signs = ", ".join(f"{int(r.same_sign)} of {n} ({r.estimator})" for r in agreement.itertuples())
    flipped = agreement[~agreement.all_same_sign].estimator.tolist()
    text.append(f"The sign of a single block's gain agrees with {gain} for {signs}"
                + (f"; the all-block gain changes sign under {_join([article + e for e in flipped])}." if flipped
                   else "; the all-block gain keeps its sign under every one of them."))
    return text


def estimator_summary(agreement: pd.DataFrame, coincide: bool, ranks: pd.DataFrame) -> str:
    """Whether the single-block ranking depends on the calibration-error estimator, in words.

    ``agreement``: :func:`lib.attribution.estimator_agreement`; ``coincide``:
    :func:`lib.attribution.estimators_coincide`; ``ranks``: :func:`lib.attribution.rank_analysis`
    (a change of leader only matters if the rank confidence set singles out a leader at all).
    """
    text = []
    if coincide:
        text.append("Equal-width and equal-mass bins give the same gains: the models err in the same direction at "
                    "every confidence, so every binned ECE reduces to |mean confidence − accuracy| and this comparison "
                    "cannot show whether the ranking depends on the binning.")
    text += _agreement_text(agreement, ranks, "the equal-width ECE", "the ", "the equal-width gain")
    text.append("These are point estimates; the intervals of @sec-statistics-bootstrap are for the equal-width ECE.")
    return " ".join(text)


def scale_sensitivity_summary(agreement: pd.DataFrame, ranks: pd.DataFrame) -> str:
    """Whether the single-block ranking depends on how the posteriors are scaled, in words, from
    :func:`lib.attribution.ranking_agreement` of :func:`lib.attribution.scale_sensitivity`."""
    shown = agreement.assign(estimator=agreement.estimator.map(lambda e: SCALE_WORDS.get(e, e)))
    return " ".join(_agreement_text(shown, ranks, f"each subset's own {KAPPA_S}", "", f"the own-{KAPPA_S} gain")
                    + [f"These are point estimates; the intervals elsewhere in this chapter are for the own {KAPPA_S}."])


SCALE_WORDS = {"own κ_S": f"each subset's own {KAPPA_S}", "shared κ_all": f"the all-block {KAPPA_ALL}",
               "κ = 1": r"$\kappa = 1$"}
"""The scalings of :data:`lib.attribution.SCALES` in prose."""


def _widening(ratio: float) -> float:
    """Relative widening ``√(1 + ratio²) − 1`` of an interval when an independent error with
    ``ratio`` times its standard deviation is added in variance."""
    return (1 + ratio**2) ** 0.5 - 1


def mc_error_summary(table: pd.DataFrame, n_samples: int) -> str:
    """Monte Carlo error of ΔECE next to its test-set error, from :func:`lib.attribution.mc_error`.

    Monte Carlo noise is called material for a posterior when ``mc_se > test_se / 2`` (it widens the
    interval, which includes it, by more than ~12% over the test-set error alone); Δ has not
    settled when halving the samples moves it by more than half its test-set standard error.
    """
    share = table.mc_share
    worst = table.loc[share.idxmax()]
    out = [
        f"With K = {n_samples} posterior samples the Monte Carlo standard error of ΔECE is at most "
        f"{PP * table.mc_se.max():.2f} pp (median {PP * table.mc_se.median():.2f} pp): "
        f"{100 * share.median():.0f}% of the test-set standard error at the median and "
        f"{100 * worst.mc_share:.0f}% at most ({_posterior_names([worst.posterior])})."
    ]
    noisy = table[share > MATERIAL].posterior.tolist()
    if noisy:
        which = "every posterior in the table" if len(noisy) == len(table) else _posterior_names(noisy)
        out.append(f"For {which} Monte Carlo noise is comparable to test-set noise (its standard error is more than "
                   "half the test-set one). The intervals of "
                   "@sec-attribution include it (they resample the posterior samples too), so they are wider "
                   "than the test set alone would make them; more samples (`predictive.n_samples`) would "
                   "narrow them.")
    else:
        widen = _widening(float(worst.mc_share))
        out.append(f"It widens the intervals of @sec-attribution, which include it, by at most about "
                   f"{100 * widen:.0f}% over the test-set error alone, so more samples would change little.")
    moved = table.halving.abs() / table.test_se
    drift = table.loc[moved.idxmax()]
    out.append(f"Using only half of the samples shifts ΔECE on average by {PP * abs(float(drift.halving)):.2f} pp for "
               f"{_posterior_names([drift.posterior])} ({100 * float(moved.max()):.0f}% of its test-set standard error, "
               "the largest relative shift"
               + (f", and {100 * abs(float(drift.halving)) / abs(float(drift.delta)):.0f}% of its ΔECE"
                  if abs(float(drift.delta)) > 0 else "")
               + "); this estimates the bias from a finite K, which no bootstrap captures" +
               ((": it is small next to the test-set error" + (", even though the Monte Carlo variance is not." if noisy
                                                                 else "."))
                if moved.max() <= 0.5 else
                "; the values at this K may differ from the infinite-sample ones by a noticeable fraction of their "
                "uncertainty."))
    return " ".join(out)


def _versus_ts(row: pd.Series, alpha: float) -> str:
    """The paired comparison with temperature scaling of one attribution row (``ts_delta`` =
    ECE_TS − ECE_S with its interval), in words."""
    diff = f"{TS_DIFF} = {ci(row.ts_delta, row.ts_lower, row.ts_upper)} pp ({level(alpha)} paired interval)"
    if row.ts_lower > 0:
        return f"It calibrates better than temperature scaling, which costs nothing at prediction time: {diff}."
    if row.ts_upper < 0:
        return (f"Temperature scaling, fitted on the validation set, calibrates better at no extra cost and without "
                f"changing accuracy: {diff}; on this profile it is the better fix for top-label calibration.")
    return (f"Against temperature scaling, which costs nothing at prediction time, the data cannot tell the two apart: "
            f"{diff}.")


def recommendation(front: pd.DataFrame, table: pd.DataFrame, baseline: pd.DataFrame, choice: str | None,
                   *, alpha: float) -> str:
    """Concrete advice on the set of Bayesian blocks ``choice``, chosen on validation data
    (:func:`lib.attribution.choose_set`; None: the all-block posterior does not lower the validation
    ECE) and reported on the test set with the intervals of ``table``
    (:func:`lib.attribution.attribution`: ΔECE and ECE_TS − ECE, both including the choice of κ_S).

    ``front``: :func:`lib.figures.prepare_pareto` output (``name``, ``cost``); ``baseline``:
    :func:`baseline_table` output with the deterministic row and the chosen set's row. It leads with
    what the paired intervals support: when temperature scaling calibrates significantly better than
    the chosen set, it recommends temperature scaling and not the Bayesian set.
    """
    b = baseline.set_index("method")
    det = b.loc["deterministic (MAP)"]
    t = table.set_index("posterior")
    full = t.loc["all"]
    if choice is None:
        return ("On the validation images the all-block Laplace does not lower the ECE, so no Bayesian-block choice is "
                f"recommended for calibration (all blocks on the test set: ΔECE = {ci(full.delta, full.lower, full.upper)}"
                " pp). " + _versus_ts(full, alpha))
    pick = t.loc[choice]
    cost = float(front.set_index("name").loc[choice, "cost"])
    full_cost = float(front.set_index("name").loc["all", "cost"])
    d_acc = (b.loc[f"Laplace, {display_name(choice)}", "accuracy (%)"] - det["accuracy (%)"]) / PP
    rule = f"the cheapest priced choice with at least {100 * SET_SHARE:.0f}% of the all-block validation gain"
    if pick.lower > 0 and pick.ts_upper < 0:
        return (f"Use temperature scaling, not a Bayesian block: on the test set it calibrates better than "
                f"**{display_name(choice)}** (chosen on the validation images as {rule}), "
                f"{TS_DIFF} = {ci(pick.ts_delta, pick.ts_lower, pick.ts_upper)} pp ({level(alpha)} paired interval), "
                f"at no extra cost and without changing accuracy, whereas the Bayesian set costs {cost:.3g} ms extra per "
                f"image for its ΔECE of {ci(pick.delta, pick.lower, pick.upper)} pp over the MAP model.")
    if pick.lower <= 0:
        text = (f"Chosen on the validation images as {rule}, **{display_name(choice)}** has on the test set ΔECE = "
                f"{ci(pick.delta, pick.lower, pick.upper)} pp: its interval includes zero, so no choice of Bayesian "
                "blocks can be recommended for calibration on this evidence (test set, seeds, posterior samples and "
                f"the choice of {KAPPA_S}); it costs {cost:.3g} ms extra per image and changes accuracy by {pp(d_acc)} pp.")
    else:
        text = (f"Make **{display_name(choice)}** Bayesian (chosen on the validation images as {rule}): on the test set, "
                f"which played no part in choosing it, its ΔECE is "
                f"{ci(pick.delta, pick.lower, pick.upper)} pp, against {ci(full.delta, full.lower, full.upper)} pp for all "
                f"blocks, at {cost:.3g} ms extra per image ({100 * cost / full_cost:.0f}% of the all-block extra latency); "
                f"its accuracy changes by {pp(d_acc)} pp.")
    if "signed ECE (pp)" in b.columns and det["signed ECE (pp)"] < 0 and d_acc < 0 and -d_acc >= 0.5 * pick.delta:
        text += (f" The deterministic model is under-confident (signed ECE {pp(det['signed ECE (pp)'] / PP)} pp), and "
                 "for an under-confident model ECE also falls when accuracy falls: the accuracy loss of "
                 f"{-PP * d_acc:.2f} pp accounts for at least half of this gain.")
    return text + " " + _versus_ts(pick, alpha)


def block_table(summaries: list[pd.DataFrame]) -> pd.DataFrame:
    """Per-block posterior quantities: mean over seeds with ``_min``/``_max`` over seeds."""
    stacked = pd.concat(summaries)
    cols = ["prior_precision", "curvature_trace", "variance_trace", "effective_params"]
    g = stacked.groupby("block")[cols]
    out = g.mean()
    for c in cols:
        out[f"{c}_min"], out[f"{c}_max"] = g.min()[c], g.max()[c]
    out["n_params"] = stacked.groupby("block").n_params.first()
    return out.reset_index()


def scale_table(metrics: list[pd.DataFrame], scales: list[pd.DataFrame]) -> pd.DataFrame:
    """Covariance scale per named posterior (the all-block one and every single block).

    ``metrics``/``scales``: each seed's ``metrics.csv``/``scales.csv`` of the ``subsets`` stage.
    Columns: κ_S (median, min, max over seeds), validation NLL at κ = 1 and at κ_S, and test ECE
    (%) and accuracy (%) at κ = 1 and at κ_S (means over seeds); first row: the MAP model.
    """
    tuned = pd.concat([m.set_index("posterior") for m in metrics])
    raw = pd.concat([sc.set_index("posterior") for sc in scales])
    names = ["all", *[n for n in raw.index.unique() if n.startswith("single ")]]
    det = tuned.loc[["none"]]
    map_nll = raw.loc[["none"], "val_nll"].mean() if "none" in raw.index else float("nan")
    rows = [{"posterior": "deterministic (MAP)", "κ median": float("nan"), "κ min": float("nan"), "κ max": float("nan"),
             "val NLL κ=1": map_nll, "val NLL κ_S": map_nll,
             "ECE % κ=1": PP * det.ece.mean(), "ECE % κ_S": PP * det.ece.mean(),
             "acc % κ=1": PP * det.accuracy.mean(), "acc % κ_S": PP * det.accuracy.mean()}]
    for n in names:
        t, r = tuned.loc[[n]], raw.loc[[n]]
        rows.append({"posterior": n, "κ median": r.scale.median(), "κ min": r.scale.min(), "κ max": r.scale.max(),
                     "val NLL κ=1": r.val_nll_unscaled.mean(), "val NLL κ_S": r.val_nll.mean(),
                     "ECE % κ=1": PP * r.ece_unscaled.mean(), "ECE % κ_S": PP * t.ece.mean(),
                     "acc % κ=1": PP * r.accuracy_unscaled.mean(), "acc % κ_S": PP * t.accuracy.mean()})
    return pd.DataFrame(rows)


def display_scale_table(table: pd.DataFrame) -> pd.DataFrame:
    """:func:`scale_table` formatted for reading (:data:`FORMATS`): κ as median [min, max], NLL and %."""
    return pd.DataFrame({
        "Posterior": table.posterior.map(display_name),
        "tuned κ [range]": [("–" if pd.isna(m) else f"{m:.3g} [{lo:.3g}, {hi:.3g}]")
                            for m, lo, hi in zip(table["κ median"], table["κ min"], table["κ max"])],
        "val. NLL, κ = 1": table["val NLL κ=1"].map(lambda v: format_number(v, "metric")),
        "val. NLL, tuned κ": table["val NLL κ_S"].map(lambda v: format_number(v, "metric")),
        "ECE (%), κ = 1": table["ECE % κ=1"].map(lambda v: format_number(v, "percent")),
        "ECE (%), tuned κ": table["ECE % κ_S"].map(lambda v: format_number(v, "percent")),
        "acc. (%), κ = 1": table["acc % κ=1"].map(lambda v: format_number(v, "percent")),
        "acc. (%), tuned κ": table["acc % κ_S"].map(lambda v: format_number(v, "percent")),
    })


def display_selection_table(table: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """:func:`lib.attribution.scale_selection` formatted for reading: κ_S, how often it is selected
    again, ΔECE at κ_S with the ``1 − alpha`` range over re-tuned κ_S, and both standard deviations (pp)."""
    return pd.DataFrame({
        "Posterior": table.posterior.map(display_name),
        "tuned κ (median)": table.kappa.map(lambda v: format_number(v, "kappa")),
        "same κ selected": table.stable.map(lambda v: f"{100 * v:.0f}%"),
        f"ΔECE, pp [{level(alpha)} range, re-tuned κ]": [ci(d, lo, hi) for d, lo, hi in
                                                       zip(table.delta, table.sel_lower, table.sel_upper)],
        "SD, re-tuned κ (pp)": (PP * table.sel_se).map(lambda v: format_number(v, "pp")),
        "SD, bootstrap (pp)": (PP * table.boot_se).map(lambda v: format_number(v, "pp")),
        "ratio": table.sel_share.map(lambda v: format_number(v, "ratio")),
    })


def interval_check_summary(intervals: pd.DataFrame) -> str:
    """How far BCa endpoints lie from the percentile ones where both are exact, from
    :func:`lib.attribution.interval_comparison` (one seed, samples and κ_S fixed): the largest shift
    of an endpoint in pp and as a share of the percentile interval's width, and the blocks whose
    verdict (interval excludes zero or not) would differ: a check of the bootstrap distribution's
    shape (the book's intervals are basic ones, :func:`lib.stats.basic_interval`)."""
    width = intervals.percentile_upper - intervals.percentile_lower
    shift = pd.concat([(intervals.bca_lower - intervals.percentile_lower).abs(),
                       (intervals.bca_upper - intervals.percentile_upper).abs()], axis=1).max(axis=1)
    excl = lambda lo, hi: (lo > 0) | (hi < 0)  # noqa: E731
    differ = intervals[excl(intervals.percentile_lower, intervals.percentile_upper)
                       != excl(intervals.bca_lower, intervals.bca_upper)].block.tolist()
    i = int((shift / width).to_numpy().argmax())
    out = (f"Where BCa is exact, its endpoints lie at most {PP * shift.max():.2f} pp from the percentile ones "
           f"({100 * float((shift / width).iloc[i]):.0f}% of the interval's width, block {int(intervals.block.iloc[i])}); ")
    if differ:
        return out + (f"for {_blocks_text(differ)} the two disagree on whether the interval excludes zero, so the "
                      "verdicts of the book there rest on the interval type and should be read as borderline.")
    return out + "no block's verdict (interval excludes zero or not) depends on the interval type."


def selection_summary(table: pd.DataFrame) -> str:
    """What re-tuning κ_S on resampled validation images does to ΔECE, from
    :func:`lib.attribution.scale_selection`, and how much of the intervals' spread it makes.

    The intervals (:func:`lib.attribution.attribution`) re-tune κ_S in every bootstrap replicate, so
    they include this error; ``sel_share`` compares its standard deviation with theirs. It is called
    material for a posterior when ``sel_share >`` :data:`MATERIAL`.
    """
    if table.empty:
        return ("The covariance scale is not tuned (`predictive.scale: none`, κ = 1 for every posterior), so no "
                "selection error arises.")
    worst = table.loc[table.sel_share.idxmax()]
    out = [f"Re-tuning {KAPPA_S} on bootstrap resamples of the {int(table.n_val.iloc[0])} validation images selects the same {KAPPA_S} in "
           f"{100 * table.stable.min():.0f}–{100 * table.stable.max():.0f}% of the resamples and moves ΔECE with a "
           f"standard deviation of at most {PP * table.sel_se.max():.2f} pp, {100 * worst.sel_share:.0f}% of the "
           f"standard deviation of the intervals' bootstrap at the most ({_posterior_names([worst.posterior])}).",
           "The intervals of @sec-attribution include this error: every bootstrap replicate re-tunes " + KAPPA_S
           + " on its own resample of the validation images."]
    material = table[table.sel_share > MATERIAL].posterior.tolist()
    if material:
        out.append(f"For {_posterior_names(material)} the choice of {KAPPA_S} is a material part of the interval's width; more "
                   "validation images (`predictive.scale_images`, `data.val_size`) would narrow it.")
    else:
        out.append("It is a small part of every interval's width.")
    return " ".join(out)


def display_control_table(control: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """:attr:`lib.attribution.Attribution.control` formatted for reading: κ_S and σ² (medians over
    seeds; σ² marked where it sits at an end of its grid), ΔECE of the Laplace block and of the
    isotropic control and their paired difference with ``1 − alpha`` intervals (pp), and the verdict."""
    return pd.DataFrame({
        "Block": control.block,
        "tuned κ": control.kappa.map(lambda v: f"{v:.3g}"),
        "tuned σ²": [f"{v:.3g}" + (f" ({e} end of grid)" if e else "") for v, e in
               zip(control.sigma2, control.sigma2_edge.fillna(""))],
        f"ΔECE Laplace, pp [{level(alpha)} CI]": [ci(d, lo, hi) for d, lo, hi in
                                                zip(control.delta, control.lower, control.upper)],
        f"ΔECE isotropic, pp [{level(alpha)} CI]": [ci(d, lo, hi) for d, lo, hi in
                                                  zip(control.delta_iso, control.iso_lower, control.iso_upper)],
        f"Laplace − isotropic, pp [{level(alpha)} CI]": [ci(d, lo, hi) for d, lo, hi in
                                                       zip(control["diff"], control.diff_lower, control.diff_upper)],
        "Laplace shape": [_shape_verdict(lo, hi) for lo, hi in zip(control.diff_lower, control.diff_upper)],
    })


def _shape_verdict(lower: float, upper: float) -> str:
    """``'better'``, ``'worse'`` or ``'no difference shown'`` from the interval of Δ_Laplace − Δ_iso."""
    return "better" if lower > 0 else "worse" if upper < 0 else "no difference shown"


def control_summary(control: pd.DataFrame, alpha: float) -> str:
    """Whether the Laplace posterior's shape beats isotropic noise of tuned size, block by block, from
    :attr:`lib.attribution.Attribution.control` (the paired interval of Δ_Laplace − Δ_iso)."""
    better = control[control.diff_lower > 0].block.tolist()
    worse = control[control.diff_upper < 0].block.tolist()
    same = control[(control.diff_lower <= 0) & (control.diff_upper >= 0)].block.tolist()
    out = []
    if better:
        out.append(f"For {_blocks_text(better)} the Laplace posterior's shape calibrates better than isotropic noise of "
                   f"tuned size (the {level(alpha)} interval of {CONTROL_DIFF} lies above zero).")
    if worse:
        out.append(f"For {_blocks_text(worse)} isotropic noise of tuned size calibrates better than the Laplace posterior "
                   "(that interval lies below zero).")
    if same and len(same) == len(control):
        out.append("For every block the isotropic control matches the Laplace block's ΔECE (every interval of "
                   + CONTROL_DIFF + " includes zero): the calibration gain is not specific to the posterior's "
                   "shape; noise of the right size on the same weights does as well.")
    elif same:
        out.append(f"For {_blocks_text(same)} the control matches the Laplace block (the interval of the difference "
                   "includes zero): there the gain is not specific to the posterior's shape.")
    for word in ("lower", "upper"):
        hit = control[control.sigma2_edge.fillna("") == word].block.tolist()
        if hit:
            out.append(f"For {_blocks_text(hit)} the tuned σ² sits at the {word} end of its grid on at least one seed, so "
                       f"the control's best size may lie beyond it (widen `predictive.control_range`)"
                       + ("; at the lower end the noise is so small that the control predicts almost like the MAP."
                          if word == "lower" else "."))
    return " ".join(out)


def scale_summary(table: pd.DataFrame, cfg: Config) -> str:
    """How far the evidence-tuned posterior is from the validation-optimal width, in words."""
    t = table.set_index("posterior")
    det, full = t.loc["deterministic (MAP)"], t.loc["all"]
    raw = (f"With the evidence-tuned prior alone (κ = 1), the all-block posterior moves test accuracy from "
           f"{det['acc % κ=1']:.1f}% (MAP) to {full['acc % κ=1']:.1f}% and the ECE from {det['ECE % κ=1']:.2f}% to "
           f"{full['ECE % κ=1']:.2f}%.")
    if cfg.predictive.scale == "none":
        return raw + " This profile uses the posteriors as the evidence gives them (`predictive.scale: none`)."
    singles = t[t.index.str.startswith("single ")]
    grid = cfg.predictive.scale_range
    return (raw + f" The validation NLL selects κ = {full['κ median']:.3g} for it (median over seeds; grid "
            f"{grid[0]:g}–{grid[1]:g}, {cfg.predictive.scale_points} points), which gives {full['acc % κ_S']:.1f}% "
            f"accuracy and {full['ECE % κ_S']:.2f}% ECE; single blocks select κ between {singles['κ min'].min():.3g} and "
            f"{singles['κ max'].max():.3g}. All results below use each subset's own {KAPPA_S}." + _grid_edges(t, grid))


def _at_grid_ends(t: pd.DataFrame, grid: tuple[float, ...]) -> tuple[pd.Series, pd.Series]:
    """Per posterior of :func:`scale_table` (indexed by posterior): whether its κ_S sits at the
    upper, and at the lower, end of the grid ``(low, high)`` on at least one seed."""
    return t["κ max"] >= grid[1] * (1 - 1e-9), t["κ min"] <= grid[0] * (1 + 1e-9)


def _grid_edges(t: pd.DataFrame, grid: tuple[float, ...]) -> str:
    """A caveat naming the posteriors whose κ_S sits at an end of the grid (on any seed)."""
    named = t.drop(index="deterministic (MAP)")
    upper, lower = _at_grid_ends(named, grid)
    out = []
    for hit, word, fix in ((upper, "upper", "extend the grid upwards"), (lower, "lower", "extend the grid downwards")):
        if hit.any():
            who = (f"all {len(named)} posteriors" if hit.all() else _posterior_names(named.index[hit]))
            out.append(f" For {who} the selected κ is at the {word} end of the grid on at least one seed, so the "
                       f"validation optimum may lie beyond it (to check, {fix} in `predictive.scale_range`).")
    return "".join(out)


def _join(items: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return ", ".join(items[:-1]) + (" and " if len(items) > 1 else "") + items[-1]


def baseline_table(metrics: list[pd.DataFrame], choices: list[str], latency: pd.DataFrame) -> pd.DataFrame:
    """Deterministic, temperature scaling and the given posteriors: ECE, signed ECE (positive:
    over-confident), NLL, accuracy (means over seeds), extra latency per image and, where it was
    measured (CUDA, :func:`lib.deploy.latency_table`), the peak memory of one batch's predictive."""
    names = ["none", "temperature scaling", *choices]
    label = {"none": "deterministic (MAP)", "temperature scaling": "temperature scaling (validation-fitted)"}
    lat = latency.set_index("posterior")
    mem = lat.peak_mib.rename({"deterministic": "none"}) if lat.peak_mib.notna().any() else None
    rows = []
    for n in names:
        vals = pd.concat([m.set_index("posterior").loc[[n]] for m in metrics])
        row = {"method": label.get(n, f"Laplace, {display_name(n)}"), "ECE (%)": round(PP * vals.ece.mean(), 2),
               "signed ECE (pp)": round(PP * vals.signed_ece.mean(), 2),
               "NLL": round(vals.nll.mean(), 4), "accuracy (%)": round(PP * vals.accuracy.mean(), 2),
               "extra ms / image": round(float(lat.extra_ms.get(n, 0.0)), 4)}
        if mem is not None:
            row["peak MiB"] = round(float(mem.get(n, mem.get("none"))), 1)
        rows.append(row)
    return pd.DataFrame(rows)


def _with_interval(est: float, lo: float, hi: float, digits: int, scale: float = 1.0) -> str:
    """``+1.23 [+0.80, +1.70]`` of ``scale × (est, lo, hi)`` with ``digits`` decimals."""
    return f"{signed(scale * est, digits)} [{signed(scale * lo, digits)}, {signed(scale * hi, digits)}]"


def display_baselines(table: pd.DataFrame) -> pd.DataFrame:
    """The metrics and costs of :func:`lib.baselines.table.baseline_table` for reading, one row per
    method (index ``Method``): accuracy and ECE in %, NLL and Brier, extra latency per image over
    MAP, extra training (s), floats stored beyond the MAP model and the peak extra memory (MiB, –
    where not measured, e.g. on the CPU)."""
    out = pd.DataFrame({
        "Method": table.method,
        "accuracy (%)": (PP * table.accuracy).map(lambda v: format_number(v, "percent")),
        "ECE (%)": (PP * table.ece).map(lambda v: format_number(v, "percent")),
        "NLL": table.nll.map(lambda v: format_number(v, "metric")),
        "Brier": table.brier.map(lambda v: format_number(v, "metric")),
        "extra ms / image": table.extra_ms.map(lambda v: f"{v:.3g}".replace("-", "−")),
        "extra training (s)": table.train_seconds.map(lambda v: format_number(v, "seconds")),
        "extra floats": table.extra_params.map(lambda v: format_number(v, "count")),
        "peak MiB": table.peak_mib.map(lambda v: format_number(v, "seconds")),
    })
    return out.set_index("Method")


def display_paired(table: pd.DataFrame) -> pd.DataFrame:
    """The paired differences of :func:`lib.baselines.table.baseline_table` for reading (index
    ``Method``): ΔECE (pp) and ΔNLL against MAP and against temperature scaling, each with its
    interval (positive: the method is better)."""
    cols = {"ΔECE vs MAP (pp)": ("d_ece_map", 2, PP), "ΔECE vs TS (pp)": ("d_ece_ts", 2, PP),
            "ΔNLL vs MAP": ("d_nll_map", 4, 1.0), "ΔNLL vs TS": ("d_nll_ts", 4, 1.0)}
    out = {"Method": table.method}
    for title, (c, digits, scale) in cols.items():
        out[title] = [_with_interval(r[c], r[f"{c}_lo"], r[f"{c}_hi"], digits, scale) for _, r in table.iterrows()]
    return pd.DataFrame(out).set_index("Method")


def display_importance(blocks: pd.DataFrame, tau: pd.DataFrame) -> pd.DataFrame:
    """Per block ΔECE(ℓ) (pp) and each importance score (3 significant digits), then one row per
    score with Kendall's τ-b and its interval: two tables' worth in one (index ``Block``)."""
    scores = [c for c in blocks.columns if c not in ("block", "delta")]
    out = pd.DataFrame({"Block": blocks.block.map(str), "ΔECE(ℓ) (pp)": (PP * blocks.delta).map(lambda v: signed(v, 2)),
                        **{s: blocks[s].map(lambda v: f"{v:.3g}") for s in scores}})
    taus = {s: _with_interval(r.kendall_tau, r.lower, r.upper, 2) for s, r in tau.set_index("score").iterrows()}
    out.loc[len(out)] = ["Kendall τ-b with ΔECE(ℓ)", "", *[taus[s] for s in scores]]
    return out.set_index("Block")


def display_shift_gains(gains: pd.DataFrame) -> pd.DataFrame:
    """:attr:`lib.shift_study.ShiftResults.gains` for reading: one row per method and reference,
    one column per severity (0: clean), each the ECE gain in pp with its interval."""
    g = gains.assign(cell=[_with_interval(r.gain, r.lower, r.upper, 2, PP) for r in gains.itertuples()],
                     severity=gains.severity.map(lambda v: "clean" if v == 0 else f"severity {v}"))
    wide = g.pivot_table(index=["method", "reference"], columns="severity", values="cell", aggfunc="first", sort=False)
    wide = wide.reset_index().rename(columns={"method": "Method", "reference": "gain over"})
    wide.columns.name = None
    return wide.set_index("Method")


def display_ood(ood: pd.DataFrame, score: str = "entropy") -> pd.DataFrame:
    """:attr:`lib.shift_study.ShiftResults.ood` for reading, means over seeds: one row per method, per
    OOD set the AUROC (%) with its interval (the seeds' mean bounds) and the AUPR (%), for ``score``."""
    t = ood[ood.score == score].groupby(["method", "ood_set"], sort=False)[
        ["auroc", "auroc_lower", "auroc_upper", "aupr"]].mean().reset_index()
    rows = {}
    for r in t.itertuples():
        row = rows.setdefault(r.method, {"Method": r.method})
        row[f"{r.ood_set}: AUROC (%)"] = f"{PP * r.auroc:.1f} [{PP * r.auroc_lower:.1f}, {PP * r.auroc_upper:.1f}]"
        row[f"{r.ood_set}: AUPR (%)"] = f"{PP * r.aupr:.1f}"
    return pd.DataFrame(list(rows.values())).set_index("Method")


def laplace_fit_table(stages: list, seeds: list[int]) -> pd.DataFrame:
    """Laplace fit per seed (from each ``laplace`` stage's ``info.json``): images, time, evidence, device."""
    rows = []
    for seed, st in zip(seeds, stages):
        info = json.loads(st.file("info.json").read_text())
        rows.append({"seed": seed, "fit_images": info["fit_images"], "fit_seconds": info["fit_seconds"],
                     "fit_images_per_s": info["fit_images_per_s"], "prior_init": info["prior_init"],
                     "log_marginal_likelihood": info["log_marginal_likelihood"], "device": info["environment"]["device"]})
    return pd.DataFrame(rows)


def temperature_gain(baseline: pd.DataFrame) -> float:
    """Temperature scaling's calibration gain ECE_det − ECE_TS (a fraction, as ΔECE) from the saved
    :func:`baseline_table`, the reference line of the answer figure."""
    b = baseline.set_index("method")["ECE (%)"]
    return float(b["deterministic (MAP)"] - b["temperature scaling (validation-fitted)"]) / PP
