"""Fill the study's stage cache (:mod:`lib.study`) on several processes, one per GPU, with
``torch.distributed``; the chapters then find every stage cached::

    torchrun --nproc-per-node=G -m lib.compute compute --profile P [--set KEY=VALUE ...]
    python -m lib.compute compute --profile P     # one process (world size 1), the same stages

``torchrun`` starts the G processes and sets their ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
rendezvous address; :func:`init_ranks` joins them into one process group (NCCL on CUDA, gloo on
the CPU), process ``r`` on GPU ``LOCAL_RANK``. Rank ``r`` of ``W`` runs up to nine phases, each
ended by a :meth:`Ranks.sync` (a barrier) because the next one reads what it wrote:

0. rank 0: the data splits (a download happens once) and the ``backbone`` stage;
1. seed ``i`` of ``cfg.seeds`` on rank ``i mod W``: ``map`` and ``laplace``;
2. the parts of every bank of every seed (:func:`lib.stages.banks.bank_parts`), dealt over the
   ranks in turn: the bank sharded by image, a Laplace bank's part and its control's computed in
   one pass (:func:`lib.stages.banks.save_parts`) and saved by the rank that computed them; and
   ``curvature_quality`` (first seed) on the last rank;
3. seed ``i`` on rank ``i mod W``: its four banks joined from the parts (:func:`~lib.stages.banks.build_bank`,
   which marks each done) and its ``subsets`` stage;
4. rank 0: the ``attribution`` stage over all seeds;
5. rank 0 alone (the others wait, so that nothing else runs beside the measurement): the
   ``latency`` stage of the priced block choices (:func:`lib.baselines.study.priced_latency`),
   which the baselines, shift and deployment chapters read;
6. with a ``baselines`` section, seed ``i`` on rank ``i mod W``: every method of
   :data:`lib.baselines.run.METHODS` (last-layer Laplace, the LoRA ensembles of the seeds' MAP
   models, MC dropout, the variational LoRA, continued MAP; each its own cached stage) and the
   ``baseline_importance`` scores;
7. with a ``shift`` section, the image sets that the seeds share, dealt over the ranks in turn:
   every corruption × severity of the test split (``corrupt`` stages) and the far-OOD sets
   (``ood_images`` stages);
8. with a ``shift`` section, the ``shift_probs`` stage of every (seed, image set), dealt over the
   ranks in turn (seeds outer): one task per corrupted or OOD set of a seed. These are dealt as
   whole tasks, not sharded by image like the banks: a ``shift_probs`` stage is one perturbation
   bank that is not saved by parts, and a profile has seeds × (corruptions × severities + OOD
   sets) of them (the smoke profile 2 × 15, ``vit-b16-cifar100`` 3 × 53), enough to keep 8 ranks
   busy.

Every stage goes through :func:`lib.artifacts.cached` with the keys a single process gives, so the
cache a G-rank run fills is the one :class:`lib.study.Study` opens, and the one that
:func:`lib.baselines.study.baseline_study`, :func:`lib.baselines.study.importance_study` and
:func:`lib.shift_study.study_shift` read (they call the same stage functions with the same
arguments). A
rerun skips the stages that are done and the bank parts that are saved; nothing partial is marked
done (a bank is marked done only once joined from all its parts). A task that raises stops its rank's phase; at the next sync
every rank raises :class:`ComputeError` naming the rank and the stage that failed, so the command
exits non-zero and torchrun's summary shows each rank's error. A rank that dies without raising (killed, out
of host memory) is detected by torchrun, which stops the others and names it.

Progress: one bar per rank over its tasks, at terminal row ``r`` (``position=rank``); the stages'
own bars are quiet when stderr is not a terminal (``torchrun --local-ranks-filter=0`` shows rank
0's output only, ``--redirects 3 --log-dir D`` writes each rank's to a file).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm

from lib.baselines.importance import importance_scores
from lib.baselines.result import baseline_seeds
from lib.baselines.run import METHODS
from lib.baselines.study import priced_latency
from lib.config import Config, ParamsError, load_params, params_path, parse_override
from lib.data import splits_for
from lib.pipeline import backbone_stage, resolve_device
from lib.shift_study import (corrupted_predictions, corrupted_test_set, ood_predictions, ood_set, ood_set_names,
                             shift_config)
from lib.stages.banks import bank_parts, open_bank, save_parts
from lib.study import Study

BARRIER_TIMEOUT = timedelta(hours=12)
"""How long a rank waits at a phase's barrier for the others."""


class ComputeError(RuntimeError):
    """A rank's task failed; the message names the rank and the stage."""


@dataclass(frozen=True)
class Task:
    """One unit of a phase: ``label`` names the stage (and seed, images) in errors and progress."""

    label: str
    run: Callable[[], object]


