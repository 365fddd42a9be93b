"""HTML tables (pandas ``DataFrame._repr_html_``) → pandoc pipe tables.

Header rows are merged column-wise (so the index-name row of a named index and the levels of
MultiIndex columns become one header line), ``colspan`` cells are repeated, ``rowspan`` cells are
left blank below their first row, as pandas displays them.
"""

from __future__ import annotations

from html.parser import HTMLParser


class _TableParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.head: list[list[tuple[str, int, int]]] = []
        self.body: list[list[tuple[str, int, int]]] = []
        self.section = "body"
        self.row: list[tuple[str, int, int]] | None = None
        self.cell: list[str] | None = None
        self.span = (1, 1)
        self.tables = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self.tables += 1
        elif tag == "thead":
            self.section = "head"
        elif tag == "tbody":
            self.section = "body"
        elif tag == "tr":
            self.row = []
        elif tag in ("td", "th") and self.row is not None:
            self.cell = []
            self.span = (int(a.get("colspan") or 1), int(a.get("rowspan") or 1))

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self.cell is not None and self.row is not None:
            self.row.append((" ".join("".join(self.cell).split()), *self.span))
            self.cell = None
        elif tag == "tr" and self.row is not None:
            (self.head if self.section == "head" else self.body).append(self.row)
            self.row = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)


def _grid(rows: list[list[tuple[str, int, int]]]) -> list[list[str]]:
    grid: list[list[str]] = []
    pending: dict[tuple[int, int], str] = {}
    for r, row in enumerate(rows):
        out: list[str] = []
        cells = iter(row)
        c = 0
        while True:
            if (r, c) in pending:
                out.append(pending.pop((r, c)))
                c += 1
                continue
            try:
                text, colspan, rowspan = next(cells)
            except StopIteration:
                break
            for k in range(colspan):
                out.append(text)
                for dr in range(1, rowspan):
                    pending[(r + dr, c + k)] = ""
            c += colspan
        while (r, c) in pending:
            out.append(pending.pop((r, c)))
            c += 1
        grid.append(out)
    return grid


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|")


def html_table_to_pipe(html: str) -> str | None:
    """A pipe table for the single ``<table>`` in ``html``; ``None`` if it is not one simple table."""
    parser = _TableParser()
    parser.feed(html)
    if parser.tables != 1 or not parser.body:
        return None
    head, body = _grid(parser.head), _grid(parser.body)
    width = max(len(r) for r in head + body)
    head = [r + [""] * (width - len(r)) for r in head]
    body = [r + [""] * (width - len(r)) for r in body]
    header = []
    for j in range(width):
        parts: list[str] = []
        for r in head:
            if r[j] and r[j] not in parts:
                parts.append(r[j])
        header.append(" ".join(parts))
    numeric = [all(_is_number(r[j]) for r in body if r[j]) for j in range(width)]
    lines = ["| " + " | ".join(_escape(h) for h in header) + " |"]
    lines.append("|" + "|".join("--:" if n else ":--" for n in numeric) + "|")
    lines += ["| " + " | ".join(_escape(x) for x in r) + " |" for r in body]
    return "\n".join(lines)


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", "").replace("−", "-").replace("%", "").lstrip("<>"))
    except ValueError:
        return False
    return True


def apply_colwidths(md: str, widths: list) -> str:
    """Give the first pipe table of ``md`` the relative column ``widths`` (Quarto's cell option
    ``tbl-colwidths``) by the number of dashes of its separator line, which is how pandoc sizes the
    columns of a pipe table wider than the text; the alignment colons are kept.

    Raises ``ValueError`` when the number of widths differs from the table's number of columns.
    """
    lines = md.split("\n")
    for i in range(1, len(lines)):
        sep = lines[i].strip()
        if lines[i - 1].lstrip().startswith("|") and sep.startswith("|") and set(sep) <= set("|:- "):
            cells = sep.strip("|").split("|")
            if len(cells) != len(widths):
                raise ValueError(f"tbl-colwidths has {len(widths)} widths for a table of {len(cells)} columns")
            total = sum(float(w) for w in widths)
            out = []
            for cell, w in zip(cells, widths):
                n = max(3, round(100 * float(w) / total))
                cell = cell.strip()
                out.append((":" if cell.startswith(":") else "-") + "-" * (n - 2) + (":" if cell.endswith(":") else "-"))
            lines[i] = "|" + "|".join(out) + "|"
            return "\n".join(lines)
    return md
