"""lib.deploy: the serving-time GLM predictive equals the study's per-block bank for any subset."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from lib.deploy import GLMPredictor, cost_model_violations, latency_table, time_call
from lib.laplace import build_posterior, fit_kron
from lib.laplace.predictive import perturbation_bank, subset_probs
from lib.model import unwrap


@pytest.fixture
def fitted(tiny_lora_vit, tiny_batch, one_thread):
    x, y = tiny_batch
    curv = fit_kron(tiny_lora_vit, [(x, y)], device="cpu", kfac="reduce")
    return tiny_lora_vit, build_posterior(curv, prior_precision=torch.tensor([4.0, 2.0, 8.0]), prior_tuning="none"), x, y


@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("blocks", [[0], [2], [0, 2], [0, 1, 2]])
def test_predictor_equals_bank_subset(fitted, blocks, mode):
    """One tail JVP with all blocks' tangents (forward), or the reverse-mode perturbation, equals
    the sum of the bank's per-block terms (same samples, the bank in forward mode)."""
    model, post, x, y = fitted
    bank = perturbation_bank(model, post, [(x, y)], n_samples=6, seed=3, device="cpu", mode="forward")
    mask = torch.tensor([b in blocks for b in bank.blocks])
    pred = GLMPredictor(model, post, blocks, n_samples=6, seed=3, device=torch.device("cpu"), mode=mode)
    assert pred.reverse == (mode == "reverse")
    assert torch.allclose(pred(x), subset_probs(bank, mask, method="mc"), atol=1e-5)


@pytest.mark.parametrize("scale", [0.0, 0.05, 3.0])
def test_predictor_scale_equals_bank_scale(fitted, scale):
    """Serving with covariance scale κ equals the bank's subset predictive at κ; κ = 0 is the MAP."""
    model, post, x, y = fitted
    bank = perturbation_bank(model, post, [(x, y)], n_samples=6, seed=3, device="cpu")
    for mode in ("forward", "reverse"):
        pred = GLMPredictor(model, post, [1, 2], n_samples=6, seed=3, device=torch.device("cpu"), scale=scale, mode=mode)
        assert torch.allclose(pred(x), subset_probs(bank, 0b110, method="mc", scale=scale), atol=1e-5)
    if scale == 0.0:
        assert torch.allclose(pred(x), torch.softmax(bank.map_logits, -1), atol=1e-5)


def test_predictor_depends_on_samples(fitted):
    """A different seed gives different samples, hence a different predictive (the test can fail)."""
    model, post, x, _ = fitted
    a = GLMPredictor(model, post, [0, 1], n_samples=4, seed=0, device=torch.device("cpu"))(x)
    b = GLMPredictor(model, post, [0, 1], n_samples=4, seed=1, device=torch.device("cpu"))(x)
    assert (a - b).abs().max() > 1e-4


def test_latency_table_rows_and_fused_attention_restored(fitted, monkeypatch):
    import lib.laplace.predictive

    monkeypatch.setattr(lib.laplace.predictive, "REVERSE_CLASSES_PER_SAMPLE", 1)  # 'auto' = forward when C > K
    model, post, x, _ = fitted
    fused = [m.fused_attn for m in unwrap(model).modules() if hasattr(m, "fused_attn")]
    table = latency_table(model, post, x, {"single 0": [0], "all": [0, 1, 2]}, n_samples=2, seed=0,
                          device=torch.device("cpu"), n_warmup=0, n_iters=1)
    assert list(table.posterior) == ["deterministic", "single 0", "all"]
    assert (table.ms_per_image > 0).all() and table.extra_ms.iloc[0] == 0
    assert (table.ms_q25 <= table.ms_per_image).all() and (table.ms_per_image <= table.ms_q75).all()
    assert list(table.blocks) == ["", "0", "0 1 2"] and list(table.n_iters) == [1, 1, 1]
    assert list(table.first_block) == [-1, 0, 0] and list(table["mode"]) == ["", "forward", "forward"]  # C = 4 > K = 2

    assert [m.fused_attn for m in unwrap(model).modules() if hasattr(m, "fused_attn")] == fused


