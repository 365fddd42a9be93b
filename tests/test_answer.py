"""lib.answer: the Summary's findings from hand-made result tables (three blocks)."""

from __future__ import annotations

import pandas as pd
import pytest

from lib.answer import answer
from lib.config import Config
from lib.interval import Interval
from lib.statistics_findings import MATERIAL


def _table() -> pd.DataFrame:
    """Test-set ΔECE: all +2.0 [+1.0, +3.0] pp; block 0 includes zero, block 1 above (Holm), block 2 below."""
    return pd.DataFrame({
        "posterior": ["all", "single 0", "single 1", "single 2"], "kind": ["all", "single", "single", "single"],
        "block": [-1, 0, 1, 2], "delta": [0.02, 0.005, 0.015, -0.01], "lower": [0.01, -0.002, 0.006, -0.02],
        "upper": [0.03, 0.012, 0.024, -0.004], "d_acc": [-0.001, 0.0, 0.0, 0.0], "improves": [False, False, True, False]})


def _ranks(leader_upper: int = 1) -> pd.DataFrame:
    return pd.DataFrame({"block": [0, 1, 2], "rank_upper": [3, leader_upper, 3], "surely_top_k": [False, True, False]})


def _validation() -> pd.DataFrame:
    """Validation picks block 0, which the test set does not favour: the answer follows validation."""
    return pd.DataFrame({"posterior": ["all", "single 0", "single 1", "single 2"], "kind": ["all", "single", "single", "single"],
                         "block": [-1, 0, 1, 2], "val_delta": [0.02, 0.02, 0.01, -0.01]})


def _control(lower: float = 0.001, upper: float = 0.008, tost: tuple = (0.002, 0.007)) -> pd.DataFrame:
    """Block 0's Δ_Laplace − Δ_iso with its 1 − α interval [lower, upper] and its (1 − 2α) interval ``tost``."""
    return pd.DataFrame({"block": [0, 1, 2], "diff": [0.004, 0.0, 0.0], "diff_lower": [lower, -0.01, -0.01],
                         "diff_upper": [upper, 0.01, 0.01], "tost_lower": [tost[0], -0.008, -0.008],
                         "tost_upper": [tost[1], 0.008, 0.008]})


CFG = Config.from_dict({"stats": {"alpha": 0.1}, "predictive": {"scale": "val_nll", "scale_range": [1e-4, 10.0]}})


def test_answer_states_the_validation_choice_and_the_sides_of_zero():
    a = answer(_table(), _ranks(), _validation(), _control(), CFG)
    assert a.all_blocks == Interval(0.02, 0.01, 0.03, 0.1) and a.all_blocks.side == "above"
    assert a.all_blocks_accuracy == -0.001
    assert a.best_block == 0 and a.best == Interval(0.005, -0.002, 0.012, 0.1) and a.best.side == "includes"
    assert (a.above, a.below, a.holm, a.certified) == ((1,), (2,), (1,), (1,)) and a.singled_out
    assert a.shape == Interval(0.004, 0.001, 0.008, 0.1) and a.shape.side == "above" and a.shape_verdict == "better"
    assert answer(_table(), _ranks(), _validation(), _control(-0.009, -0.001), CFG).shape_verdict == "worse"
    # an interval that holds zero is equivalence only when the (1 − 2α) interval lies inside ±0.5 pp (the default margin)
    unclear = answer(_table(), _ranks(), _validation(), _control(-0.003, 0.009, (-0.002, 0.006)), CFG)
    assert unclear.shape.side == "includes" and unclear.shape_verdict == "cannot be distinguished"
    same = answer(_table(), _ranks(), _validation(), _control(-0.003, 0.002, (-0.002, 0.001)), CFG)
    assert same.shape_verdict == "equivalent"
    wide = Config.from_dict({**CFG.to_dict(), "stats": {"alpha": 0.1, "equivalence_margin": 0.01}})
    assert answer(_table(), _ranks(), _validation(), _control(-0.003, 0.009, (-0.002, 0.006)), wide).shape_verdict == "equivalent"
    # without the optional tables: nothing is said about them
    assert (a.leader, a.estimators, a.differing, a.mc_noisy, a.mc_checked, a.selection_material, a.all_kappa_at_floor) == (
        None, (), (), 0, 0, False, False)
    quiet = _table().assign(lower=[0.01, -0.002, -0.001, -0.02], upper=[0.03, 0.012, 0.024, 0.001])
    assert not answer(quiet, _ranks(), _validation(), _control(), CFG).singled_out


def test_leader_under_the_other_estimators():
    def agree(tops):
        return pd.DataFrame({"estimator": ["equal-mass ECE", "smooth ECE"], "top_block": tops, "top_block_study": [1, 1]})

    same = answer(_table(), _ranks(), _validation(), _control(), CFG, agreement=agree([1, 1]))
    assert (same.leader, same.estimators, same.differing) == ("same", ("equal-mass ECE", "smooth ECE"), ())
    depends = answer(_table(), _ranks(leader_upper=1), _validation(), _control(), CFG, agreement=agree([1, 2]))
    assert (depends.leader, depends.differing) == ("depends", ("smooth ECE",))
    assert answer(_table(), _ranks(leader_upper=2), _validation(), _control(), CFG, agreement=agree([1, 2])).leader == "uncertified"


def test_material_monte_carlo_and_selection_error_and_kappa_at_the_grid_floor():
    mc = pd.DataFrame({"posterior": ["single 0", "single 1", "all"], "mc_share": [0.2, MATERIAL + 0.1, 0.9]})
    a = answer(_table(), _ranks(), _validation(), _control(), CFG, mc=mc)
    assert (a.mc_noisy, a.mc_checked) == (2, 3)
    assert answer(_table(), _ranks(), _validation(), _control(), CFG, mc=mc.assign(mc_share=MATERIAL)).mc_noisy == 0
    sel = pd.DataFrame({"posterior": ["single 0", "all"], "sel_share": [0.3, 0.6]})
    assert answer(_table(), _ranks(), _validation(), _control(), CFG, selection=sel).selection_material
    assert not answer(_table(), _ranks(), _validation(), _control(), CFG, selection=sel.assign(sel_share=0.3)).selection_material
    assert not answer(_table(), _ranks(), _validation(), _control(), CFG, selection=sel.iloc[:0]).selection_material
    scale = pd.DataFrame({"posterior": ["deterministic (MAP)", "all"], "κ min": [float("nan"), 1e-4]})
    assert answer(_table(), _ranks(), _validation(), _control(), CFG, scale=scale).all_kappa_at_floor
    assert not answer(_table(), _ranks(), _validation(), _control(), CFG,
                      scale=scale.assign(**{"κ min": [float("nan"), 1e-3]})).all_kappa_at_floor
    untuned = Config.from_dict({"predictive": {"scale": "none"}})
    assert not answer(_table(), _ranks(), _validation(), _control(), untuned, scale=scale).all_kappa_at_floor


def test_a_missing_interval_column_is_named():
    with pytest.raises(ValueError, match="diff_lower"):
        answer(_table(), _ranks(), _validation(), _control().drop(columns="diff_lower"), CFG)