@dataclass
class Ranks:
    """This process's ``rank`` among ``world`` processes, on ``device``; ``group`` is True when a
    ``torch.distributed`` process group was initialised (under torchrun)."""

    rank: int
    world: int
    device: torch.device
    group: bool

    def mine(self, items: Sequence) -> list:
        """The items dealt to this rank: ``items[rank::world]``."""
        return list(items[self.rank::self.world])

    def sync(self, phase: str, failure: tuple[str, BaseException] | None) -> None:
        """Barrier at the end of ``phase`` that also exchanges the ranks' failures (an all-gather
        of ``(rank, label, message)`` or None): if any rank failed, every rank raises a
        :class:`ComputeError` naming the failed ranks and their stages (the failed rank's chained
        to its exception)."""
        own = None if failure is None else (self.rank, failure[0], f"{type(failure[1]).__name__}: {failure[1]}")
        gathered = [None] * self.world
        if self.group:
            dist.all_gather_object(gathered, own)
        else:
            gathered = [own]
        failed = [f for f in gathered if f is not None]
        if not failed:
            return
        said = "; ".join(f"rank {r} failed in stage {label!r} ({msg})" for r, label, msg in failed)
        if failure is not None:
            raise ComputeError(f"{said} [phase {phase}]") from failure[1]
        raise ComputeError(f"rank {self.rank} stopped: {said} [phase {phase}]")


def init_ranks(cfg: Config) -> Ranks:
    """Join torchrun's process group when its environment is set (``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), else one process of world size 1. On CUDA
    (``device`` of the params resolving to it) rank r uses GPU ``LOCAL_RANK`` and NCCL, on the CPU gloo."""
    device = resolve_device(cfg)
    if "WORLD_SIZE" not in os.environ:
        return Ranks(0, 1, device, group=False)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    # A rank may wait at a barrier for as long as another trains a seed (NCCL's default timeout is
    # 10 minutes); a rank that dies is detected by torchrun, which stops the others, not by this timeout.
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=BARRIER_TIMEOUT)
    return Ranks(dist.get_rank(), dist.get_world_size(), device, group=True)


def _run_phase(ranks: Ranks, phase: str, tasks: Callable[[], Sequence[Task]]) -> float:
    """List this rank's ``tasks()`` and run them in order (stopping at the first that raises, or
    when listing them raises), then :meth:`Ranks.sync`; returns the phase's wall time on this rank."""
    t0 = time.perf_counter()
    failure = None
    try:
        todo = list(tasks())
    except Exception as err:  # reported at the sync below like a task's failure
        todo, failure = [], (f"{phase} (opening its stages)", err)
    with tqdm(total=len(todo), desc=f"rank {ranks.rank} {phase}", position=ranks.rank,
              disable=None if todo else True) as bar:
        for task in todo:
            bar.set_postfix_str(task.label)  # what this rank is doing, on its own line
            try:
                task.run()
            except Exception as err:  # reported to every rank at the sync below, raised there with it as cause
                failure = (task.label, err)
                break
            bar.update()
    ranks.sync(phase, failure)
    return time.perf_counter() - t0


def _seed_tasks(study: Study, ranks: Ranks) -> list[Task]:
    """Phase 1 on this rank: MAP and Laplace of its seeds."""
    tasks = []
    for seed in ranks.mine(study.cfg.seeds):
        tasks.append(Task(f"map seed {seed}", lambda s=seed: study.run(s)))
        tasks.append(Task(f"laplace seed {seed}", lambda s=seed: study.fit(s)))
    return tasks


def _part_tasks(study: Study, ranks: Ranks) -> list[Task]:
    """Phase 2 on this rank: its share of the parts of the banks not done yet, over all seeds, and
    on the last rank (which the deal gives the fewest parts) first the curvature quality of the
    first seed, which only reads its MAP model."""
    cfg, device, tasks = study.cfg, ranks.device, []
    for seed in cfg.seeds:
        run = study.run(seed)
        lap, post = study.fit(seed)
        for split in ("test", "val"):
            plans = [plan for control in (False, True)
                     if not (plan := open_bank(cfg, run, post, lap, device, split, control)).stage.done]
            if not plans:
                continue
            names = "+".join(plan.stage.name for plan in plans)
            for start, stop in bank_parts(len(plans[0].data), cfg.predictive.batch_size):
                tasks.append(Task(f"{names} seed {seed} images {start}-{stop}",
                                  lambda r=run, p=plans, a=start, b=stop: save_parts(cfg, r, p, a, b, device)))
    mine = ranks.mine(tasks)
    if ranks.rank == ranks.world - 1 and cfg.laplace.quality_images > 0:
        mine.insert(0, Task(f"curvature_quality seed {cfg.seeds[0]}", lambda: study.curvature_quality))
    return mine


def _baseline_tasks(study: Study, ranks: Ranks) -> list[Task]:
    """Phase 6 on this rank: every baseline method of :data:`lib.baselines.run.METHODS` and the
    importance scores of its seeds (each a cached stage of the seed's MAP run)."""
    cfg, device, tasks = study.cfg, ranks.device, []
    trained = baseline_seeds(cfg)
    for seed in ranks.mine(cfg.seeds):
        if seed in trained:
            for name, method in METHODS.items():
                tasks.append(Task(f"{name} seed {seed}", lambda s=seed, m=method: m(cfg, study.run(s), device)))
        tasks.append(Task(f"importance scores seed {seed}",
                          lambda s=seed: importance_scores(cfg, study.run(s), device)))
    return tasks


