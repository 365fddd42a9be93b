"""Execute the book's chapters with papermill and freeze their outputs with a provenance record.

``python -m lib.runner run --profile P [--chapter C]`` executes ``chapters/<C>.ipynb`` for every
chapter listed in ``_quarto.yml`` (``index`` last, because it summarises the others) with the
injected ``profile`` and validated ``params``, writes ``_freeze/<P>/<C>.ipynb`` and the record
``_freeze/<P>/<C>.json`` and appends a "Provenance" markdown cell to the executed notebook.

``python -m lib.runner run --profile P --set stats.n_bins=20 --set seeds=[0,1]`` asks "what if":
the overrides are set into ``params/<P>.yml`` and validated with it (:func:`lib.config.load_params`),
recorded in the provenance, and the chapters are written to the scratch folder
``_freeze/<P>+<slug>/`` (:func:`run_name`; git-ignored), never over the committed ``_freeze/<P>/``.
Artifact stages are keyed by the validated parameters, so nothing computed under other values is
reused. ``make book BOOK_PROFILE=<P>+<slug>`` renders it.

``python -m lib.runner link [--profile P]`` (re)creates the committed symlinks ``index.ipynb`` and
``book/<C>.ipynb`` that Quarto renders, pointing into ``_freeze/<P>/``, and records ``P`` as
``book-profile`` in ``_quarto.yml``. ``run`` never touches the links.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nbformat
import yaml

from lib import paths
from lib.codehash import combined_sha256, module_hashes, notebook_modules
from lib.provenance import canonical_json, environment, notebook_sha256, params_sha256, sha256_text

INDEX = "index"
SCRATCH = "+"
"""Separates a profile from the slug of its overrides in a scratch run's folder name (:func:`run_name`)."""
INJECTED = "injected-parameters"
"""papermill's tag of the cell it inserts after the ``parameters`` cell (the run's ``profile`` and ``params``)."""
REMOVE = "remove-cell"
"""The cell tag that both Quarto and the offline renderer honour by leaving the cell out of the book."""


class RunnerError(RuntimeError):
    """A chapter is missing, misconfigured or failed; the message says which and what to do."""


@dataclass(frozen=True)
class Layout:
    """Where the book lives; :meth:`from_root` gives the repository layout under ``root``."""

    root: Path
    chapters: Path
    freeze: Path
    params: Path
    quarto: Path
    failed: Path

    @classmethod
    def from_root(cls, root: Path) -> "Layout":
        root = Path(root)
        return cls(
            root=root,
            chapters=root / "chapters",
            freeze=root / "_freeze",
            params=root / "params",
            quarto=root / "_quarto.yml",
            failed=root / "_failed",
        )


REPO = Layout.from_root(paths.ROOT)
KERNEL = "python3"
"""The Jupyter kernel papermill executes the chapters with (the project's environment)."""


def read_quarto(layout: Layout = REPO) -> dict[str, Any]:
    """The parsed ``_quarto.yml``."""
    if not layout.quarto.is_file():
        raise RunnerError(f"{layout.quarto} not found; the chapter list is read from it")
    return yaml.safe_load(layout.quarto.read_text()) or {}


def book_entries(layout: Layout = REPO) -> list[str]:
    """The book's chapter files in reading order, as written in ``_quarto.yml`` (``book.chapters``)."""
    entries = paths.book_files(read_quarto(layout))
    if not entries:
        raise RunnerError(f"{layout.quarto}: book.chapters is empty; list the chapter notebooks there")
    return entries


def book_chapters(layout: Layout = REPO) -> list[str]:
    """Chapter names (file stems) in reading order, e.g. ``["index", "01-introduction", ...]``."""
    return [Path(e).stem for e in book_entries(layout)]


def execution_order(chapters: list[str]) -> list[str]:
    """Reading order with ``index`` moved last (it summarises the other chapters)."""
    return [c for c in chapters if c != INDEX] + [c for c in chapters if c == INDEX]


def book_profile(layout: Layout = REPO) -> str:
    """The ``book-profile`` key of ``_quarto.yml`` (the profile the committed links point to)."""
    profile = read_quarto(layout).get("book-profile")
    if not isinstance(profile, str) or not profile:
        raise RunnerError(f"{layout.quarto}: set a top-level 'book-profile: <profile>' key")
    return profile


