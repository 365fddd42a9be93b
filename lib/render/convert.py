"""Executed notebook → pandoc Markdown with Quarto semantics, numbered labels and cross-refs.

Markdown cells pass through with their headings numbered (``## T {#sec-x}`` → ``4.2 T``), callouts
given a title, captioned markdown figures/tables/equations numbered. Code cells honour the Quarto
cell options in leading ``#|`` lines (``label``, ``fig-cap``, ``tbl-cap``, ``tbl-colwidths``, ``fig-alt``, ``echo``, ``warning``,
``output``, ``include``, ``code-fold``); their outputs become Markdown: images are written to files
and embedded as pandoc figures (id from ``label``, caption from ``fig-cap``), HTML tables (pandas)
become pipe tables captioned from ``tbl-cap``, ``text/markdown`` displays are inlined, streams become
code blocks. Cross-references are left as placeholders that :func:`resolve_refs` turns into links
once every chapter is numbered.
"""

from __future__ import annotations

import base64
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lib.render.pandoc import html_to_markdown
from lib.render.tables import apply_colwidths, html_table_to_pipe

REF_KINDS = {"fig": "Figure", "tbl": "Table", "sec": "Section", "eq": "Equation"}
CALLOUTS = {"note": "Note", "tip": "Tip", "warning": "Warning", "important": "Important", "caution": "Caution"}
IMAGE_MIMES = {"image/png": "png", "image/jpeg": "jpg", "image/svg+xml": "svg"}
_REF_ID = r"(?:fig|tbl|sec|eq)-[A-Za-z0-9_-]*[A-Za-z0-9_]"
_BRACKET_REFS = re.compile(rf"\[(-?@{_REF_ID}(?:\s*;\s*-?@{_REF_ID})*)\]")
_BARE_REF = re.compile(rf"(?<![\w@\]])(-?)@({_REF_ID})")
_PLACEHOLDER = re.compile("\ue000([^\ue001|]+)\\|([01])\ue001")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)(?:\s+\{([^{}]*)\})?\s*#*\s*$")
_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})")
_DIV_OPEN = re.compile(r"^:{3,}\s*(\{[^}]*\}|[\w-]+)\s*$")
_DIV_CLOSE = re.compile(r"^:{3,}\s*$")
_MD_FIGURE = re.compile(r"!\[(.*?)\]\(([^)\s]+)\)\{#(fig-[\w-]+)([^}]*)\}")
_MD_TABLE_CAPTION = re.compile(r"^(?:Table)?:\s+(.*?)\s*\{#(tbl-[\w-]+)([^}]*)\}\s*$")
_EQUATION = re.compile(r"\$\$(.+?)\$\$\s*\{#(eq-[\w-]+)\}", re.S)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_OBJECT_REPR = re.compile(r"^<[^<>]* at 0x[0-9a-f]+>$")


@dataclass(frozen=True)
class Label:
    """A cross-reference target: ``kind`` in fig/tbl/sec/eq/chapter, ``number`` like ``"4.2"``."""

    id: str
    kind: str
    number: str
    title: str
    chapter: str


@dataclass
class ChapterDoc:
    """One converted chapter: title, body Markdown (placeholders unresolved) and its labels."""

    name: str
    number: int | None
    title: str
    title_id: str
    markdown: str
    labels: list[Label] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def parse_attrs(attrs: str | None) -> tuple[str | None, list[str], dict[str, str]]:
    """Pandoc attribute string ``#id .cls key="v"`` → (id, classes, key-values)."""
    ident, classes, kv = None, [], {}
    if not attrs:
        return ident, classes, kv
    for m in re.finditer(r'([\w-]+)="([^"]*)"|([\w-]+)=(\S+)|#([\w:.-]+)|\.([\w-]+)|(?<!\S)(-)(?!\S)', attrs):
        if m.group(1):
            kv[m.group(1)] = m.group(2)
        elif m.group(3):
            kv[m.group(3)] = m.group(4)
        elif m.group(5):
            ident = m.group(5)
        elif m.group(6):
            classes.append(m.group(6))
        elif m.group(7):
            classes.append("unnumbered")
    return ident, classes, kv


def format_attrs(ident: str | None, classes: list[str], kv: dict[str, str]) -> str:
    """Inverse of :func:`parse_attrs` (empty string when there is nothing)."""
    parts = ([f"#{ident}"] if ident else []) + [f".{c}" for c in classes]
    parts += [f'{k}="{v}"' for k, v in kv.items()]
    return "{" + " ".join(parts) + "}" if parts else ""


