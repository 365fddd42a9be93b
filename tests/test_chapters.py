"""The chapter sources read as a finished report: every figure and table is cited in the text."""

from __future__ import annotations

import re

import nbformat

from lib.paths import CHAPTERS, ROOT


def test_every_figure_and_table_is_referenced_in_the_text():
    """Every ``#| label: fig-…/tbl-…`` of a chapter is cited as ``@label`` in some chapter's prose
    (markdown cells, or the sentences lib/ generates for the book)."""
    labels, refs = set(), set()
    for path in sorted(CHAPTERS.glob("*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            labels.update(re.findall(r"#\| label: ((?:fig|tbl)-[\w-]+)", cell.source))
            if cell.cell_type == "markdown":
                refs.update(re.findall(r"@((?:fig|tbl)-[\w-]+)", cell.source))
    for path in (ROOT / "lib").glob("*.py"):
        refs.update(re.findall(r"@((?:fig|tbl)-[\w-]+)", path.read_text()))
    assert labels, "no labelled figures or tables found"
    assert sorted(labels - refs) == [], "label these in the text with @label"


def test_cell_options_are_valid_yaml():
    """Quarto reads the ``#|`` lines of a cell as YAML: a caption with an invalid escape (``"$\\kappa$"``
    with one backslash inside double quotes) loses its figure or table, and its label goes unresolved."""
    import yaml

    bad = []
    for path in sorted(CHAPTERS.glob("*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            options = "\n".join(line[3:] for line in cell.source.splitlines() if line.startswith("#| "))
            if cell.cell_type != "code" or not options:
                continue
            try:
                parsed = yaml.safe_load(options)
            except yaml.YAMLError as err:
                bad.append(f"{path.name}: {err}".splitlines()[0])
                continue
            if not isinstance(parsed, dict):
                bad.append(f"{path.name}: cell options are not a mapping: {options[:80]!r}")
    assert bad == []
