"""lib.formatting: how the book writes its numbers."""

from __future__ import annotations

import pytest

from lib.formatting import blocks_text, bracket, format_number, interval_text, posterior_text, pp_interval, words
from lib.interval import Interval


def test_format_number_one_rule_per_quantity():
    assert format_number(0.8512, "delta_pp") == "+0.85" and format_number(-0.061, "delta_pp") == "−0.06"
    assert format_number(0.0315, "p") == "0.032" and format_number(0.06, "p") == "0.060"
    assert format_number(0.0001, "p") == "<0.001"
    assert format_number(8.0384, "seconds") == "8.0" and format_number(2992.189, "rate") == "2,992"
    assert format_number(0.063095, "kappa") == "0.0631" and format_number(float("nan"), "kappa") == "–"
    assert format_number(0.47055, "metric") == "0.4706" and format_number(8.4e-07, "tolerance") == "8.4e−07"
    with pytest.raises(ValueError, match="no display rule"):
        format_number(1.0, "furlongs")


def test_interval_and_block_formatting():
    assert pp_interval(Interval(0.0123, -0.004, 0.02, 0.05)) == "+1.23 [−0.40, +2.00]"
    assert [blocks_text(b) for b in ([], [3], [4, 1], [2, 0, 1], [0, 2, 5])] == [
        "no block", "block 3", "blocks 1 and 4", "blocks 0–2", "blocks 0, 2 and 5"]
    assert [words(w) for w in ([], ["a"], ["a", "b"], ["a", "b", "c"])] == ["", "a", "a and b", "a, b and c"]


def test_bracket_and_interval_text_keep_the_units_they_are_given():
    assert bracket(0.5, -0.25, 1.0, 2) == "+0.50 [−0.25, +1.00]"
    assert interval_text(Interval(1.23, 0.8, 1.7, 0.05)) == "+1.23 [+0.80, +1.70] pp"
    assert interval_text(Interval(-0.333, -1.0, 0.5, 0.05), unit="", digits=1) == "−0.3 [−1.0, +0.5]"


def test_posterior_text():
    assert [posterior_text(n) for n in ("all", "single 3", "last 2")] == ["the all-block posterior", "block 3 only",
                                                                          "last 2 blocks"]


def test_severities_text_groups_the_severities_of_each_method():
    from lib.formatting import severities_text

    pairs = [("LoRA ensemble, M = 3", 3), ("Laplace, all blocks", 5), ("LoRA ensemble, M = 3", 1),
             ("LoRA ensemble, M = 3", 5), ("LoRA ensemble, M = 3", 5)]
    assert severities_text(pairs) == ("*LoRA ensemble, M = 3* at severities 1, 3 and 5; "
                                      "*Laplace, all blocks* at severity 5")
    assert severities_text([]) == ""
