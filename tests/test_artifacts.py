"""Hash-keyed artifact stages: keys are stable, sensitive to every nested value and propagate."""

from __future__ import annotations

import json
import math

import pytest

from lib.artifacts import DESCRIPTIVE, DONE, Stage, cached, default_root, open_cached, stage, stage_code, stage_key
from lib.codehash import module_closure
from lib.provenance import canonical_json, sha256_text

INPUTS = {
    "model": {"name": "vit_tiny", "kwargs": {"depth": 4, "embed_dim": 64}},
    "lora": {"r": 4, "alpha": 8.0, "targets": ("qkv", "fc1")},
    "train": {"lr": 3e-3, "epochs": 3, "grad_clip": None, "augment": False},
}


def _mutations(obj, path=()):
    """Every copy of ``obj`` with exactly one leaf changed (and its path)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            for p, new in _mutations(v, path + (k,)):
                yield p, {**obj, k: new}
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            for p, new in _mutations(v, path + (i,)):
                yield p, type(obj)(list(obj[:i]) + [new] + list(obj[i + 1 :]))
    elif isinstance(obj, bool) or obj is None:
        yield path, (not obj) if isinstance(obj, bool) else 0
    elif isinstance(obj, (int, float)):
        yield path, obj + 1
    else:
        yield path, str(obj) + "x"


def test_same_inputs_same_key_and_path(tmp_path):
    a = stage("map", INPUTS, root=tmp_path)
    b = stage("map", json.loads(json.dumps(INPUTS)), root=tmp_path)  # tuples became lists
    assert a == b
    assert a.path == tmp_path / f"map-{a.key}"
    assert len(a.key) == 16 and int(a.key, 16) >= 0


def test_key_is_sha256_of_canonical_json():
    expected = sha256_text(canonical_json({"name": "map", "inputs": INPUTS, "upstream": []}))[:16]
    assert stage_key("map", INPUTS) == expected


def test_canonical_json_sorts_keys_and_uses_float_repr():
    assert canonical_json({"b": 0.1, "a": (1, 2)}) == '{"a":[1,2],"b":0.1}'
    assert canonical_json({"x": 1e-7}) == '{"x":1e-07}'
    assert canonical_json({"a": {"z": 1, "y": 2}}) == canonical_json({"a": {"y": 2, "z": 1}})


def test_every_nested_change_changes_key():
    base = stage_key("map", INPUTS)
    seen = {base}
    for path, changed in _mutations(INPUTS):
        key = stage_key("map", changed)
        assert key != base, f"changing {path} kept the key"
        seen.add(key)
    assert len(seen) == 1 + sum(1 for _ in _mutations(INPUTS))


def test_name_and_int_vs_float_distinguish_keys():
    assert stage_key("map", INPUTS) != stage_key("laplace", INPUTS)
    assert stage_key("s", {"x": 1}) != stage_key("s", {"x": 1.0})
    assert stage_key("s", {"x": True}) != stage_key("s", {"x": 1})


def test_upstream_change_propagates(tmp_path):
    map_a = stage("map", INPUTS, root=tmp_path)
    map_b = stage("map", {**INPUTS, "train": {**INPUTS["train"], "lr": 1e-3}}, root=tmp_path)
    lap = {"structure": "kron", "prior_init": 1.0}
    la_a = stage("laplace", lap, upstream=[map_a], root=tmp_path)
    la_a2 = stage("laplace", lap, upstream=[map_a], root=tmp_path)
    la_b = stage("laplace", lap, upstream=[map_b], root=tmp_path)
    assert la_a == la_a2
    assert la_a.key != la_b.key
    ev_a = stage("eval", {}, upstream=[la_a], root=tmp_path)
    ev_b = stage("eval", {}, upstream=[la_b], root=tmp_path)
    assert ev_a.key != ev_b.key
    # new Laplace settings with the same MAP inputs reuse the MAP stage
    la_c = stage("laplace", {**lap, "prior_init": 2.0}, upstream=[map_a], root=tmp_path)
    assert la_c.key != la_a.key and la_c.path != la_a.path


def test_inputs_json_and_done_marker(tmp_path):
    up = stage("map", INPUTS, root=tmp_path)
    s = stage("laplace", {"r": 4}, upstream=[up], root=tmp_path)
    record = json.loads((s.path / "inputs.json").read_text())
    assert record == {
        "name": "laplace",
        "key": s.key,
        "inputs": {"r": 4},
        "upstream": [{"name": "map", "key": up.key}],
    }
    assert not s.done
    f = s.file("sub/dir/result.pt")
    assert f.parent.is_dir() and f.parent.parent.parent == s.path
    s.mark_done()
    assert s.done
    assert stage("laplace", {"r": 4}, upstream=[up], root=tmp_path).done


@pytest.mark.parametrize(
    "bad, where",
    [
        ({"p": object()}, "['p']"),
        ({"a": {"b": {1, 2}}}, "['a']['b']"),
        ({"x": math.nan}, "['x']"),
        ({"x": [1, math.inf]}, "['x'][1]"),
        ({"a": {3: "int key"}}, "['a']"),
    ],
)
def test_rejects_non_json_inputs(tmp_path, bad, where):
    with pytest.raises(ValueError, match=r"stage 'map'.*" + where.replace("[", r"\[").replace("]", r"\]")):
        stage("map", bad, root=tmp_path)


def test_rejects_bad_names_relnames_and_upstream(tmp_path):
    with pytest.raises(ValueError, match="stage name"):
        stage("map-v2", {}, root=tmp_path)
    with pytest.raises(ValueError, match="inputs of stage"):
        stage("map", [1, 2], root=tmp_path)
    with pytest.raises(ValueError, match="upstream"):
        stage("eval", {}, upstream=["map-123"], root=tmp_path)
    s = stage("map", {}, root=tmp_path)
    for rel in ("../escape.pt", "/abs.pt", ""):
        with pytest.raises(ValueError, match="relname"):
            s.file(rel)


def test_default_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LLA_ARTIFACTS", str(tmp_path / "store"))
    assert default_root() == tmp_path / "store"
    s = stage("map", {"a": 1})
    assert isinstance(s, Stage) and s.path.parent == tmp_path / "store"
    monkeypatch.delenv("LLA_ARTIFACTS")
    assert default_root().name == "artifacts"


def test_cached_computes_once_and_keys_the_code(tmp_path):
    calls = []

    def compute(st):
        calls.append(st.key)
        st.file("out.txt").write_text("x")

    first = cached("demo", {"a": 1}, code="lib.stats", compute=compute, root=tmp_path)
    again = cached("demo", {"a": 1}, code="lib.stats", compute=compute, root=tmp_path)
    assert first == again and first.done and calls == [first.key]
    recorded = json.loads((first.path / "inputs.json").read_text())["inputs"]["code"]
    assert recorded == stage_code(["lib.stats"])
    assert recorded["modules"] == [m for m in module_closure(["lib.stats"]) if m not in DESCRIPTIVE]
    assert "lib.stats" in recorded["modules"] and "lib.config" not in recorded["modules"]
    # the same inputs computed by other code get another stage
    other = cached("demo", {"a": 1}, code="lib.calibration", compute=compute, root=tmp_path)
    assert other.key != first.key and calls == [first.key, other.key]
    assert first.key != stage("demo", {"a": 1}, root=tmp_path).key


def test_cached_leaves_a_failed_compute_unfinished_and_reserves_the_code_key(tmp_path):
    def fail(st):
        st.file("part.txt").write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        cached("demo", {"a": 1}, code="lib.stats", compute=fail, root=tmp_path)
    (path,) = tmp_path.iterdir()
    assert not (path / DONE).exists() and (path / "part.txt").is_file()
    with pytest.raises(ValueError, match="reserved key 'code'"):
        cached("demo", {"code": 1}, code="lib.stats", compute=fail, root=tmp_path)


def test_open_cached_is_the_stage_cached_computes_without_computing_it(tmp_path):
    """Processes that fill a stage's parts open it with :func:`open_cached`: the same directory
    and key as :func:`cached`, nothing computed or marked done; then one of them completes it
    through :func:`cached`, whose ``compute`` finds the parts; no temporary record is left."""
    opened = open_cached("demo", {"a": 1}, code="lib.stats", upstream=[], root=tmp_path)
    assert not opened.done and sorted(p.name for p in opened.path.iterdir()) == ["inputs.json"]
    opened.file("parts/0.txt").write_text("part")
    done = cached("demo", {"a": 1}, code="lib.stats", root=tmp_path,
                  compute=lambda st: st.file("out.txt").write_text(st.file("parts/0.txt").read_text()))
    assert done == opened and done.done and (done.path / "out.txt").read_text() == "part"
    assert not list(tmp_path.rglob("*.tmp"))
    with pytest.raises(ValueError, match="reserved key 'code'"):
        open_cached("demo", {"code": 1}, code="lib.stats", root=tmp_path)
