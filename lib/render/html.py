"""HTML site: one page per chapter with a sidebar table of contents, prev/next links, references.

Each page is pandoc's HTML (``--mathml``, ``--citeproc``, ``--toc``) of the chapter's Markdown,
placed into a self-contained page (inline CSS, no network access).
"""

from __future__ import annotations

import html
import re
from pathlib import Path

from lib.render.book import Book, Result, cited_keys, collect_labels
from lib.render.convert import ChapterDoc, Label, resolve_refs
from lib.render.pandoc import pandoc

ASSETS = Path(__file__).parent / "assets"
_SPLIT = "<!--lla-split-->"
REFERENCES_PAGE = "references.html"


def _pandoc_html(
    markdown: str, book: Book, cwd: Path, toc: bool, ref_title: bool = True
) -> tuple[str, str, str, list[str]]:
    """(highlighting CSS, table of contents, body) of ``markdown`` rendered by pandoc."""
    template = ASSETS / "fragment.html"
    args = ["-f", "markdown", "-t", "html5", "--mathml", "--section-divs", f"--template={template}",
            "--wrap=none", "-M", "link-citations=true", "-M", "pagetitle=x"]
    if ref_title:
        args += ["-M", "reference-section-title=References"]
    if toc:
        args += ["--toc", "--toc-depth=3"]
    args += book.citeproc_args()
    text, warnings = pandoc(markdown, args, cwd=str(cwd))
    css, toc_html, body = (text.split(_SPLIT) + ["", ""])[:3]
    return css, toc_html.strip(), body, warnings


def _chapter_link_text(doc: ChapterDoc) -> str:
    num = f'<span class="chapter-number">{doc.number}</span> ' if doc.number else ""
    return f"{num}{html.escape(doc.title)}"


def _sidebar(book: Book, docs: list[ChapterDoc], current: int | None, toc_html: str, pdf_name: str) -> str:
    items = []
    for i, (entry, doc) in enumerate(zip(book.entries, docs)):
        cls = ' class="current"' if i == current else ""
        sub = f'<div class="page-toc">{toc_html}</div>' if i == current and toc_html else ""
        items.append(f'<li{cls}><a href="{entry.page}">{_chapter_link_text(doc)}</a>{sub}</li>')
    cls = ' class="current"' if current is None else ""
    items.append(f'<li{cls}><a href="{REFERENCES_PAGE}">References</a></li>')
    return (
        f'<nav class="sidebar" aria-label="Contents"><a class="book-title" href="index.html">'
        f"{html.escape(book.title)}</a>"
        f'<div class="book-author">{html.escape(book.author)}</div>'
        f'<ol class="chapters">{"".join(items)}</ol>'
        f'<a class="pdf-link" href="{pdf_name}">Download PDF</a></nav>'
    )


def _page(book: Book, title_html: str, sidebar: str, body: str, css: str, pager: str, head_title: str) -> str:
    style = (ASSETS / "style.css").read_text()
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(head_title)}</title>
<style>
{style}
{css}
</style>
</head>
<body>
<div class="layout">
{sidebar}
<main class="content">
<header class="chapter-header">{title_html}</header>
{body}
{pager}
</main>
</div>
</body>
</html>
"""


def _pager(book: Book, docs: list[ChapterDoc], i: int | None) -> str:
    pages = [(e.page, _chapter_link_text(d)) for e, d in zip(book.entries, docs)]
    pages.append((REFERENCES_PAGE, "References"))
    k = len(pages) - 1 if i is None else i
    prev = f'<a class="prev" href="{pages[k - 1][0]}">← {pages[k - 1][1]}</a>' if k > 0 else "<span></span>"
    nxt = f'<a class="next" href="{pages[k + 1][0]}">{pages[k + 1][1]} →</a>' if k + 1 < len(pages) else ""
    return f'<nav class="pager">{prev}{nxt}</nav>'


def _with_nocite(markdown: str, keys: list[str]) -> str:
    """``markdown`` with a metadata block citing ``keys`` without text (``nocite``)."""
    if not keys:
        return markdown
    return "---\nnocite: |\n  " + ", ".join(f"@{k}" for k in keys) + "\n---\n\n" + markdown


def _drop_entries(body: str, keys: list[str]) -> str:
    """``body`` without the bibliography entries of ``keys``: ``nocite`` keys only make citeproc
    disambiguate (2021a/2021b) the same way on every page; a page lists what it cites."""
    for key in keys:
        body = re.sub(rf'<div id="ref-{re.escape(key)}" class="csl-entry"[^>]*>.*?</div>\n?', "", body, flags=re.S)
    return body


def write_site(book: Book, out: Path) -> Result:
    """Write ``out/index.html``, one page per chapter and ``references.html``."""
    docs = book.convert("html", out / "figures", "figures")
    labels, warnings = collect_labels(docs)
    warnings += [w for doc in docs for w in doc.warnings]
    pages = {e.name: e.page for e in book.entries}
    pdf_name = f"{book.slug()}.pdf"
    written = []
    markdowns = []
    for i, (entry, doc) in enumerate(zip(book.entries, docs)):

        def href(label: Label, here: str = entry.name) -> str:
            page = "" if label.chapter == here else pages[label.chapter]
            return page if label.kind == "chapter" else f"{page}#{label.id}"

        md = resolve_refs(doc.markdown, labels, href, warnings, doc.name)
        markdowns.append(md)
        cited = cited_keys([md], book.bibliography)
        extra = [k for k in book.nocite if k not in cited] if cited else []
        css, toc_html, body, pw = _pandoc_html(_with_nocite(md, extra), book, out, toc=True)
        body = _drop_entries(body, extra)
        warnings += [f"{doc.name}: pandoc: {w}" for w in pw]
        if i == 0:
            title_html = (f'<h1 class="title">{html.escape(book.title)}</h1>'
                          f'<p class="author">{html.escape(book.author)}</p>'
                          + (f"<h2 class=\"subtitle\">{html.escape(doc.title)}</h2>"
                             if doc.title != doc.name else ""))
            head = book.title
        else:
            title_html = f'<h1 id="{doc.title_id}" class="title">{_chapter_link_text(doc)}</h1>'
            head = f"{doc.title} – {book.title}"
        page = _page(book, title_html, _sidebar(book, docs, i, toc_html, pdf_name), body, css,
                     _pager(book, docs, i), head)
        (out / entry.page).write_text(page)
        written.append(out / entry.page)
    keys = cited_keys(markdowns, book.bibliography)
    refs_md = "---\nnocite: |\n  " + (", ".join(f"@{k}" for k in keys) or "") + "\n---\n\n::: {#refs}\n:::\n"
    css, _, body, _ = _pandoc_html(refs_md, book, out, toc=False, ref_title=False)
    page = _page(book, '<h1 class="title">References</h1>', _sidebar(book, docs, None, "", pdf_name),
                 body, css, _pager(book, docs, None), f"References – {book.title}")
    (out / REFERENCES_PAGE).write_text(page)
    written.append(out / REFERENCES_PAGE)
    return Result(index=out / "index.html", pdf=None, pages=written, warnings=warnings)
