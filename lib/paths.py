"""Absolute paths of the repository's folders, derived from this file's location, and the book's
chapter files as listed in ``_quarto.yml``."""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FREEZE = ROOT / "_freeze"
CHAPTERS = ROOT / "chapters"
PARAMS = ROOT / "params"
ARTIFACTS = ROOT / "artifacts"
DATA = ROOT / "data"


def book_files(quarto: Mapping[str, Any]) -> list[str]:
    """The files of a parsed ``_quarto.yml``'s ``book.chapters`` and ``book.appendices``, in reading
    order: plain entries, the ``chapters`` of ``part`` entries, and a ``part`` that is itself a file."""
    def entries(items: Any) -> list[str]:
        out: list[str] = []
        for item in items or []:
            if isinstance(item, str):
                out.append(item)
            elif isinstance(item, Mapping):
                if isinstance(item.get("part"), str) and item["part"].endswith((".ipynb", ".qmd", ".md")):
                    out.append(item["part"])
                out.extend(entries(item.get("chapters")))
        return out

    book = quarto.get("book") or {}
    return entries(book.get("chapters")) + entries(book.get("appendices"))
