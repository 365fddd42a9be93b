"""lib.ood: OOD scores, AUROC and AUPR against sklearn and torchmetrics (with ties), hand-worked
cases, weighted AUROC against repeated data, and the paired bootstrap (against a loop over
resamples and by coverage in a small simulation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from torchmetrics.functional.classification import binary_auroc, binary_average_precision

from lib.ood import (
    auroc,
    auroc_difference,
    average_precision,
    entropy_score,
    max_prob_score,
    ood_scores,
    paired_bootstrap_auroc,
    weighted_auroc,
)
from lib.resample import bootstrap_counts

pytestmark = pytest.mark.usefixtures("one_thread")


def _sk(scores_in: torch.Tensor, scores_out: torch.Tensor) -> tuple[float, float]:
    y = np.r_[np.zeros(len(scores_in)), np.ones(len(scores_out))]
    s = np.r_[scores_in.numpy(), scores_out.numpy()]
    return roc_auc_score(y, s), average_precision_score(y, s)


def test_hand_worked_four_points():
    """in (0.1, 0.4), OOD (0.35, 0.8): 3 of 4 pairs ordered → AUROC 3/4; descending 0.8 (OOD),
    0.4, 0.35 (OOD), 0.1: precision 1 at recall ½ and 2/3 at recall 1 → AP = ½ + ⅓ = 5/6."""
    s_in, s_out = torch.tensor([0.1, 0.4], dtype=torch.float64), torch.tensor([0.35, 0.8], dtype=torch.float64)
    assert abs(float(auroc(s_in, s_out)) - 0.75) < 1e-15
    assert abs(float(average_precision(s_in, s_out)) - 5 / 6) < 1e-15


def test_hand_worked_ties():
    """All scores equal: AUROC ½ (half credit), AP = N_out / N (one threshold)."""
    s_in, s_out = torch.zeros(3, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    assert float(auroc(s_in, s_out)) == 0.5
    assert abs(float(average_precision(s_in, s_out)) - 0.4) < 1e-15
    # in (1, 2), OOD (2, 3): pairs 2>1, 2=2 (½), 3>1, 3>2 → 3.5 / 4
    assert float(auroc(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 3.0]))) == 0.875


@pytest.mark.parametrize("seed", range(6))
def test_against_sklearn_and_torchmetrics_with_ties(seed):
    """Integer-valued scores (many ties), unequal sizes, separable to various degrees."""
    g = torch.Generator().manual_seed(seed)
    n_in, n_out = 30 + 7 * seed, 11 + 5 * seed
    s_in = torch.randint(0, 6, (n_in,), generator=g).double()
    s_out = torch.randint(seed % 3, 8, (n_out,), generator=g).double()
    ref_roc, ref_ap = _sk(s_in, s_out)
    assert abs(float(auroc(s_in, s_out)) - ref_roc) < 1e-12
    assert abs(float(average_precision(s_in, s_out)) - ref_ap) < 1e-12
    preds = torch.cat([s_in, s_out]) / 8
    target = torch.cat([torch.zeros(n_in), torch.ones(n_out)]).long()
    assert abs(float(auroc(s_in, s_out)) - float(binary_auroc(preds, target))) < 1e-6
    assert abs(float(average_precision(s_in, s_out)) - float(binary_average_precision(preds, target))) < 1e-6


def test_batched_rows_match_one_row_at_a_time():
    g = torch.Generator().manual_seed(9)
    s_in = torch.rand(4, 50, generator=g, dtype=torch.float64).round(decimals=1)
    s_out = (torch.rand(4, 20, generator=g, dtype=torch.float64) + 0.2).round(decimals=1)
    a, p = auroc(s_in, s_out), average_precision(s_in, s_out)
    for k in range(4):
        ref_roc, ref_ap = _sk(s_in[k], s_out[k])
        assert abs(float(a[k]) - ref_roc) < 1e-12 and abs(float(p[k]) - ref_ap) < 1e-12


def test_scores_and_their_auroc_and_aupr():
    """max_prob: −max p; entropy: −Σ p log p (log 2 for (½, ½), 0 for one-hot)."""
    probs = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]], dtype=torch.float64)
    assert torch.allclose(max_prob_score(probs), torch.tensor([-0.5, -1.0, -0.5], dtype=torch.float64))
    ref = torch.tensor([math.log(2), 0.0, -(0.2 * math.log(0.2) + 0.3 * math.log(0.3) + 0.5 * math.log(0.5))],
                       dtype=torch.float64)
    assert torch.allclose(entropy_score(probs), ref, atol=1e-15)
    g = torch.Generator().manual_seed(0)
    p_in = torch.softmax(3 * torch.randn(2, 40, 5, generator=g, dtype=torch.float64), -1)
    p_out = torch.softmax(torch.randn(2, 25, 5, generator=g, dtype=torch.float64), -1)
    s_in, s_out = ood_scores(p_in), ood_scores(p_out)
    assert set(s_in) == {"max_prob", "entropy"}
    m = {f"{metric}_{k}": fn(s_in[k], s_out[k]) for k in s_in for metric, fn in (("auroc", auroc), ("aupr", average_precision))}
    for k in range(2):
        ref_roc, ref_ap = _sk(entropy_score(p_in[k]), entropy_score(p_out[k]))
        assert abs(float(m["auroc_entropy"][k]) - ref_roc) < 1e-12
        assert abs(float(m["aupr_entropy"][k]) - ref_ap) < 1e-12
        ref_roc, _ = _sk(-p_in[k].max(-1).values, -p_out[k].max(-1).values)
        assert abs(float(m["auroc_max_prob"][k]) - ref_roc) < 1e-12
    assert (m["auroc_entropy"] > 0.7).all()


def test_weighted_auroc_matches_repeated_data_and_sklearn_weights():
    g = torch.Generator().manual_seed(3)
    s_in = torch.randint(0, 5, (25,), generator=g).double()
    s_out = torch.randint(1, 7, (15,), generator=g).double()
    w_in = bootstrap_counts(25, 3, g, torch.float64, "cpu")
    w_out = bootstrap_counts(15, 3, g, torch.float64, "cpu")
    got = weighted_auroc(s_in, s_out, w_in, w_out)
    for r in range(3):
        rep_in = s_in.repeat_interleave(w_in[r].long())
        rep_out = s_out.repeat_interleave(w_out[r].long())
        assert abs(float(got[r]) - float(auroc(rep_in, rep_out))) < 1e-12
        y = np.r_[np.zeros(25), np.ones(15)]
        ref = roc_auc_score(y, np.r_[s_in, s_out], sample_weight=np.r_[w_in[r], w_out[r]])
        assert abs(float(got[r]) - ref) < 1e-12


def test_paired_bootstrap_equals_a_loop_over_resamples():
    """Same generator seed → the documented draw order (in counts, then OOD counts, per chunk);
    each replicate equals sklearn's AUROC on the explicitly resampled images."""
    g = torch.Generator().manual_seed(11)
    s_in = torch.randn(2, 30, generator=g, dtype=torch.float64)
    s_out = torch.randn(2, 20, generator=g, dtype=torch.float64) + torch.tensor([[1.0], [0.3]], dtype=torch.float64)
    res = paired_bootstrap_auroc(s_in, s_out, 10, torch.Generator().manual_seed(5), chunk_size=4)
    assert res.samples.shape == (10, 2)
    gen = torch.Generator().manual_seed(5)
    r = 0
    for rows in (4, 4, 2):
        w_in = bootstrap_counts(30, rows, gen, torch.float64, "cpu")
        w_out = bootstrap_counts(20, rows, gen, torch.float64, "cpu")
        for k in range(rows):
            i_in, i_out = w_in[k].long(), w_out[k].long()
            for p in range(2):
                ref, _ = _sk(s_in[p].repeat_interleave(i_in), s_out[p].repeat_interleave(i_out))
                assert abs(float(res.samples[r, p]) - ref) < 1e-12
            r += 1
    for p in range(2):
        assert abs(float(res.estimate[p]) - _sk(s_in[p], s_out[p])[0]) < 1e-12


