"""Which lib modules each stage's code can reach (lib.codehash), and that an edit re-keys exactly
the stages whose closure holds the edited module.

A stage's key hashes the import closure of its ``code`` module (:func:`lib.artifacts.cached`), less
the modules that only describe and store stages (:data:`lib.artifacts.DESCRIPTIVE`), so this table
is what a fix to a module costs: every stage listed for it is recomputed. The MAP
training must not reach the statistics, the banks neither the statistics nor the attribution, and
no stage the report, the figures or the plotting style.
"""

from __future__ import annotations

import ast
import shutil

import pytest

from lib.artifacts import DESCRIPTIVE, stage_code
from lib.codehash import module_closure, module_file
from lib.paths import ROOT
from test_import_graph import lib_modules

STAGE_CODE = {
    "backbone": "lib.pipeline", "map": "lib.pipeline",
    "laplace": "lib.stages.laplace", "curvature_quality": "lib.stages.quality",
    "bank": "lib.stages.banks", "bank_val": "lib.stages.banks", "bank_iso": "lib.stages.banks",
    "bank_iso_val": "lib.stages.banks",
    "subsets": "lib.stages.subsets", "attribution": "lib.stages.attribution",
    "baseline_last_layer": "lib.baselines.last_layer", "baseline_ensemble": "lib.baselines.ensemble",
    "baseline_mc_dropout": "lib.baselines.mc_dropout", "baseline_variational": "lib.baselines.variational",
    "baseline_continued_map": "lib.baselines.finetune", "baseline_importance": "lib.baselines.importance",
    "corrupt": "lib.corruptions", "ood_images": "lib.ood_sets", "shift_probs": "lib.shift_study",
    "latency": "lib.deploy",
}
"""The module whose closure keys each stage (the ``code`` it passes to :func:`lib.artifacts.cached`)."""

STORAGE = {"lib", "lib.paths", "lib.provenance", "lib.codehash", "lib.artifacts", "lib.corruption_names", "lib.config"}
TRAINING = STORAGE | {"lib.data", "lib.model", "lib.train", "lib.pipeline"}
LAPLACE = {"lib.laplace", "lib.laplace.curvature", "lib.laplace.exact", "lib.laplace.posterior", "lib.laplace.marglik"}
BASELINE = TRAINING | LAPLACE | {"lib.laplace.predictive", "lib.deploy", "lib.baselines", "lib.baselines.result"}
CLOSURES = {
    "lib.pipeline": TRAINING,
    "lib.stages.laplace": TRAINING | LAPLACE | {"lib.stages", "lib.stages.laplace"},
    "lib.stages.quality": TRAINING | LAPLACE | {"lib.laplace.quality", "lib.stages", "lib.stages.quality"},
    "lib.stages.banks": TRAINING | LAPLACE | {"lib.laplace.predictive", "lib.laplace.isotropic", "lib.stages",
                                             "lib.stages.banks"},
    "lib.stages.subsets": TRAINING | LAPLACE | {"lib.laplace.predictive", "lib.laplace.scale", "lib.calibration",
                                                "lib.resample", "lib.shapley", "lib.temperature", "lib.stages",
                                                "lib.stages.subsets"},
    "lib.stages.attribution": TRAINING | LAPLACE | {
        "lib.laplace.predictive", "lib.laplace.isotropic", "lib.laplace.scale", "lib.calibration", "lib.resample",
        "lib.stats", "lib.shapley", "lib.attribution", "lib.stages", "lib.stages.banks", "lib.stages.seed",
        "lib.stages.attribution"},
    "lib.baselines.last_layer": BASELINE | {"lib.baselines.last_layer"},
    "lib.baselines.ensemble": BASELINE | {"lib.baselines.ensemble"},
    "lib.baselines.mc_dropout": BASELINE | {"lib.baselines.finetune", "lib.baselines.mc_dropout"},
    "lib.baselines.variational": BASELINE | {"lib.baselines.finetune", "lib.baselines.variational"},
    "lib.baselines.finetune": BASELINE | {"lib.baselines.finetune"},
    "lib.baselines.importance": BASELINE | {"lib.baselines.importance", "lib.calibration", "lib.resample", "lib.stats"},
    "lib.deploy": TRAINING - {"lib.pipeline"} | LAPLACE | {"lib.laplace.predictive", "lib.deploy"},
    "lib.corruptions": STORAGE | {"lib.data", "lib.corruptions"},
    "lib.ood_sets": STORAGE | {"lib.data", "lib.ood_sets"},
    "lib.shift_study": TRAINING | LAPLACE | {
        "lib.laplace.predictive", "lib.laplace.isotropic", "lib.calibration", "lib.corruptions", "lib.ood",
        "lib.ood_sets", "lib.resample", "lib.shift", "lib.stats", "lib.temperature", "lib.stages", "lib.stages.banks",
        "lib.stages.seed", "lib.shift_study"},
}
"""The pinned closure of every stage module (a new import into a stage's code must be added here)."""


