"""The book as configured in ``_quarto.yml``: its chapters, their numbering and their labels.

This is the renderer's model; the writers (:mod:`lib.render.html`, :mod:`lib.render.pdf`) read it,
and :func:`lib.render.build.render_book` drives them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat
import yaml

from lib.paths import book_files
from lib.render.convert import ChapterDoc, Converter, Label, copy_markdown_images, parse_attrs
from lib.render.pandoc import PandocError


class RenderError(RuntimeError):
    """The book cannot be rendered; the message names the file and the fix."""


@dataclass(frozen=True)
class Entry:
    """One chapter: its name (file stem), the executed notebook and its HTML page."""

    name: str
    notebook: Path
    page: str


@dataclass
class Book:
    """Title, author, bibliography and chapters read from ``_quarto.yml``."""

    root: Path
    title: str
    author: str
    bibliography: Path | None
    entries: list[Entry]
    code_fold: bool = True
    pdf_echo: bool = True
    warning: bool = True
    profile: str | None = None
    output_file: str | None = None
    csl: Path | None = None
    nocite: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, root: Path, profile: str | None = None) -> "Book":
        """Read ``root/_quarto.yml``; chapters come from ``_freeze/<profile>/`` or the symlinks."""
        quarto = root / "_quarto.yml"
        if not quarto.is_file():
            raise RenderError(f"{quarto} not found")
        cfg = yaml.safe_load(quarto.read_text()) or {}
        book = cfg.get("book") or {}
        files = book_files(cfg)
        if not files:
            raise RenderError(f"{quarto}: book.chapters is empty")
        entries, missing = [], []
        for i, rel in enumerate(files):
            name = Path(rel).stem
            nb = root / "_freeze" / profile / f"{name}.ipynb" if profile else (root / rel)
            if not nb.is_file():
                missing.append(f"{rel} → {nb.resolve() if nb.is_symlink() else nb}")
            page = "index.html" if i == 0 else f"{name}.html"
            entries.append(Entry(name, nb.resolve() if nb.exists() else nb, page))
        if missing:
            prof = profile or cfg.get("book-profile", "<profile>")
            raise RenderError(
                f"executed notebook(s) missing: {'; '.join(missing)}; run `make run PROFILE={prof}` "
                f"(and `python -m lib.runner link --profile {prof}` for the book links)"
            )
        bib = cfg.get("bibliography")
        bib = bib[0] if isinstance(bib, list) else bib
        fmt = cfg.get("format") or {}
        html = fmt.get("html") or {}
        pdf = fmt.get("typst") or fmt.get("pdf") or {}
        output_file = book.get("output-file")
        return cls(
            root=root,
            title=str(book.get("title", "Book")),
            author=_author(book.get("author")),
            bibliography=(root / bib) if bib else None,
            entries=entries,
            code_fold=html.get("code-fold", True) is not False if isinstance(html, dict) else True,
            pdf_echo=pdf.get("echo", True) is not False if isinstance(pdf, dict) else True,
            warning=(cfg.get("execute") or {}).get("warning", True) is not False,
            profile=profile or cfg.get("book-profile"),
            output_file=Path(str(output_file)).stem if output_file else None,
            csl=(root / cfg["csl"]) if cfg.get("csl") else None,
            nocite=re.findall(r"@([\w][\w:.#$%&+?<>~/-]*[\w])", str(cfg.get("nocite") or "")),
        )

    def citeproc_args(self) -> list[str]:
        """pandoc arguments for the citations: ``--citeproc`` with the bibliography and the CSL style."""
        if not (self.bibliography and self.bibliography.is_file()):
            return []
        args = ["--citeproc", f"--bibliography={self.bibliography}"]
        if self.csl is not None:
            if not self.csl.is_file():
                raise RenderError(f"_quarto.yml: csl {self.csl} not found")
            args.append(f"--csl={self.csl}")
        return args

    def slug(self) -> str:
        """Base name of the PDF (``<slug>.pdf``): ``book.output-file`` as Quarto uses it, else the
        slug of the title (Quarto's fallback)."""
        if self.output_file:
            return self.output_file
        return re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-") or "book"

    def convert(self, target: str, fig_dir: Path, fig_href: str) -> list[ChapterDoc]:
        """Convert every chapter for ``target``; numbers the chapters as Quarto does (:func:`quarto_numbered`)."""
        conv = Converter(
            target, fig_dir, fig_href,
            echo=self.pdf_echo if target == "pdf" else True, code_fold=self.code_fold, warning=self.warning,
        )
        docs, number = [], 0
        for entry in self.entries:
            nb = nbformat.read(entry.notebook, as_version=4)
            numbered = quarto_numbered(nb)
            number += numbered
            try:
                doc = conv.convert(nb, entry.name, number if numbered else None)
            except PandocError as err:
                raise RenderError(f"{entry.notebook}: {err}") from None
            doc.markdown = copy_markdown_images(doc.markdown, self.root, fig_dir, fig_href)
            docs.append(doc)
        return docs


def collect_labels(docs: list[ChapterDoc]) -> tuple[dict[str, Label], list[str]]:
    """All labels of the book by id, and warnings for duplicated ids."""
    labels: dict[str, Label] = {}
    warnings = []
    for doc in docs:
        for lb in doc.labels:
            if lb.id in labels and labels[lb.id] != lb:
                warnings.append(f"{doc.name}: duplicate label #{lb.id} (also in {labels[lb.id].chapter})")
            labels.setdefault(lb.id, lb)
    return labels, warnings


def cited_keys(markdowns: list[str], bibliography: Path | None) -> list[str]:
    """Keys of ``bibliography`` cited (``@key``) anywhere in the Markdown, in order of appearance."""
    if bibliography is None or not bibliography.is_file():
        return []
    known = set(re.findall(r"@\w+\s*\{\s*([^,\s]+)\s*,", bibliography.read_text()))
    keys: list[str] = []
    for md in markdowns:
        for key in re.findall(r"(?<![\w@])@([\w][\w:.#$%&+?<>~/-]*[\w])", md):
            if key in known and key not in keys:
                keys.append(key)
    return keys


@dataclass
class Result:
    """What :func:`lib.render.build.render_book` wrote."""

    index: Path
    pdf: Path | None
    pages: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _author(author: Any) -> str:
    if isinstance(author, list):
        return ", ".join(_author(a) for a in author)
    if isinstance(author, dict):
        return str(author.get("name", ""))
    return str(author or "")


_ATX_HEADING = re.compile(r"^#{1,}\s")
_SETEXT_UNDERLINE = re.compile(r"^(?:=+|-+)\s*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_TITLE_ATTRS = re.compile(r"^#{1,}\s(?:(.*)\s)?\{(.*)\}$")
_YAML_OPEN = re.compile(r"^---\s*$")


def quarto_numbered(nb: Any) -> bool:
    """Whether Quarto numbers notebook ``nb`` as a book chapter, by its own rule (quarto-cli 1.10:
    ``fixupFrontMatter`` in src/core/jupyter/jupyter-fixups.ts, then ``isNumberedChapter`` in
    src/project/types/book/book-shared.ts), so that the offline renderer numbers the same chapters:

    - a YAML front-matter cell with a string ``title`` decides: unnumbered only when the title has
      the heading form ``"# T {.unnumbered}"``;
    - otherwise a heading on the first line of the first markdown cell becomes the page title and
      loses its attributes: the chapter is numbered even with ``{.unnumbered}``
      (quarto-dev/quarto-cli#8526);
    - otherwise the notebook's first heading decides: unnumbered with ``{.unnumbered}`` or ``{-}``.
    """
    cells = [c for c in nb.cells if c.cell_type in ("markdown", "raw")]
    front = next((c for c in cells if _leading_yaml(c.source) is not None), None)
    title = _leading_yaml(front.source).get("title") if front is not None else None
    rest = [c for c in cells if c is not front]
    if not title:
        first = next((c for c in rest if c.cell_type == "markdown"), None)
        if first is not None and _opens_with_heading(first.source):
            return True
    if isinstance(title, str):
        return not _unnumbered_heading(title)
    heading = _first_heading("\n".join(c.source for c in rest))
    return heading is None or not _unnumbered_heading(heading)


def _leading_yaml(text: str) -> dict | None:
    """The YAML front matter that opens ``text`` (Quarto's ``partitionYamlFrontMatter``), or None."""
    lines = text.lstrip().split("\n")
    if len(lines) < 3 or not _YAML_OPEN.match(lines[0]) or not lines[1].strip() or _YAML_OPEN.match(lines[1]):
        return None
    end = next((i for i, line in enumerate(lines) if i > 0 and re.match(r"^(?:---|\.\.\.)\s*$", line)), None)
    if end is None:
        return None
    try:
        meta = yaml.safe_load("\n".join(lines[1:end]))
    except yaml.YAMLError:
        return None
    return meta if isinstance(meta, dict) else None


def _opens_with_heading(text: str) -> bool:
    """Whether a markdown cell's first line is a heading (ATX, or setext underlined on its second line)."""
    lines = text.split("\n")
    if _ATX_HEADING.match(lines[0]):
        return True
    return len(lines) > 1 and bool(lines[0].strip()) and bool(_SETEXT_UNDERLINE.match(lines[1]))


def _first_heading(markdown: str) -> str | None:
    """The first ATX heading line of ``markdown`` outside fenced code."""
    fence = ""
    for line in markdown.split("\n"):
        m = _FENCE.match(line)
        if fence:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and not line[m.end():].strip():
                fence = ""
        elif m:
            fence = m.group(1)
        elif _ATX_HEADING.match(line):
            return line
    return None


def _unnumbered_heading(heading: str) -> bool:
    m = _TITLE_ATTRS.match(heading.strip())
    return bool(m) and "unnumbered" in parse_attrs(m.group(2))[1]
