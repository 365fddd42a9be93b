"""lib.baselines.study: which Laplace posteriors the baselines, shift and deployment chapters report
(validation choices over the priced block choices), on hand-made tables."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd

from lib.baselines.study import chosen_posteriors


def _study(val_delta: dict[str, float]) -> SimpleNamespace:
    names = list(val_delta)
    kinds = ["all" if n == "all" else n.split()[0] for n in names]
    blocks = [int(n.split()[1]) if n.startswith("single") else -1 for n in names]
    validation = pd.DataFrame({"posterior": names, "kind": kinds, "block": blocks, "val_delta": list(val_delta.values())})
    return SimpleNamespace(attribution=SimpleNamespace(table=pd.DataFrame({"posterior": names})), validation=validation)


def _latency(costs: dict[str, float]) -> pd.DataFrame:
    return pd.DataFrame({"posterior": ["deterministic", *costs], "extra_ms": [0.0, *costs.values()]})


def test_all_blocks_the_chosen_set_and_the_chosen_block():
    study = _study({"all": 0.010, "single 0": 0.002, "single 1": 0.009, "last 2": 0.0085})
    lat = _latency({"single 0": 1.0, "single 1": 2.0, "last 2": 1.5, "all": 4.0})
    # the cheapest with ≥ 80% of the all-block validation gain is last 2 (1.5 ms), the best block is 1
    assert chosen_posteriors(study, lat) == {"all blocks": "all",
                                             "validation-chosen set (last 2 blocks)": "last 2",
                                             "validation-chosen block (block 1 only)": "single 1"}


def test_one_row_when_the_chosen_set_is_the_chosen_block_and_none_without_a_gain():
    study = _study({"all": 0.010, "single 0": 0.002, "single 1": 0.009, "last 2": 0.0085})
    lat = _latency({"single 0": 1.0, "single 1": 1.2, "last 2": 1.5, "all": 4.0})
    assert chosen_posteriors(study, lat) == {"all blocks": "all",
                                             "validation-chosen set and block (block 1 only)": "single 1"}
    gainless = _study({"all": -0.001, "single 0": 0.002, "single 1": -0.009, "last 2": 0.0})
    assert chosen_posteriors(gainless, lat) == {"all blocks": "all", "validation-chosen block (block 0 only)": "single 0"}
