"""Run the pandoc binary shipped with ``pypandoc-binary`` (or ``pandoc`` on PATH)."""

from __future__ import annotations

import shutil
import subprocess
from functools import lru_cache


class PandocError(RuntimeError):
    """pandoc exited with an error; the message holds its stderr."""


@lru_cache(maxsize=1)
def pandoc_path() -> str:
    """Path of the pandoc executable (pypandoc-binary's first, then PATH)."""
    try:
        import pypandoc

        return pypandoc.get_pandoc_path()
    except (ImportError, OSError):
        found = shutil.which("pandoc")
        if not found:
            raise PandocError("pandoc not found; install pypandoc-binary (pip install -r requirements.txt)") from None
        return found


def pandoc(text: str, args: list[str], cwd: str | None = None) -> tuple[str, list[str]]:
    """Convert ``text`` (stdin) with ``pandoc *args``; returns (stdout, warning lines)."""
    proc = subprocess.run(
        [pandoc_path(), *args], input=text, capture_output=True, text=True, cwd=cwd, check=False
    )
    if proc.returncode != 0:
        raise PandocError(f"pandoc {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    warnings = [line for line in proc.stderr.splitlines() if line.strip()]
    return proc.stdout, warnings


def html_to_markdown(html: str) -> str:
    """Pandoc Markdown of an HTML fragment (e.g. a pandas DataFrame) with pipe tables."""
    out, _ = pandoc(
        html,
        ["-f", "html", "-t", "markdown-simple_tables-multiline_tables-grid_tables-raw_html-native_divs-native_spans",
         "--wrap=none"],
    )
    return out.strip()