def cell_options(source: str) -> tuple[dict[str, Any], str]:
    """Quarto ``#|`` options at the top of a code cell → (options, code without them)."""
    lines = source.splitlines()
    opt_lines = []
    while lines and lines[0].startswith("#|"):
        opt_lines.append(lines.pop(0)[2:].strip())
    options: dict[str, Any] = {}
    if opt_lines:
        try:
            options = yaml.safe_load("\n".join(opt_lines)) or {}
        except yaml.YAMLError:
            options = {}
    return (options if isinstance(options, dict) else {}), "\n".join(lines).strip("\n")


def fence_for(text: str, char: str = "`") -> str:
    """A code fence longer than any run of ``char`` in ``text``."""
    runs = [len(m) for m in re.findall(f"{re.escape(char)}+", text)]
    return char * max(3, max(runs, default=0) + 1)


def code_block(text: str, cls: str) -> str:
    fence = fence_for(text)
    return f"{fence} {{.{cls}}}\n{text}\n{fence}"


def collapse_cr(text: str) -> str:
    """Terminal rendering of carriage returns (keeps the last state of each progress line)."""
    text = _ANSI.sub("", text)
    return "\n".join(line.split("\r")[-1] for line in text.split("\n"))


def mark_refs(text: str) -> str:
    """Replace Quarto cross-references by placeholders resolved later by :func:`resolve_refs`."""

    def bracket(m: re.Match) -> str:
        refs = [r.strip() for r in m.group(1).split(";")]
        marks = [f"\ue000{r.lstrip('-@')}|{1 if r.startswith('-') else 0}\ue001" for r in refs]
        return marks[0] if len(marks) == 1 else ", ".join(marks[:-1]) + " and " + marks[-1]

    text = _BRACKET_REFS.sub(bracket, text)
    return _BARE_REF.sub(lambda m: f"\ue000{m.group(2)}|{1 if m.group(1) else 0}\ue001", text)


def resolve_refs(
    markdown: str, labels: dict[str, Label], href: Any, warnings: list[str], chapter: str
) -> str:
    """Turn placeholders into ``[Figure 4.2](href)`` links; ``href(label)`` gives the target URL."""

    def sub(m: re.Match) -> str:
        ident, bare = m.group(1), m.group(2) == "1"
        label = labels.get(ident)
        if label is None:
            warnings.append(f"{chapter}: unresolved cross-reference @{ident}")
            return f"**?\\@{ident}**"
        if label.kind == "chapter":
            text = f"Chapter {label.number}" if label.number else label.title
        elif label.number:
            text = label.number if bare else f"{REF_KINDS[label.kind]} {label.number}"
        else:
            text = label.title or REF_KINDS[label.kind]
        if label.kind == "eq" and label.number:
            text = f"({label.number})" if bare else f"Equation ({label.number})"
        return f"[{text}]({href(label)})"

    return _PLACEHOLDER.sub(sub, markdown)


class _Numbering:
    """Per-chapter counters for sections, figures, tables and equations."""

    def __init__(self, name: str, number: int | None):
        self.name, self.chapter = name, number
        self.sections = [0, 0]
        self.counts = {"fig": 0, "tbl": 0, "eq": 0}
        self.labels: list[Label] = []

    def next(self, kind: str, ident: str | None, title: str = "") -> str:
        self.counts[kind] += 1
        number = f"{self.chapter}.{self.counts[kind]}" if self.chapter else str(self.counts[kind])
        if ident:
            self.labels.append(Label(ident, kind, number, title, self.name))
        return number

    def section(self, level: int, ident: str | None, title: str, numbered: bool) -> str:
        number = ""
        if numbered and self.chapter and level in (2, 3):
            if level == 2:
                self.sections = [self.sections[0] + 1, 0]
                number = f"{self.chapter}.{self.sections[0]}"
            else:
                self.sections[1] += 1
                number = f"{self.chapter}.{self.sections[0]}.{self.sections[1]}"
        if ident:
            self.labels.append(Label(ident, "sec", number, title, self.name))
        return number