def test_time_call_median_counts_calls(monkeypatch):
    """On a fake clock each call takes a known time: the result is the median of the timed calls,
    the (slow) warm-up calls excluded."""
    import lib.deploy as deploy

    now, durations, calls = [0.0], [100.0, 100.0, 0.3, 0.1, 0.5, 0.2, 0.4], []

    def call():
        now[0] += durations[len(calls)]
        calls.append(1)

    monkeypatch.setattr(deploy, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    t = time_call(call, n_warmup=2, n_iters=5, device=torch.device("cpu"))
    assert len(calls) == 7 and t.n == 5 and t.peak_mib is None
    assert (t.q25, t.median, t.q75) == pytest.approx((0.2, 0.3, 0.4), abs=1e-6)  # quartiles of 0.1 … 0.5


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_bf16_predictor_and_bank_agree_with_float32(fitted, mode):
    """The GPU's bf16 path (here under CPU autocast): bank and predictor stay within bf16 rounding
    of the float32 predictive (observed ≤ 1.8e-2), and bf16 really ran."""
    model, post, x, y = fitted
    kw = dict(n_samples=6, seed=3, device="cpu", mode=mode)
    ref = subset_probs(perturbation_bank(model, post, [(x, y)], **kw), 0b101, method="mc")
    bank = perturbation_bank(model, post, [(x, y)], dtype=torch.bfloat16, **kw)
    assert bank.delta.dtype == torch.float32 and bank.map_logits.dtype == torch.float32
    half = subset_probs(bank, 0b101, method="mc")
    pred = GLMPredictor(model, post, [0, 2], n_samples=6, seed=3, device=torch.device("cpu"), mode=mode,
                        dtype=torch.bfloat16)(x)
    for p in (half, pred):
        assert torch.allclose(p.sum(-1), torch.ones(len(x)), atol=1e-5)
        assert torch.allclose(p, ref, atol=0.05)
        assert not torch.allclose(p, ref, atol=1e-5)


def _latency(rows: list[tuple[str, str, float, float, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["posterior", "blocks", "ms_q25", "ms_per_image", "ms_q75"])


def test_cost_model_holds_within_the_noise():
    """Supersets cost at least as much, or less by no more than the overlap of the IQRs: no violation."""
    table = _latency([("deterministic", "", 0.06, 0.07, 0.08), ("single 0", "0", 0.40, 0.44, 0.48),
                      ("single 2", "2", 0.20, 0.21, 0.22), ("first 2", "0 1", 0.42, 0.45, 0.50),
                      ("last 2", "1 2", 0.30, 0.31, 0.33), ("all", "0 1 2", 0.43, 0.47, 0.52)])
    out = cost_model_violations(table)
    assert out.empty and list(out.columns)[:2] == ["subset", "superset"]


def test_cost_model_flags_a_choice_timed_below_the_deterministic_model():
    """The deterministic model is the empty block set: a predictive (which includes the MAP forward)
    measured faster than it, beyond the IQRs, contradicts the model, as in a first, cold timing."""
    table = _latency([("deterministic", "", 110.0, 111.0, 113.0), ("single 0", "0", 12.0, 14.5, 18.0),
                      ("all", "0 1", 10.0, 17.8, 21.0)])
    pairs = set(map(tuple, cost_model_violations(table)[["subset", "superset"]].to_numpy()))
    assert pairs == {("deterministic", "single 0"), ("deterministic", "all")}


def test_cost_model_violations_of_the_reference_h200_run():
    """The latency medians of the reference cifar10-transfer run (H200, commit bcbb6b4; 5 iterations,
    no quartiles stored, so each IQR is taken as zero width) contradict the cost model exactly where
    issue 18 says: all blocks cheaper than the last 11, the last 8 cheaper than the last 7, the first
    2 cheaper than block 0 alone."""
    med = {"single 0": 0.44231, "single 1": 0.34513, "first 2": 0.31582, "last 7": 0.47344, "last 8": 0.35455,
           "last 11": 0.57668, "all": 0.45546}
    blocks = {"single 0": "0", "single 1": "1", "first 2": "0 1", "last 7": "5 6 7 8 9 10 11",
              "last 8": "4 5 6 7 8 9 10 11", "last 11": " ".join(map(str, range(1, 12))),
              "all": " ".join(map(str, range(12)))}
    table = _latency([(n, blocks[n], m, m, m) for n, m in med.items()])
    pairs = set(map(tuple, cost_model_violations(table)[["subset", "superset"]].to_numpy()))
    assert pairs == {("last 11", "all"), ("last 7", "last 8"), ("single 0", "first 2"),
                     ("single 1", "first 2"), ("last 7", "all")}
    wide = table.assign(ms_q25=table.ms_per_image - 0.1, ms_q75=table.ms_per_image + 0.1)
    assert cost_model_violations(wide).empty  # with IQRs that wide, none of them is resolved
    with pytest.raises(ValueError, match="lacks columns"):
        cost_model_violations(table.drop(columns="ms_q25"))


def test_cached_latency_is_measured_once_and_read_back_alike(fitted, tmp_path, monkeypatch):
    """The ``latency`` stage stores the table and hands back the same rows (block strings, missing
    memory on the CPU) without measuring again."""
    import lib.deploy
    from lib.deploy import cached_latency

    monkeypatch.setenv("LLA_ARTIFACTS", str(tmp_path))
    model, post, x, _ = fitted
    kw = dict(n_samples=2, seed=0, device=torch.device("cpu"), n_warmup=0, n_iters=1, upstream=[])
    first = cached_latency(model, post, x, {"single 0": [0], "all": [0, 1, 2]}, **kw)
    assert list(first.posterior) == ["deterministic", "single 0", "all"] and list(first.blocks) == ["", "0", "0 1 2"]
    assert first.peak_mib.isna().all()

    def refuse(*args, **kwargs):
        raise AssertionError("measured again although the stage is done")

    monkeypatch.setattr(lib.deploy, "latency_table", refuse)
    again = cached_latency(model, post, x, {"single 0": [0], "all": [0, 1, 2]}, **kw)
    pd.testing.assert_frame_equal(first, again)