def test_each_stage_reaches_exactly_its_pinned_modules():
    for module, pinned in CLOSURES.items():
        got = set(module_closure([module]))
        assert got == pinned, f"{module}: reaches also {sorted(got - pinned)}, no longer {sorted(pinned - got)}"
    assert set(STAGE_CODE.values()) == set(CLOSURES)


def test_every_cached_stage_of_lib_is_pinned():
    """Every call of ``cached`` in lib is in a module of :data:`CLOSURES`, and a stage named by a
    literal is listed in :data:`STAGE_CODE` under that module (its ``code=__name__``)."""
    found: dict[str, set[str]] = {}
    for module in lib_modules():
        path = module_file(module)
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "cached" and node.args:
                name = node.args[0].value if isinstance(node.args[0], ast.Constant) else None
                found.setdefault(module, set()).add(name)
    assert set(found) == set(CLOSURES)
    for module, names in found.items():
        for name in names - {None}:
            assert STAGE_CODE.get(name) == module, (name, module)


def test_training_banks_and_every_stage_stay_clear_of_what_they_do_not_run():
    """MAP training and the banks never reach the statistics or the attribution; no stage reaches
    the report, the figures, the plotting style or the study entry point."""
    assert not {"lib.stats", "lib.attribution"} & CLOSURES["lib.pipeline"]
    assert not {"lib.stats", "lib.attribution"} & CLOSURES["lib.stages.banks"]
    for module, closure in CLOSURES.items():
        assert not {"lib.report", "lib.figures", "lib.shift_figures", "lib.style", "lib.study"} & closure, module


@pytest.fixture(scope="module")
def lib_copy(tmp_path_factory):
    root = tmp_path_factory.mktemp("copy")
    shutil.copytree(ROOT / "lib", root / "lib", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_an_edited_module_rekeys_exactly_the_stages_whose_closure_holds_it(lib_copy):
    """For every lib module: append a comment to it in a copy of lib/ and recompute every stage's
    code hash; the stages whose hash changes are exactly those whose pinned closure holds it."""
    def key(code):
        return stage_code([code], lib_copy)["sha256"]

    before = {name: key(code) for name, code in STAGE_CODE.items()}
    for module in lib_modules():
        path = lib_copy.joinpath(*module.split("."))
        path = path.with_suffix(".py") if path.with_suffix(".py").is_file() else path / "__init__.py"
        original = path.read_bytes()
        path.write_bytes(original + b"\n# edited\n")
        try:
            changed = {name for name, code in STAGE_CODE.items() if key(code) != before[name]}
        finally:
            path.write_bytes(original)
        expected = set() if module in DESCRIPTIVE else {n for n, code in STAGE_CODE.items() if module in CLOSURES[code]}
        assert changed == expected, module
    assert {name: key(code) for name, code in STAGE_CODE.items()} == before