def override_slug(overrides: Sequence[tuple[str, Any]]) -> str:
    """Folder-name slug of ``--set`` overrides: each ``key-value`` (value as canonical JSON, reduced
    to ``[A-Za-z0-9._-]``) joined by ``+``, then 8 hex characters of the SHA-256 of the effective
    overrides (last value per key), so that different overrides never share a folder.
    ``[("stats.n_bins", 20), ("seeds", [0, 1])]`` → ``stats.n_bins-20+seeds-0-1+<hash>``."""
    if not overrides:
        raise ValueError("override_slug needs at least one override")
    effective = dict(overrides)
    parts = [f"{k}-" + (re.sub(r"[^A-Za-z0-9._-]+", "-", canonical_json(v, k)).strip("-") or "x")
             for k, v in effective.items()]
    readable = SCRATCH.join(parts)[:60].rstrip(SCRATCH + "-")
    return f"{readable}{SCRATCH}{sha256_text(canonical_json(effective, 'overrides'))[:8]}"


def run_name(profile: str, overrides: Sequence[tuple[str, Any]] = ()) -> str:
    """The folder under ``_freeze/`` (and the ``profile`` injected into the chapters) of a run:
    the profile itself, or ``<profile>+<slug>`` (:func:`override_slug`) with overrides."""
    return f"{profile}{SCRATCH}{override_slug(overrides)}" if overrides else profile


def is_scratch(name: str) -> bool:
    """Whether ``_freeze/<name>/`` holds a run with overrides (git-ignored, never a committed profile)."""
    return SCRATCH in name


def _params_cell_check(nb: nbformat.NotebookNode, src: Path) -> None:
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            return
    raise RunnerError(
        f"{src}: no cell tagged 'parameters'; add a code cell with `profile = \"smoke\"` and "
        "`params = {}` and tag it 'parameters'"
    )


def _hide_injected_parameters(nb: nbformat.NotebookNode) -> None:
    """Tag papermill's injected cell :data:`REMOVE`: it holds the whole params dict, which the
    provenance record and table report; papermill tags it :data:`INJECTED` only, which neither
    renderer knows (the chapter's own ``parameters`` cell carries :data:`REMOVE` in the source)."""
    for cell in nb.cells:
        tags = cell.get("metadata", {}).get("tags", [])
        if INJECTED in tags and REMOVE not in tags:
            cell.metadata["tags"] = [*tags, REMOVE]


