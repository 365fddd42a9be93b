"""lib.results: where the chapters' result tables are stored."""

from __future__ import annotations

import pandas as pd
import pytest

from lib.paths import FREEZE
from lib.results import load_table, results_dir, save_table


def test_saved_tables_go_to_lla_results_when_set(tmp_path, monkeypatch):
    monkeypatch.delenv("LLA_RESULTS", raising=False)
    assert results_dir("smoke") == FREEZE / "smoke" / "results"
    monkeypatch.setenv("LLA_RESULTS", str(tmp_path))
    path = save_table(pd.DataFrame({"a": [1, 2]}), "smoke", "probe")
    assert path == tmp_path / "smoke" / "probe.csv" and list(load_table("smoke", "probe").a) == [1, 2]


def test_a_missing_table_names_the_run_that_saves_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LLA_RESULTS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="make run PROFILE=smoke"):
        load_table("smoke", "nothing")
