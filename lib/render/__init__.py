"""Offline renderer of the Quarto book: frozen notebooks → HTML site + PDF, without Quarto.

``python -m lib.render [--profile P] [--out _book]`` reads the chapter list, title and author from
``_quarto.yml`` into the book's model (:mod:`lib.render.book`), converts every executed notebook to pandoc Markdown (:mod:`lib.render.convert`),
numbers chapters, sections, figures, tables and equations and resolves the Quarto cross-references
``@fig-…``/``@tbl-…``/``@sec-…``/``@eq-…`` itself, then writes one HTML page per chapter with a
sidebar table of contents (:mod:`lib.render.html`) and a PDF via pandoc → Typst
(:mod:`lib.render.pdf`); :mod:`lib.render.build` drives the writers. Citations go through pandoc
``--citeproc`` with ``references.bib``, for the HTML and the PDF alike, as Quarto does with
``citeproc: true`` under ``format: typst``.
"""

from lib.render.book import Book, RenderError
from lib.render.build import render_book

__all__ = ["Book", "RenderError", "render_book"]