def _provenance_cell(record: Mapping[str, Any], params_file: str) -> nbformat.NotebookNode:
    seeds = record.get("seeds")
    sha = record["git_sha"] or "none (no commit)"
    if record["git_dirty"]:
        sha += " (uncommitted changes)"
    overrides = record.get("overrides") or {}
    rows = [
        ("Profile", f"`{record['profile']}`"),
        ("Params file", f"`{params_file}`"),
        *([("Overrides", ", ".join(f"`{k}={canonical_json(v, k)}`" for k, v in overrides.items()))] if overrides else []),
        ("Params SHA-256", f"`{record['params_sha256'][:16]}`"),
        ("Seeds", ", ".join(map(str, seeds)) if seeds else "—"),
        ("Git commit", f"`{sha}`"),
        ("Library", f"{len(record['lib_modules'])} modules of `lib/`, SHA-256 `{combined_sha256(record['lib_modules'])[:16]}`"),
        ("Device", record["device"]),
        ("torch / timm / peft", f"{record['torch']} / {record['timm']} / {record['peft']}"),
        ("Executed", record["started_at"]),
        ("Wall time", f"{record['wall_time_s']:.1f} s"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    text = (
        "## Provenance {.unnumbered .unlisted}\n\n"
        f"| Item | Value |\n|:--|:--|\n{table}\n"
    )
    cell = nbformat.v4.new_markdown_cell(text)
    cell.metadata["tags"] = ["provenance"]
    return cell


def _failure_message(err: Exception, chapter: str, profile: str, kept: Path) -> str:
    """Name the failing cell by its index in the source notebook and its first line."""
    where = "a cell"
    try:
        nb = nbformat.read(kept, as_version=4)
        added = {INJECTED, "papermill-error-cell-tag"}
        source_cells = [c for c in nb.cells if not added & set(c.get("metadata", {}).get("tags", []))]
        for i, cell in enumerate(source_cells):
            if any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
                first = (cell.source.strip().splitlines() or [""])[0][:80]
                where = f"cell {i} (`{first}`)"
                break
    except (OSError, ValueError):
        pass
    detail = f"{getattr(err, 'ename', type(err).__name__)}: {getattr(err, 'evalue', err)}"
    return (
        f"chapter {chapter} (profile {profile}) failed in {where} of chapters/{chapter}.ipynb: "
        f"{detail} — the executed notebook with the traceback is {kept}"
    )


def run_chapter(
    chapter: str,
    profile: str,
    params: Mapping[str, Any],
    params_file: Path,
    layout: Layout = REPO,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Execute one chapter; write ``_freeze/<profile>/<chapter>.ipynb`` and ``.json``; return the record.

    ``profile`` is the run's name (:func:`run_name`); ``overrides`` (key → value), recorded as
    given, are already applied to ``params``."""
    import papermill as pm

    src = layout.chapters / f"{chapter}.ipynb"
    if not src.is_file():
        raise RunnerError(f"chapter {chapter}: source notebook {src} not found")
    _params_cell_check(nbformat.read(src, as_version=4), src)
    out_dir = layout.freeze / profile
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment(layout.root)
    modules = module_hashes(notebook_modules(src))  # the lib that executes the chapter
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"lla-{chapter}-") as tmp:
        tmp_out = Path(tmp) / f"{chapter}.ipynb"
        try:
            pm.execute_notebook(
                str(src),
                str(tmp_out),
                parameters={"profile": profile, "params": dict(params)},
                kernel_name=KERNEL,
                cwd=str(layout.root),
                log_output=True,
                progress_bar=True,
            )
        except Exception as err:
            kept = layout.failed / profile / f"{chapter}.ipynb"
            kept.parent.mkdir(parents=True, exist_ok=True)
            if tmp_out.is_file():
                shutil.copyfile(tmp_out, kept)
            raise RunnerError(_failure_message(err, chapter, profile, kept)) from err
        wall = time.perf_counter() - t0
        versions = env["versions"]
        record = {
            "chapter": chapter,
            "profile": profile,
            "params_file": params_file.relative_to(layout.root).as_posix()
            if params_file.is_relative_to(layout.root)
            else str(params_file),
            "params": dict(params),
            "overrides": dict(overrides or {}),
            "params_sha256": params_sha256(params),
            "source_sha256": notebook_sha256(src),
            "lib_modules": modules,
            "git_sha": env["git_sha"],
            "git_dirty": env["git_dirty"],
            "device": env["device"],
            "python": versions["python"],
            "torch": versions["torch_build"] or versions["torch"],
            "timm": versions["timm"],
            "peft": versions["peft"],
            "laplace_torch": versions["laplace-torch"],
            "seeds": list(params["seeds"]) if "seeds" in params else None,
            "started_at": started.isoformat(timespec="seconds"),
            "wall_time_s": round(wall, 1),
        }
        nb = nbformat.read(tmp_out, as_version=4)
        _hide_injected_parameters(nb)
        nb.cells.append(_provenance_cell(record, record["params_file"]))
        nbformat.write(nb, out_dir / f"{chapter}.ipynb")
    (out_dir / f"{chapter}.json").write_text(json.dumps(record, indent=1) + "\n")
    (layout.failed / profile / f"{chapter}.ipynb").unlink(missing_ok=True)
    return record


def _default_loader(path: Path, overrides: Sequence[tuple[str, Any]] = ()) -> dict[str, Any]:
    from lib.config import ParamsError, load_params

    try:
        return load_params(path, overrides=overrides)
    except ParamsError as err:
        raise RunnerError(str(err)) from None


def run(
    profile: str,
    chapter: str | None = None,
    layout: Layout = REPO,
    loader: Callable[[Path, Sequence[tuple[str, Any]]], dict[str, Any]] | None = None,
    overrides: Sequence[tuple[str, Any]] = (),
) -> list[dict[str, Any]]:
    """Execute every chapter of ``_quarto.yml`` (or only ``chapter``) for ``profile``, in order.

    With ``overrides`` (``(dotted key, value)`` pairs, :func:`lib.config.parse_override`) the
    chapters run on the params file with those values set and validated, into the scratch folder
    ``_freeze/<run_name(profile, overrides)>/``. All sources are checked before anything runs;
    the first failing chapter stops the run.
    """
    if is_scratch(profile):
        raise RunnerError(f"profile {profile!r}: '{SCRATCH}' is reserved for the folders of runs with --set "
                          "overrides; rename params/<profile>.yml")
    params_file = layout.params / f"{profile}.yml"
    params = (loader or _default_loader)(params_file, tuple(overrides))
    name = run_name(profile, overrides)
    chapters = book_chapters(layout)
    if chapter is not None:
        if chapter not in chapters:
            raise RunnerError(
                f"chapter {chapter!r} is not in {layout.quarto.name}; choose one of {', '.join(chapters)}"
            )
        todo = [chapter]
    else:
        todo = execution_order(chapters)
    missing = [c for c in todo if not (layout.chapters / f"{c}.ipynb").is_file()]
    if missing:
        raise RunnerError(
            f"chapter source(s) missing: {', '.join(f'chapters/{c}.ipynb' for c in missing)} "
            f"(listed in {layout.quarto.name}); write them or remove them from book.chapters"
        )
    records = []
    for i, ch in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {ch} (profile {name})", file=sys.stderr, flush=True)
        rec = run_chapter(ch, name, params, params_file, layout, dict(overrides))
        print(f"[{i}/{len(todo)}] {ch} done in {rec['wall_time_s']:.1f} s", file=sys.stderr, flush=True)
        records.append(rec)
    return records


def _set_book_profile(layout: Layout, profile: str) -> None:
    text = layout.quarto.read_text()
    new, n = re.subn(r"(?m)^book-profile:.*$", f"book-profile: {profile}", text)
    if n != 1:
        raise RunnerError(f"{layout.quarto}: expected exactly one top-level 'book-profile:' line")
    if new != text:
        layout.quarto.write_text(new)


def link(profile: str | None = None, layout: Layout = REPO) -> list[Path]:
    """Point ``index.ipynb`` and ``book/<chapter>.ipynb`` at ``_freeze/<profile>/``.

    Returns the links whose target does not exist yet (they are created anyway and reported).
    """
    profile = profile or book_profile(layout)
    dangling = []
    for entry in book_entries(layout):
        link_path = layout.root / entry
        target = layout.freeze / profile / f"{Path(entry).stem}.ipynb"
        link_path.parent.mkdir(parents=True, exist_ok=True)
        if link_path.is_symlink() or link_path.exists():
            if not link_path.is_symlink():
                raise RunnerError(f"{link_path} is a regular file; the book entries must be symlinks")
            link_path.unlink()
        link_path.symlink_to(os.path.relpath(target, link_path.parent))
        if not target.is_file():
            dangling.append(link_path)
    _set_book_profile(layout, profile)
    return dangling


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.runner", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="execute chapters into _freeze/<profile>/")
    p_run.add_argument("--profile", required=True, help="params/<profile>.yml")
    p_run.add_argument("--chapter", help="only this chapter (file stem, e.g. 04-attribution)")
    p_run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one parameter of the profile (dotted key, YAML value, e.g. stats.n_bins=20 "
                            "or seeds=[0,1]); repeatable; writes to _freeze/<profile>+<slug>/ instead")
    p_link = sub.add_parser("link", help="point index.ipynb and book/*.ipynb at _freeze/<profile>/")
    p_link.add_argument("--profile", help="default: book-profile in _quarto.yml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("papermill").setLevel(logging.INFO)
    try:
        if args.cmd == "run":
            from lib.config import ParamsError, parse_override

            try:
                overrides = [parse_override(text) for text in args.overrides]
            except ParamsError as err:
                raise RunnerError(str(err)) from None
            run(args.profile, args.chapter or None, overrides=overrides)
            if overrides:
                print(f"wrote _freeze/{run_name(args.profile, overrides)}/; render it with "
                      f"`make book BOOK_PROFILE={run_name(args.profile, overrides)}`", file=sys.stderr)
        else:
            for path in link(args.profile):
                print(f"warning: {path.relative_to(REPO.root)} points to a chapter not frozen yet "
                      f"(run `make run PROFILE={args.profile or book_profile()}`)", file=sys.stderr)
    except RunnerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
