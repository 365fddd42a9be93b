"""The top-level :func:`render_book`: the book's model (:mod:`lib.render.book`) through its writers."""

from __future__ import annotations

import shutil
from pathlib import Path

from lib.render.book import Book, RenderError, Result
from lib.render.html import write_site
from lib.render.pandoc import PandocError
from lib.render.pdf import write_pdf


def render_book(root: Path, out: Path | None = None, profile: str | None = None, pdf: bool = True) -> Result:
    """Render the HTML site (and the PDF) of the book under ``root`` into ``out`` (default ``_book``)."""
    root = Path(root)
    out = Path(out) if out else root / "_book"
    book = Book.load(root, profile)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    work = root / "_render"
    result = write_site(book, out)
    if pdf:
        try:
            result.pdf = write_pdf(book, out, work)
        except PandocError as err:
            raise RenderError(str(err)) from None
    return result
