"""lib.corruption_names: the names config checks are exactly the corruptions lib.corruptions registers."""

import pytest

from lib.config import Config, ParamsError
from lib.corruption_names import CORRUPTION_NAMES, SEVERITIES
from lib.corruptions import CORRUPTIONS


def test_names_are_the_registered_corruptions_in_order():
    assert tuple(CORRUPTIONS) == CORRUPTION_NAMES
    assert all(len(c.constants) == len(SEVERITIES) for c in CORRUPTIONS.values())


def test_config_checks_the_shift_section_against_them():
    ok = Config.from_dict({"shift": {"corruptions": ["fog", "saturate"], "severities": [1, 5]}})
    assert ok.shift.corruptions == ("fog", "saturate")
    with pytest.raises(ParamsError, match="unknown names \\['frost'\\]"):
        Config.from_dict({"shift": {"corruptions": ["fog", "frost"]}})
    with pytest.raises(ParamsError, match="severities must be a non-empty list of 1..5"):
        Config.from_dict({"shift": {"severities": [0, 3]}})
