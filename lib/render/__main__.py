"""``python -m lib.render [--profile P] [--out DIR]``: render the book offline (HTML + PDF)."""

import argparse
import sys
from pathlib import Path

from lib.paths import ROOT
from lib.render.book import RenderError
from lib.render.build import render_book


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.render", description=__doc__)
    parser.add_argument(
        "--profile",
        help="render _freeze/<profile>/ (default: the notebooks the book symlinks point to)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "_book", help="output folder (default _book)")
    parser.add_argument("--no-pdf", action="store_true", help="write the HTML site only")
    args = parser.parse_args(argv)
    try:
        result = render_book(ROOT, out=args.out, profile=args.profile or None, pdf=not args.no_pdf)
    except RenderError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {result.index}" + (f" and {result.pdf}" if result.pdf else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
