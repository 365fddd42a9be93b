"""lib.names: the reader's name of every kind of posterior key."""

from lib.names import display_name


def test_display_name_words_every_posterior_key():
    assert [display_name(n) for n in ["single 11", "first 2", "last 7", "last 1", "all", "all but 3", "none",
                                      "deterministic", "temperature scaling"]] == [
        "block 11 only", "first 2 blocks", "last 7 blocks", "last 1 block", "all blocks", "all blocks but 3",
        "deterministic (MAP)", "deterministic (MAP)", "temperature scaling"]