def _shift_sets(study: Study) -> list[tuple[str, Callable[[], object], Callable[..., object]]]:
    """The image sets of the shift study as ``(label, open, predict)``: every corruption × severity
    of the test split (``open()`` computes or loads its ``corrupt`` stage) and every OOD set (a
    far-OOD set's ``open()`` its ``ood_images`` stage), with the function of :mod:`lib.shift_study`
    that gives a seed's ``shift_probs`` stage on it, ``predict(cfg, seed_study, open(), device)``."""
    cfg = study.cfg
    sc, test = shift_config(cfg), study.run(cfg.seeds[0]).splits.test
    sets = [(f"{name} severity {severity}", lambda n=name, v=severity: corrupted_test_set(cfg, test, n, v),
             corrupted_predictions) for name in sc.corruptions for severity in sc.severities]
    size = test.x.shape[-1]
    return sets + [(f"OOD set {name}", lambda n=name: ood_set(cfg, n, size), ood_predictions)
                   for name in ood_set_names(cfg)]


def _shift_set_tasks(study: Study, ranks: Ranks) -> list[Task]:
    """Phase 7 on this rank: its share of the shift study's image sets (stages that the seeds share)."""
    return ranks.mine([Task(label, get) for label, get, _ in _shift_sets(study)])


def _shift_tasks(study: Study, ranks: Ranks) -> list[Task]:
    """Phase 8 on this rank: its share of the ``shift_probs`` stages, one task per (seed, image set),
    seeds outer, dealt over the ranks in turn."""
    cfg, device = study.cfg, ranks.device
    tasks = [Task(f"shift_probs seed {seed} {label}",
                  lambda s=seed, g=get, f=predict: f(cfg, study.seed(s), g(), device))
             for seed in cfg.seeds for label, get, predict in _shift_sets(study)]
    return ranks.mine(tasks)


def compute(cfg: Config, ranks: Ranks) -> dict[str, float]:
    """Fill the cache of ``cfg``'s study (the phases of the module docstring) as rank ``ranks.rank``;
    returns each phase's wall time on this rank (seconds, the sync included)."""
    device = ranks.device
    study = Study(cfg, device)
    times = {}

    def prepare() -> None:
        splits_for(cfg)
        backbone_stage(cfg, device)

    first = [Task("data and backbone", prepare)] if ranks.rank == 0 else []
    times["prepare"] = _run_phase(ranks, "prepare", lambda: first)
    times["map+laplace"] = _run_phase(ranks, "map+laplace", lambda: _seed_tasks(study, ranks))
    times["bank parts"] = _run_phase(ranks, "bank parts", lambda: _part_tasks(study, ranks))
    mine = [Task(f"banks and subsets seed {s}", lambda s=s: study.seed(s)) for s in ranks.mine(cfg.seeds)]
    times["banks+subsets"] = _run_phase(ranks, "banks+subsets", lambda: mine)
    last = [Task("attribution", lambda: study.attribution_tables)] if ranks.rank == 0 else []
    times["attribution"] = _run_phase(ranks, "attribution", lambda: last)
    timed = [Task(f"latency seed {cfg.seeds[0]}", lambda: priced_latency(study))] if ranks.rank == 0 else []
    times["latency"] = _run_phase(ranks, "latency", lambda: timed)
    if cfg.baselines is not None:
        times["baselines"] = _run_phase(ranks, "baselines", lambda: _baseline_tasks(study, ranks))
    if cfg.shift is not None:
        times["shift sets"] = _run_phase(ranks, "shift sets", lambda: _shift_set_tasks(study, ranks))
        times["shift predictions"] = _run_phase(ranks, "shift predictions", lambda: _shift_tasks(study, ranks))
    return times


@record
def main(argv: list[str] | None = None) -> int:
    """The command line; a :class:`ComputeError` is raised out of it, so that torchrun's summary
    shows each rank's error message (``@record`` writes it to the file torchrun reads)."""
    parser = argparse.ArgumentParser(prog="python -m lib.compute", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("compute", help="fill artifacts/ with every stage of the study (under torchrun: in parallel)")
    p.add_argument("--profile", required=True, help="params/<profile>.yml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one parameter, as `python -m lib.runner run --set` (the chapters must "
                        "be run with the same overrides to find these stages)")
    args = parser.parse_args(argv)
    try:
        overrides = [parse_override(text) for text in args.overrides]
        cfg = Config.from_dict(load_params(params_path(args.profile), overrides=overrides),
                               source=f"params/{args.profile}.yml")
    except ParamsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ranks = init_ranks(cfg)
    try:
        t0 = time.perf_counter()
        times = compute(cfg, ranks)
        if ranks.rank == 0:
            phases = ", ".join(f"{k} {v:.1f} s" for k, v in times.items())
            print(f"computed profile {args.profile} on {ranks.world} rank(s) ({ranks.device.type}) in "
                  f"{time.perf_counter() - t0:.1f} s: {phases}", file=sys.stderr)
    finally:
        if ranks.group:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
