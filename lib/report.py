"""Result tables of the book: built from the study's records, and formatted for reading.

Chapters call these so that every number in the book comes from the run that produced the
figures; nothing is typed by hand. Numbers are written by :mod:`lib.formatting`; the chapters
write their own sentences over the findings of lib (:mod:`lib.answer`, :mod:`lib.fit_findings`,
:mod:`lib.attribution_findings`, :mod:`lib.statistics_findings`, :mod:`lib.scale_findings`,
:mod:`lib.study_scale`); the tables are stored by :mod:`lib.results`.
"""

from __future__ import annotations

import json

import pandas as pd
import torch

from lib.attribution_findings import shape_verdict
from lib.backbone import BackboneRecord
from lib.calibration import calibration_summary
from lib.config import Config
from lib.formatting import PP, bracket, ci, format_number, level, pp, signed
from lib.model import count_parameters, data_config, n_blocks
from lib.names import display_name
from lib.pipeline import MapRun
from lib.study_scale import model_scale

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
                       f"({cfg.stats.n_boot_shapley:,} per seed for Shapley values); α = {cfg.stats.alpha:g}; equivalence "
                       f"margin ±{PP * cfg.stats.equivalence_margin:g} pp (two one-sided tests)"),
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
    "p_holm": "Holm p", "improves": "improves",
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
                     "halving", "signed_ece", "phi", "equal-width ECE", "equal-mass ECE",
                     "debiased ℓ2 ECE", "smooth ECE", "own κ_S", "shared κ_all", "κ = 1"], "delta_pp"),
    **dict.fromkeys(["seed_sd", "mc_se", "test_se"], "pp"),
    **dict.fromkeys(["accuracy", "ece", "val_accuracy"], "percent"),
    "p_holm": "p", "mc_share": "ratio", "train_seconds": "seconds", "fit_seconds": "seconds",
    "fit_images_per_s": "rate", "fit_images": "count", "kappa_own": "kappa", "prior_init": "kappa",
    "nll": "metric", "brier": "metric", "log_marginal_likelihood": "evidence",
    "max_abs_diff": "tolerance", "max_rel_diff": "tolerance", "tolerance": "tolerance",
}
"""The :data:`lib.formatting.FORMATS` rule of each result-table column that :func:`readable` formats
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
    """:func:`scale_table` formatted for reading (:data:`lib.formatting.FORMATS`): κ as median [min, max], NLL and %."""
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


def display_control_table(control: pd.DataFrame, alpha: float, margin: float) -> pd.DataFrame:
    """:attr:`lib.attribution.Attribution.control` formatted for reading: κ_S and σ² (medians over
    seeds; σ² marked where it sits at an end of its grid), ΔECE of the Laplace block and of the
    isotropic control and their paired difference with ``1 − alpha`` intervals (pp), and the
    verdict of :func:`lib.attribution_findings.shape_verdict` at the equivalence ``margin``."""
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
        "Laplace shape": [shape_verdict(r, alpha, margin) for _, r in control.iterrows()],
    })


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
        out[title] = [bracket(scale * r[c], scale * r[f"{c}_lo"], scale * r[f"{c}_hi"], digits) for _, r in table.iterrows()]
    return pd.DataFrame(out).set_index("Method")


def display_importance(blocks: pd.DataFrame, tau: pd.DataFrame) -> pd.DataFrame:
    """Per block ΔECE(ℓ) (pp) and each importance score (3 significant digits), then one row per
    score with Kendall's τ-b and its interval: two tables' worth in one (index ``Block``)."""
    scores = [c for c in blocks.columns if c not in ("block", "delta")]
    out = pd.DataFrame({"Block": blocks.block.map(str), "ΔECE(ℓ) (pp)": (PP * blocks.delta).map(lambda v: signed(v, 2)),
                        **{s: blocks[s].map(lambda v: f"{v:.3g}") for s in scores}})
    taus = {s: bracket(r.kendall_tau, r.lower, r.upper, 2) for s, r in tau.set_index("score").iterrows()}
    out.loc[len(out)] = ["Kendall τ-b with ΔECE(ℓ)", "", *[taus[s] for s in scores]]
    return out.set_index("Block")


def display_shift_gains(gains: pd.DataFrame) -> pd.DataFrame:
    """:attr:`lib.shift_study.ShiftResults.gains` for reading: one row per method and reference,
    one column per severity (0: clean), each the ECE gain in pp with its interval."""
    g = gains.assign(cell=[bracket(PP * r.gain, PP * r.lower, PP * r.upper, 2) for r in gains.itertuples()],
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
