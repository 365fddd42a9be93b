"""The import graph of lib (as lib.codehash reads it): no circle, and no module imports a higher layer.

The layers, lowest first (a module may import modules of its own layer or of lower ones):

0. leaf: import nothing from lib (paths, display names, style, corruption names, resampling,
   calibration metrics, temperature scaling, the evidence formula, the fitted models' and the
   covariance scale's findings; empty packages)
1. infrastructure and statistics: provenance, code hashes, artifacts, stored result tables; stats, OOD metrics,
   the equivalence test, the attribution's and the statistics' findings and the number formatting
2. config
3. data and model (corruptions and OOD image sets included)
4. training
5. Laplace (lib.laplace.*), deployment timing, the baseline table
6. pipeline (backbone, MAP)
7. stage modules and analyses (lib.stages.*, attribution, shift, shift study, the shipped backbone,
   the baseline methods and their run; the answer's findings and the study's scale; the coverage simulation)
8. study (lib.study) and the command that fills its cache on several processes (lib.compute)
9. figures (drawing only: lib.figures, lib.shift_figures, lib.baseline_figures)
10. report (result tables)
11. runner and renderer
"""

from __future__ import annotations

from lib.codehash import imported_modules
from lib.paths import ROOT

LAYERS: list[set[str]] = [
    {"lib", "lib.paths", "lib.names", "lib.style", "lib.corruption_names", "lib.resample", "lib.shapley", "lib.calibration", "lib.interval",
     "lib.temperature", "lib.laplace.marglik", "lib.stages", "lib.baselines", "lib.fit_findings",
     "lib.scale_findings"},
    {"lib.provenance", "lib.codehash", "lib.artifacts", "lib.results", "lib.stats", "lib.ood", "lib.equivalence",
     "lib.attribution_findings", "lib.statistics_findings", "lib.formatting"},
    {"lib.config"},
    {"lib.data", "lib.model", "lib.corruptions", "lib.ood_sets"},
    {"lib.train"},
    {"lib.laplace", "lib.laplace.curvature", "lib.laplace.exact", "lib.laplace.posterior", "lib.laplace.isotropic",
     "lib.laplace.predictive", "lib.laplace.scale", "lib.laplace.quality", "lib.laplace.reference", "lib.deploy",
     "lib.baselines.table"},
    {"lib.pipeline"},
    {"lib.stages.laplace", "lib.stages.quality", "lib.stages.banks", "lib.stages.subsets", "lib.stages.seed",
     "lib.stages.attribution", "lib.attribution", "lib.shift", "lib.shift_study", "lib.backbone",
     "lib.baselines.result", "lib.baselines.finetune", "lib.baselines.ensemble", "lib.baselines.importance",
     "lib.baselines.last_layer", "lib.baselines.mc_dropout", "lib.baselines.variational", "lib.baselines.run",
     "lib.baselines.study", "lib.answer", "lib.study_scale", "lib.coverage"},
    {"lib.study", "lib.compute"},
    {"lib.figures", "lib.shift_figures", "lib.baseline_figures"},
    {"lib.report"},
    {"lib.runner", "lib.render", "lib.render.book", "lib.render.convert", "lib.render.html", "lib.render.pandoc",
     "lib.render.pdf", "lib.render.tables", "lib.render.build"},
]
"""The layer of every lib module, lowest first (the module docstring names them)."""

def lib_modules() -> list[str]:
    """Every importable module of lib (``__main__`` files excluded: nothing imports them)."""
    out = []
    for path in sorted((ROOT / "lib").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append(".".join(parts))
    return out


def imports(module: str) -> set[str]:
    """The lib modules ``module`` imports, without its own parent packages (importing a module runs
    its packages first, so a submodule's import of its package is no circle) and itself."""
    parts = module.split(".")
    ancestors = {".".join(parts[:i]) for i in range(1, len(parts))}
    return set(imported_modules(module)) - ancestors - {module}


def layer_of(module: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if module in layer)


def test_every_module_has_exactly_one_layer():
    placed = [m for layer in LAYERS for m in layer]
    assert len(placed) == len(set(placed)), "a module is in two layers"
    assert sorted(placed) == sorted(lib_modules()), "place every lib module in one layer of LAYERS (and only those)"


def test_no_module_imports_a_higher_layer_and_leaves_import_nothing():
    upward = [f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
              for m in lib_modules() for d in sorted(imports(m)) if layer_of(d) > layer_of(m)]
    assert not upward, "\n".join(upward)
    assert not {m: imports(m) for m in LAYERS[0] if imports(m)}


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_by_hand():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert _cycles({"a": {"b"}, "b": set(), "c": {"b"}}) == []


def test_no_import_circle():
    assert _cycles({m: imports(m) for m in lib_modules()}) == []