class Converter:
    """Converts the notebooks of one book for one target (``"html"`` or ``"pdf"``)."""

    def __init__(self, target: str, fig_dir: Path, fig_href: str, echo: bool, code_fold: bool,
                 warning: bool = True):
        self.target = target
        self.warning = warning
        self.fig_dir = fig_dir
        self.fig_href = fig_href.rstrip("/")
        self.echo = echo
        self.code_fold = code_fold

    # -- markdown cells -------------------------------------------------------------------------
    def _markdown(self, text: str, num: _Numbering, doc: ChapterDoc, first_h1: list[bool]) -> str:
        text = _EQUATION.sub(lambda m: self._equation(m, num), text)
        out: list[str] = []
        fence: str | None = None
        div_stack: list[str | None] = []
        for line in text.split("\n"):
            m = _FENCE.match(line)
            if fence:
                out.append(line)
                if m and m.group(2)[0] == fence[0] and len(m.group(2)) >= len(fence):
                    fence = None
                continue
            if m:
                fence = m.group(2)
                out.append(line)
                continue
            m = _DIV_OPEN.match(line)
            if m:
                out.extend(self._div_open(m.group(1), div_stack))
                continue
            if _DIV_CLOSE.match(line) and div_stack:
                div_stack.pop()
                out.append(line)
                continue
            m = _HEADING.match(line)
            if m:
                in_callout = bool(div_stack and div_stack[-1] == "callout")
                out.append(self._heading(m, num, doc, first_h1, in_callout, div_stack))
                continue
            line = _MD_FIGURE.sub(lambda mm: self._md_figure(mm, num), line)
            mt = _MD_TABLE_CAPTION.match(line)
            if mt:
                n = num.next("tbl", mt.group(2), mt.group(1))
                line = f": Table {n}: {mt.group(1)} {{#{mt.group(2)}{mt.group(3)}}}"
            out.append(line)
        return mark_refs("\n".join(out))

    def _div_open(self, spec: str, stack: list[str | None]) -> list[str]:
        ident, classes, kv = parse_attrs(spec if spec.startswith("{") else "." + spec)
        kinds = [c.split("-", 1)[1] for c in classes if c.startswith("callout-")]
        if not kinds:
            stack.append(None)
            return [f"::: {spec}"]
        kind = kinds[0]
        title = kv.pop("title", None)
        stack.append("callout-untitled" if title is None else "callout")
        classes = [c for c in classes if c != "callout"] + ["callout"]
        opening = f"::: {format_attrs(ident, classes, kv)}"
        if title is None:
            # the first heading inside becomes the title; otherwise the default one is inserted
            stack[-1] = "callout"
            return [opening, f"\ue002{CALLOUTS.get(kind, kind.title())}\ue003"]
        return [opening, f"[{title}]{{.callout-title}}", ""]

    def _heading(self, m: re.Match, num: _Numbering, doc: ChapterDoc, first_h1: list[bool],
                 in_callout: bool, stack: list[str | None]) -> str:
        hashes, title, attrs = m.group(1), m.group(2).strip(), m.group(3)
        ident, classes, kv = parse_attrs(attrs)
        if in_callout:
            stack[-1] = "callout-titled"
            return f"\ue004[{title}]{{.callout-title}}\n"
        level = len(hashes)
        if level == 1 and first_h1[0]:
            first_h1[0] = False
            doc.title = title
            doc.title_id = ident or doc.title_id
            if ident:
                num.labels.append(Label(ident, "chapter", str(doc.number or ""), title, doc.name))
            return ""
        numbered = "unnumbered" not in classes
        number = num.section(level, ident, title, numbered)
        classes = [c for c in classes if c != "unnumbered"]
        shown = f"[{number}]{{.header-section-number}} {title}" if number else title
        return f"{hashes} {shown} {format_attrs(ident, classes, kv)}".rstrip()

    def _md_figure(self, m: re.Match, num: _Numbering) -> str:
        caption, src, ident, rest = m.groups()
        n = num.next("fig", ident, caption)
        return f"![Figure {n}: {caption}]({src}){{#{ident}{rest}}}"

    def _equation(self, m: re.Match, num: _Numbering) -> str:
        n = num.next("eq", m.group(2))
        return f"[$${m.group(1).strip()} \\qquad ({n})$$]{{#{m.group(2)} .equation}}"

    # -- code cells -----------------------------------------------------------------------------
    def _code(self, cell: Any, index: int, num: _Numbering, doc: ChapterDoc) -> str:
        options, code = cell_options(cell.source)
        if options.get("include") is False:
            return ""
        label = options.get("label")
        label = label if isinstance(label, str) else None
        parts: list[str] = []
        echo = options.get("echo", self.echo)
        if echo is not False and code.strip() and self.target == "html":
            fold = options.get("code-fold", self.code_fold)
            fence = fence_for(code)
            block = f"{fence} python\n{code}\n{fence}"
            if fold in (True, "true", "show"):
                open_attr = " open" if fold == "show" else ""
                parts.append(
                    f'```{{=html}}\n<details class="code-fold"{open_attr}><summary>Code</summary>\n```\n\n'
                    f"{block}\n\n```{{=html}}\n</details>\n```"
                )
            else:
                parts.append(block)
        elif echo is not False and code.strip():
            parts.append(f"{fence_for(code)} python\n{code}\n{fence_for(code)}")
        if options.get("output") is not False:
            fig_done = tbl_done = False
            warning = options.get("warning", self.warning) is not False
            for k, out in enumerate(cell.get("outputs", [])):
                if not warning and out.get("output_type") == "stream" and out.get("name") == "stderr":
                    continue
                md, kind = self._output(out, f"{doc.name}-cell{index}-{k}", doc)
                if not md:
                    continue
                fig_label = label if label and label.startswith("fig-") else None
                if kind == "image" and not fig_done and (fig_label or "fig-cap" in options):
                    fig_done = True
                    cap = mark_refs(str(options.get("fig-cap", "")))
                    if fig_label:
                        cap = f"Figure {num.next('fig', fig_label, cap)}: {cap}"
                    md = md.replace("![](", f"![{cap}](", 1)
                    attrs = [f"#{fig_label}"] if fig_label else []
                    if "fig-alt" in options:
                        attrs.append('fig-alt="{}"'.format(str(options["fig-alt"]).replace('"', "'")))
                    if self.target == "pdf":
                        attrs.append('width="85%"')
                    md += "{" + " ".join(attrs) + "}" if attrs else ""
                elif kind == "table" and label and label.startswith("tbl-") and not tbl_done:
                    tbl_done = True
                    widths = options.get("tbl-colwidths")
                    if isinstance(widths, list):
                        try:
                            md = apply_colwidths(md, widths)
                        except ValueError as err:
                            doc.warnings.append(f"{doc.name}: cell {index} ({label}): {err}")
                    cap = str(options.get("tbl-cap", ""))
                    n = num.next("tbl", label, cap)
                    md = attach_table_caption(md, f": Table {n}: {mark_refs(cap)} {{#{label}}}")
                elif kind == "image" and self.target == "pdf":
                    md += '{width="85%"}'
                parts.append(md)
            if label and label.startswith(("fig-", "tbl-")) and not (fig_done or tbl_done):
                doc.warnings.append(f"{doc.name}: cell {index} has label {label} but no matching output")
        if not parts:
            return ""
        return "::: {.cell}\n" + "\n\n".join(parts) + "\n:::"

    def _output(self, out: Any, stem: str, doc: ChapterDoc) -> tuple[str, str]:
        kind = out.get("output_type")
        if kind == "stream":
            text = collapse_cr(out.get("text", "")).strip("\n")
            if not text.strip():
                return "", ""
            cls = "cell-output-stderr" if out.get("name") == "stderr" else "cell-output"
            return code_block(text, cls), "text"
        if kind == "error":
            tb = _ANSI.sub("", "\n".join(out.get("traceback", [])))
            return code_block(tb, "cell-output-error"), "text"
        data = out.get("data", {})
        if "text/markdown" in data:
            md = _join(data["text/markdown"])
            return mark_refs(md), ("table" if _first_table(md.split("\n")) else "markdown")
        for mime, ext in IMAGE_MIMES.items():
            if mime in data:
                return self._image(data[mime], mime, ext, stem), "image"
        if "text/html" in data:
            html = re.sub(r"<(style|script)[^>]*>.*?</\1>", "", _join(data["text/html"]), flags=re.S)
            table = html_table_to_pipe(html)
            if table is not None:
                return table, "table"
            return html_to_markdown(html), "markdown"
        if "text/latex" in data:
            return _join(data["text/latex"]), "markdown"
        if "text/plain" in data:
            text = _ANSI.sub("", _join(data["text/plain"])).strip("\n")
            if not text or _OBJECT_REPR.match(text.strip()):
                return "", ""
            return code_block(text, "cell-output"), "text"
        return "", ""

    def _image(self, payload: Any, mime: str, ext: str, stem: str) -> str:
        self.fig_dir.mkdir(parents=True, exist_ok=True)
        path = self.fig_dir / f"{stem}.{ext}"
        if mime == "image/svg+xml":
            path.write_text(_join(payload))
        else:
            path.write_bytes(base64.b64decode(_join(payload)))
        return f"![]({self.fig_href}/{path.name})"

    # -- notebooks ------------------------------------------------------------------------------
    def convert(self, nb: Any, name: str, number: int | None) -> ChapterDoc:
        """Convert one executed notebook (``nbformat`` v4) into a :class:`ChapterDoc`."""
        doc = ChapterDoc(name=name, number=number, title=name, title_id=f"chapter-{name}", markdown="")
        num = _Numbering(name, number)
        first_h1 = [True]
        blocks: list[str] = []
        for index, cell in enumerate(nb.cells):
            if "remove-cell" in cell.get("metadata", {}).get("tags", []):
                continue  # Quarto's remove-cell
            if cell.cell_type == "markdown":
                blocks.append(self._markdown(cell.source, num, doc, first_h1))
            elif cell.cell_type == "code":
                blocks.append(self._code(cell, index, num, doc))
            elif cell.cell_type == "raw":
                meta = _front_matter(cell.source)
                if meta and first_h1[0] and isinstance(meta.get("title"), str):
                    first_h1[0] = False
                    doc.title = meta["title"]
                elif not meta:
                    fmt = cell.get("metadata", {}).get("format", "")
                    target = {"text/html": "html", "text/markdown": "markdown"}.get(fmt)
                    if target == "markdown" or (target == "html" and self.target == "html"):
                        blocks.append(cell.source if target == "markdown" else f"```{{=html}}\n{cell.source}\n```")
        markdown = "\n\n".join(b.strip("\n") for b in blocks if b.strip())
        markdown = _finish_callouts(markdown)
        doc.markdown = markdown
        doc.labels = num.labels
        if doc.title_id and not any(lb.kind == "chapter" for lb in doc.labels):
            doc.labels.append(Label(doc.title_id, "chapter", str(doc.number or ""), doc.title, name))
        return doc


