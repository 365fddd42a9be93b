"""Tests for lib.calibration: hand-worked cases, torchmetrics, relplot, simulations."""

import math

import numpy as np
import pytest
import relplot
import torch
from torchmetrics.classification import BinaryCalibrationError, MulticlassCalibrationError

from lib.calibration import (
    accuracy,
    bin_edges,
    bin_index,
    brier,
    calibration_summary,
    classwise_ece,
    debiased_ece,
    ece,
    ece_equal_mass,
    ece_from_weights,
    weighted_ece,
    mce,
    nll,
    prepare_reliability,
    signed_ece,
    smooth_ece,
    top_label,
)


def _probs_from_conf(conf, correct, n_classes=3):
    """Rows with top class 0 at probability conf; label 0 iff correct."""
    conf = torch.as_tensor(conf, dtype=torch.float64)
    probs = ((1 - conf) / (n_classes - 1))[:, None].repeat(1, n_classes)
    probs[:, 0] = conf
    labels = torch.where(torch.as_tensor(correct, dtype=torch.bool), 0, 1)
    return probs, labels


def _random(n, c, gen, scale=2.0, dtype=torch.float32):
    probs = (scale * torch.randn(n, c, generator=gen, dtype=torch.float64)).softmax(1).to(dtype)
    labels = torch.randint(0, c, (n,), generator=gen)
    return probs, labels


# hand-worked: conf 0.65, 0.75 (bin [0.6, 0.8)), 0.85, 0.95 (bin [0.8, 1)); correct 1, 0, 1, 1.
HAND_CONF, HAND_CORRECT = [0.65, 0.75, 0.85, 0.95], [1, 0, 1, 1]


def test_ece_mce_signed_hand_worked():
    probs, labels = _probs_from_conf(HAND_CONF, HAND_CORRECT)
    # bin [0.6,0.8): conf 0.7, acc 0.5, weight 2/4 ; bin [0.8,1): conf 0.9, acc 1, weight 2/4
    assert torch.allclose(ece(probs, labels, 5), torch.tensor(0.5 * 0.2 + 0.5 * 0.1, dtype=torch.float64))
    assert torch.allclose(signed_ece(probs, labels, 5), torch.tensor(0.5 * 0.2 - 0.5 * 0.1, dtype=torch.float64))
    assert torch.allclose(mce(probs, labels, 5), torch.tensor(0.2, dtype=torch.float64))
    # two equal-width bins [0,.5), [.5,1): one bin, conf 0.8, acc 0.75
    assert torch.allclose(ece(probs, labels, 2), torch.tensor(0.05, dtype=torch.float64))


def test_ece_equal_mass_hand_worked():
    probs, labels = _probs_from_conf(HAND_CONF, HAND_CORRECT)
    # 2 equal-mass bins {0.65, 0.75}, {0.85, 0.95} -> 0.15 (equal-width with 2 bins gives 0.05)
    assert torch.allclose(ece_equal_mass(probs, labels, 2), torch.tensor(0.15, dtype=torch.float64))
    # N=5, M=2 -> sizes 3, 2 (extra example in the first bin); input order shuffled
    probs5, labels5 = _probs_from_conf([0.85, 0.55, 0.95, 0.65, 0.75], [1, 1, 1, 1, 0])
    # {0.55, 0.65, 0.75}: conf 0.65, acc 2/3 -> 3/5 * 1/60 ; {0.85, 0.95}: conf 0.9, acc 1 -> 2/5 * 0.1
    expected = 3 / 5 * (2 / 3 - 0.65) + 2 / 5 * 0.1
    assert torch.allclose(ece_equal_mass(probs5, labels5, 2), torch.tensor(expected, dtype=torch.float64))


