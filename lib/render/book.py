"""The book as configured in ``_quarto.yml`` and the top-level :func:`render_book`."""

from __future__ import annotations

import re
import shutil
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
        """Convert every chapter for ``target``; numbers chapters (the first entry is unnumbered)."""
        conv = Converter(
            target, fig_dir, fig_href,
            echo=self.pdf_echo if target == "pdf" else True, code_fold=self.code_fold, warning=self.warning,
        )
        docs, number = [], 0
        for i, entry in enumerate(self.entries):
            nb = nbformat.read(entry.notebook, as_version=4)
            numbered = i > 0 and not _unnumbered(nb)
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
    """What :func:`render_book` wrote."""

    index: Path
    pdf: Path | None
    pages: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def render_book(root: Path, out: Path | None = None, profile: str | None = None, pdf: bool = True) -> Result:
    """Render the HTML site (and the PDF) of the book under ``root`` into ``out`` (default ``_book``)."""
    from lib.render.html import write_site
    from lib.render.pdf import write_pdf

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


def _author(author: Any) -> str:
    if isinstance(author, list):
        return ", ".join(_author(a) for a in author)
    if isinstance(author, dict):
        return str(author.get("name", ""))
    return str(author or "")


def _unnumbered(nb: Any) -> bool:
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        for line in cell.source.splitlines():
            m = re.match(r"^#\s+.*?\{([^{}]*)\}\s*$", line)
            if line.startswith("# "):
                return bool(m) and "unnumbered" in parse_attrs(m.group(1))[1]
    return False