def _join(x: Any) -> str:
    return "".join(x) if isinstance(x, list) else str(x)


def _front_matter(text: str) -> dict | None:
    m = re.match(r"^---\s*\n(.*?)\n---\s*$", text.strip(), re.S)
    if not m:
        return None
    try:
        meta = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return None
    return meta if isinstance(meta, dict) else None


def _first_table(lines: list[str]) -> tuple[int, int] | None:
    """(start, end) line indices of the first pipe or grid table in Markdown lines."""
    for i in range(len(lines) - 1):
        if lines[i].lstrip().startswith(("|", "+")) and re.match(r"^\s*[|+][\s:|+=-]*-[\s:|+=-]*$", lines[i + 1]):
            j = i
            while j < len(lines) and lines[j].lstrip().startswith(("|", "+")):
                j += 1
            return i, j
    return None


def attach_table_caption(md: str, caption: str) -> str:
    """Insert a pandoc table caption line right after the first table of ``md``."""
    lines = md.split("\n")
    span = _first_table(lines)
    if span is None:
        return f"{md}\n\n{caption}"
    _, end = span
    return "\n".join(lines[:end] + ["", caption, ""] + lines[end:]).strip("\n")


def _finish_callouts(markdown: str) -> str:
    """Insert default callout titles where no heading inside the callout provided one."""
    out: list[str] = []
    pending: str | None = None
    for line in markdown.split("\n"):
        m = re.fullmatch("\ue002(.*)\ue003", line)
        if m:
            pending = m.group(1)
            continue
        if pending is not None:
            if line.startswith("\ue004"):
                out.append(line[1:])
                pending = None
                continue
            if line.strip():
                out.extend([f"[{pending}]{{.callout-title}}", ""])
                pending = None
        elif line.startswith("\ue004"):
            line = line[1:]
        out.append(line)
    return "\n".join(out)


def copy_markdown_images(markdown: str, source_root: Path, fig_dir: Path, fig_href: str) -> str:
    """Copy local images referenced from Markdown cells next to the figures and rewrite the paths."""

    def sub(m: re.Match) -> str:
        src = m.group(2)
        path = source_root / src
        if re.match(r"^[a-z]+:", src) or not path.is_file():
            return m.group(0)
        fig_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, fig_dir / path.name)
        return f"![{m.group(1)}]({fig_href.rstrip('/')}/{path.name})"

    return re.sub(r"!\[([^\]]*)\]\(([^)\s]+)\)", sub, markdown)