def test_nll_brier_accuracy_hand_worked():
    probs = torch.tensor([[0.5, 0.5, 0.0], [0.25, 0.75, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0])
    assert torch.allclose(nll(probs, labels), torch.tensor(1.5 * math.log(2), dtype=torch.float64))
    # (0.25 + 0.25 + 0) and (0.5625 + 0.5625 + 0)
    assert torch.allclose(brier(probs, labels), torch.tensor((0.5 + 1.125) / 2, dtype=torch.float64))
    # argmax of row 0 is class 0 (first max), row 1 is class 1
    assert torch.allclose(accuracy(probs, labels), torch.tensor(0.5, dtype=torch.float64))


@pytest.mark.parametrize("n_bins", [1, 5, 10, 15, 30])
@pytest.mark.parametrize("n_classes", [2, 10])
def test_ece_mce_equal_torchmetrics(n_bins, n_classes):
    gen = torch.Generator().manual_seed(n_bins * 100 + n_classes)
    probs, labels = _random(3000, n_classes, gen)
    # exact edge cases: confidence exactly 1.0 and exactly on a bin edge
    probs[:20] = torch.nn.functional.one_hot(labels[:20], n_classes).float()
    if n_classes == 2:
        probs[20:40] = torch.tensor([0.5, 0.5])
        probs[40:60] = torch.tensor([0.8, 0.2])
    tm_l1 = MulticlassCalibrationError(n_classes, n_bins=n_bins, norm="l1")(probs, labels)
    tm_max = MulticlassCalibrationError(n_classes, n_bins=n_bins, norm="max")(probs, labels)
    assert torch.allclose(ece(probs, labels, n_bins), tm_l1, atol=1e-6)
    assert torch.allclose(mce(probs, labels, n_bins), tm_max, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bin_edges_are_k_over_m_rounded_and_left_closed(dtype):
    """Edge k is k/M correctly rounded in the confidences' dtype (Python's float64 division, numpy's
    float32 division); a confidence equal to an edge lands in the slot starting there, the number just
    below it in the slot before (1.0 in the point-mass slot M)."""
    for n_bins in range(1, 61):
        ref = [k / n_bins for k in range(n_bins + 1)] if dtype == torch.float64 else [
            np.float32(k) / np.float32(n_bins) for k in range(n_bins + 1)]
        edges = bin_edges(n_bins, dtype)
        assert edges.dtype == dtype and edges.tolist() == [float(e) for e in ref]
        k = torch.arange(n_bins + 1)
        assert torch.equal(bin_index(edges, n_bins), k)
        below = torch.nextafter(edges[1:], torch.zeros((), dtype=dtype))
        assert torch.equal(bin_index(below, n_bins), k[:-1])


def test_on_edge_float64_confidences_hand_worked_and_torchmetrics():
    """float64 0.3 with 10 bins is in [0.3, 0.4) (float64 linspace's edge 0.30000000000000004 put it
    in [0.2, 0.3)), and likewise 0.0, 0.1, 0.7 and 1.0 land in the slot whose lower edge they are, as
    torchmetrics bins them (in float32) for M = 10. ECE by hand with 4 classes:
    conf 0.26 wrong (slot 2), 0.3 right (slot 3), 0.65 right (slot 6), 0.7 wrong (slot 7), 1.0 right
    (slot 10): (0.26 + 0.7 + 0.35 + 0.7 + 0) / 5 = 0.402; with 0.3 in slot 2 it would be 0.298."""
    conf = torch.tensor([0.0, 0.1, 0.3, 0.7, 1.0], dtype=torch.float64)
    assert bin_index(conf, 10).tolist() == [0, 1, 3, 7, 10]
    assert bin_index(conf.float(), 10).tolist() == [0, 1, 3, 7, 10]
    assert bin_index(torch.tensor([3 / 15, 0.8, 1 / 3], dtype=torch.float64), 15).tolist() == [3, 12, 5]
    probs, labels = _probs_from_conf([0.26, 0.3, 0.65, 0.7, 1.0], [0, 1, 1, 0, 1], n_classes=4)
    expected = (0.26 + 0.7 + 0.35 + 0.7 + 0.0) / 5
    assert torch.allclose(ece(probs, labels, 10), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-15)
    tm = MulticlassCalibrationError(4, n_bins=10, norm="l1")(probs, labels)
    assert torch.allclose(tm.double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-6)
    rd = prepare_reliability(probs, labels, 10)
    assert rd.count.tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1] and rd.ece == pytest.approx(expected, abs=1e-15)


def test_reliability_bins_in_the_dtype_of_the_confidences():
    """float32 0.7 (0.699999988 as a float64) is the float32 edge 7/10: reliability data (summed in
    float64) puts it in slot 7, as ece() on the float32 probabilities does."""
    probs, labels = _probs_from_conf([0.7, 0.3, 0.9], [1, 0, 1], n_classes=4)
    probs = probs.float()
    rd = prepare_reliability(probs, labels, 10)
    assert rd.count.tolist() == [0, 0, 0, 1, 0, 0, 0, 1, 0, 1, 0]
    assert rd.ece == pytest.approx(float(ece(probs, labels, 10)), abs=1e-7)


def test_classwise_ece_equals_mean_of_binary_torchmetrics():
    gen = torch.Generator().manual_seed(3)
    probs, labels = _random(2000, 5, gen)
    ref = torch.stack([
        BinaryCalibrationError(n_bins=10, norm="l1")(probs[:, c], (labels == c).long()) for c in range(5)
    ]).mean()
    assert torch.allclose(classwise_ece(probs, labels, 10), ref, atol=1e-6)


@pytest.mark.parametrize("seed,scale", [(0, 1.0), (1, 3.0), (2, 6.0)])
def test_smooth_ece_matches_relplot(seed, scale):
    gen = torch.Generator().manual_seed(seed)
    probs, labels = _random(3000, 10, gen, scale=scale, dtype=torch.float64)
    f, y = top_label(probs, labels)
    ref, ref_sigma = relplot.smECE(f.numpy(), y.numpy(), return_width=True)
    ours, sigma = smooth_ece(probs, labels, return_sigma=True)
    assert sigma == pytest.approx(ref_sigma, abs=1e-12)
    # same discretisation as relplot 1.0.3: agreement to float64 round-off (tolerance 1e-9)
    assert torch.allclose(ours, torch.tensor(ref, dtype=torch.float64), atol=1e-9)
    fixed = smooth_ece(probs, labels, sigma=0.05)
    assert torch.allclose(fixed, torch.tensor(relplot.smECE_sigma(f.numpy(), y.numpy(), 0.05), dtype=torch.float64), atol=1e-9)


def test_debiased_ece_is_approximately_unbiased():
    gen = torch.Generator().manual_seed(0)
    n, reps = 500, 300
    sq_calibrated, plain_calibrated, sq_miscal = [], [], []
    for _ in range(reps):
        conf = 0.35 + 0.65 * torch.rand(n, generator=gen, dtype=torch.float64)
        u = torch.rand(n, generator=gen, dtype=torch.float64)
        probs, labels = _probs_from_conf(conf, u < conf)
        sq_calibrated.append(debiased_ece(probs, labels, 10, squared=True))
        plain_calibrated.append(ece(probs, labels, 10))
        # accuracy = conf - 0.1 everywhere: true binned squared calibration error 0.01
        probs_m, labels_m = _probs_from_conf(conf, u < conf - 0.1)
        sq_miscal.append(debiased_ece(probs_m, labels_m, 10, squared=True))
    sq_c, pl_c, sq_m = map(torch.stack, (sq_calibrated, plain_calibrated, sq_miscal))
    se = sq_c.std() / math.sqrt(reps)
    assert abs(float(sq_c.mean())) < 4 * float(se) + 2e-4   # debiased ~ 0 for calibrated data
    assert float(pl_c.mean()) > 0.03                          # plug-in ECE is clearly biased up
    assert abs(float(sq_m.mean()) - 0.01) < 4 * float(sq_m.std() / math.sqrt(reps)) + 5e-4
    # the reported (default) value is the sqrt of the clipped squared estimator
    probs, labels = _probs_from_conf(conf, u < conf - 0.1)
    sq = debiased_ece(probs, labels, 10, squared=True)
    assert torch.allclose(debiased_ece(probs, labels, 10), sq.clamp_min(0).sqrt())


def test_debiased_ece_hand_worked():
    probs, labels = _probs_from_conf(HAND_CONF, HAND_CORRECT)
    # equal-mass bins of 2: (0.5-0.7)^2 - 0.25/1 = -0.21 ; (1-0.9)^2 - 0 = 0.01 -> mean -0.1
    sq = debiased_ece(probs, labels, 2, squared=True)
    assert torch.allclose(sq, torch.tensor(0.5 * (0.04 - 0.25) + 0.5 * 0.01, dtype=torch.float64))
    assert float(debiased_ece(probs, labels, 2)) == 0.0


def test_ece_from_weights_identity_and_multiplicities():
    gen = torch.Generator().manual_seed(5)
    probs, labels = _random(400, 6, gen, dtype=torch.float64)
    conf, correct = top_label(probs, labels)
    ones = torch.ones(1, 400, dtype=torch.float64)
    assert torch.allclose(ece_from_weights(conf, correct, ones, 15), ece(probs, labels, 15)[None], atol=1e-12)
    idx = torch.randint(0, 400, (7, 400), generator=gen)
    w = torch.zeros(7, 400, dtype=torch.float64).scatter_add_(1, idx, torch.ones(7, 400, dtype=torch.float64))
    ref = torch.stack([ece(probs[i], labels[i], 15) for i in idx])
    assert torch.allclose(ece_from_weights(conf, correct, w, 15), ref, atol=1e-12)
    # (P, N) inputs -> (R, P)
    probs2, _ = _random(400, 6, gen, dtype=torch.float64)
    conf2, correct2 = top_label(probs2, labels)
    out = ece_from_weights(torch.stack([conf, conf2]), torch.stack([correct, correct2]), w, 15)
    ref2 = torch.stack([ece(probs2[i], labels[i], 15) for i in idx])
    assert out.shape == (7, 2)
    assert torch.allclose(out[:, 1], ref2, atol=1e-12)


def test_weighted_ece_rowwise_confidences_and_multiplicities():
    """Each row has its own confidences and bootstrap counts: equals ece on the repeated examples;
    unit weights give ece; shared confidences give ece_from_weights."""
    gen = torch.Generator().manual_seed(6)
    rows = [_random(300, 5, gen, dtype=torch.float64) for _ in range(4)]
    labels = rows[0][1]
    probs = torch.stack([p for p, _ in rows])  # (4, 300, 5), one label vector
    conf, pred = probs.max(-1)
    correct = (pred == labels).double()
    idx = torch.randint(0, 300, (4, 300), generator=gen)
    w = torch.zeros(4, 300, dtype=torch.float64).scatter_add_(1, idx, torch.ones(4, 300, dtype=torch.float64))
    ref = torch.stack([ece(probs[r, idx[r]], labels[idx[r]], 12) for r in range(4)])
    assert torch.allclose(weighted_ece(conf, correct, w, 12), ref, atol=1e-12)
    unit = weighted_ece(conf, correct, torch.ones(300), 12)
    assert torch.allclose(unit, torch.stack([ece(probs[r], labels, 12) for r in range(4)]), atol=1e-12)
    shared = weighted_ece(conf[0].expand(4, -1), correct[0].expand(4, -1), w, 12)
    assert torch.allclose(shared, ece_from_weights(conf[0], correct[0], w, 12), atol=1e-12)
    with pytest.raises(ValueError, match="same shape"):
        weighted_ece(conf, correct[:, :10], w, 12)


def test_prepare_reliability_and_summary_consistent():
    gen = torch.Generator().manual_seed(7)
    probs, labels = _random(1000, 4, gen, dtype=torch.float64)
    probs[:3] = torch.nn.functional.one_hot(labels[:3], 4).double()
    rd = prepare_reliability(probs, labels, 10)
    assert rd.count.shape == (11,) and int(rd.count.sum()) == 1000 and int(rd.count[10]) == 3
    assert rd.ece == pytest.approx(float(ece(probs, labels, 10)), abs=1e-12)
    conf, _ = top_label(probs, labels)
    assert torch.equal(torch.bincount(bin_index(conf, 10), minlength=11), rd.count)
    s = calibration_summary(probs, labels, n_bins=10)
    assert s["ece"] == pytest.approx(float(ece(probs, labels, 10)))
    assert s["brier"] == pytest.approx(float(brier(probs, labels)))
    assert set(s) == {"ece", "ece_em", "ece_debiased", "smece", "classwise_ece", "signed_ece", "mce", "nll",
                      "brier", "accuracy"}


def test_bad_input_raises():
    probs = torch.full((4, 3), 1 / 3)
    with pytest.raises(ValueError, match="labels"):
        ece(probs, torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="n_bins"):
        ece(probs, torch.zeros(4, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match="binning"):
        debiased_ece(probs, torch.zeros(4, dtype=torch.int64), 2, binning="x")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(11)
    probs, labels = _random(2000, 10, gen, dtype=torch.float64)
    cpu = calibration_summary(probs, labels)
    gpu = calibration_summary(probs.cuda(), labels.cuda())
    for key in cpu:
        assert gpu[key] == pytest.approx(cpu[key], abs=1e-9), key