def test_paired_bootstrap_interval_of_a_difference_covers():
    """Method A: in N(0,1), OOD N(1,1) → AUROC Φ(1/√2); method B adds independent N(0,1) noise to the
    same latent scores → Φ(1/2). 200 simulated data sets of 150 + 100 images, 90 % percentile interval
    of AUROC_A − AUROC_B from 400 paired resamples: coverage within 3 binomial SEs of 0.9 (±0.064)."""
    normal = torch.distributions.Normal(0.0, 1.0)
    true = float(normal.cdf(torch.tensor(1 / math.sqrt(2))) - normal.cdf(torch.tensor(0.5)))
    g = torch.Generator().manual_seed(0)
    covered, widths = 0, []
    for _ in range(200):
        z_in = torch.randn(150, generator=g, dtype=torch.float64)
        z_out = torch.randn(100, generator=g, dtype=torch.float64) + 1
        s_in = torch.stack([z_in, z_in + torch.randn(150, generator=g, dtype=torch.float64)])
        s_out = torch.stack([z_out, z_out + torch.randn(100, generator=g, dtype=torch.float64)])
        est, lo, hi = auroc_difference(paired_bootstrap_auroc(s_in, s_out, 400, g), 0, 1, alpha=0.1)
        assert lo <= est <= hi
        covered += lo <= true <= hi
        widths.append(hi - lo)
    assert abs(covered / 200 - 0.9) < 0.064, covered
    assert 0.02 < float(np.mean(widths)) < 0.2


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="leading dimensions"):
        auroc(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="at least one"):
        auroc(torch.zeros(0), torch.zeros(3))
    with pytest.raises(ValueError, match="finite"):
        average_precision(torch.tensor([float("nan")]), torch.zeros(3))
    with pytest.raises(ValueError, match="generator"):
        paired_bootstrap_auroc(torch.zeros(1, 3), torch.zeros(1, 3), 5, None)
    with pytest.raises(ValueError, match="index"):
        auroc_difference(paired_bootstrap_auroc(torch.zeros(1, 3), torch.ones(1, 3), 5, torch.Generator()), 0, 1)
    with pytest.raises(ValueError, match="probs"):
        entropy_score(torch.zeros(3))
