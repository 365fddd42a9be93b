"""PDF of the whole book via pandoc → Typst → ``typst.compile``.

All chapters are concatenated into one Markdown document (chapter titles are level-1 headings,
each starting a page), followed by the bibliography; ``assets/book.typ`` adds a title page and the
table of contents, and ``assets/callout.lua`` draws callouts as shaded boxes.
"""

from __future__ import annotations

import shutil
from datetime import date
from pathlib import Path

import typst

from lib.render.book import Book, collect_labels
from lib.render.convert import Label, resolve_refs
from lib.render.pandoc import PandocError, pandoc

ASSETS = Path(__file__).parent / "assets"


def book_markdown(book: Book, work: Path) -> tuple[str, list[str]]:
    """The whole book as one pandoc Markdown document (figures written under ``work/figures``)."""
    docs = book.convert("pdf", work / "figures", "figures")
    labels, warnings = collect_labels(docs)

    def href(label: Label) -> str:
        return f"#{label.id}"

    parts = []
    for doc in docs:
        number = f"[{doc.number}]{{.header-section-number}} " if doc.number else ""
        parts.append(f"# {number}{doc.title} {{#{doc.title_id}}}")
        parts.append(resolve_refs(doc.markdown, labels, href, warnings, doc.name))
    parts.append("# References {#references}\n\n::: {#refs}\n:::")
    return "\n\n".join(parts) + "\n", warnings


def write_pdf(book: Book, out: Path, work: Path) -> Path:
    """Write ``out/<title-slug>.pdf``; intermediate files go to ``work`` (``_render/``)."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    markdown, _ = book_markdown(book, work)
    args = ["-f", "markdown", "-t", "typst", "--standalone", f"--template={ASSETS / 'book.typ'}",
            f"--lua-filter={ASSETS / 'callout.lua'}", "--wrap=none",
            "-M", f"title={book.title}", "-M", f"author={book.author}",
            "-M", f"date={date.today().isoformat()}", "-M", "link-citations=true"]
    if book.profile:
        args += ["-M", f"profile={book.profile}"]
    if book.bibliography and book.bibliography.is_file():
        args += [*book.citeproc_args(), "-M", "suppress-bibliography=false"]
    (work / "book.md").write_text(markdown)
    source, _ = pandoc(markdown, args, cwd=str(work))
    typ = work / "book.typ"
    typ.write_text(source)
    pdf = out / f"{book.slug()}.pdf"
    try:
        typst.compile(str(typ), output=str(pdf), root=str(work))
    except Exception as err:  # typst raises its own error type with the compiler's diagnostics
        raise PandocError(f"typst could not compile {typ}: {err}") from None
    return pdf
