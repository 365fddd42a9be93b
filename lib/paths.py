"""Absolute paths of the repository's folders, derived from this file's location."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FREEZE = ROOT / "_freeze"
CHAPTERS = ROOT / "chapters"
PARAMS = ROOT / "params"
ARTIFACTS = ROOT / "artifacts"
DATA = ROOT / "data"
