"""lib.config: every params file validates; bad keys, types, files and data roots fail in one line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from lib.config import (
    CIFAR_DIRS,
    DENSE_BLOCK_MAX_PARAMS,
    Config,
    LaplaceConfig,
    ModelConfig,
    ParamsError,
    PretrainConfig,
    TrainConfig,
    load_params,
    lora_block_params,
    params_path,
)
from lib.paths import PARAMS

PROFILES = sorted(p.stem for p in PARAMS.glob("*.yml"))


def _raw(profile: str) -> dict:
    return yaml.safe_load(params_path(profile).read_text())


def _write(tmp_path: Path, raw: dict, name: str = "bad.yml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def _with_data_root(raw: dict, tmp_path: Path) -> dict:
    """``raw`` with a real dataset's root moved to ``tmp_path`` holding an empty torchvision folder."""
    if raw["data"]["name"] in CIFAR_DIRS and not raw["data"].get("download", False):
        (tmp_path / CIFAR_DIRS[raw["data"]["name"]]).mkdir(exist_ok=True)
        raw = {**raw, "data": {**raw["data"], "root": str(tmp_path)}}
    return raw


def _one_line_error(path: Path) -> str:
    with pytest.raises(ParamsError) as err:
        load_params(path)
    msg = str(err.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    return msg


def test_there_are_the_three_profiles():
    assert {"smoke", "cifar10-transfer", "vit-b16-cifar100"} <= set(PROFILES)


@pytest.mark.parametrize("profile", PROFILES)
def test_every_params_file_validates(profile, tmp_path):
    raw = _with_data_root(_raw(profile), tmp_path)
    path = _write(tmp_path, raw, f"{profile}.yml")
    params = load_params(path)
    assert params["profile"] == raw["profile"] == profile
    cfg = Config.from_dict(params)
    # every value written in the file survives validation (lists become tuples in the dataclass;
    # nested sections such as baselines.finetune are compared key by key)
    def check(obj, values, where):
        for key, value in values.items():
            got = getattr(obj, key)
            if isinstance(value, dict) and dataclasses.is_dataclass(got):
                check(got, value, f"{where}.{key}")
                continue
            expect = tuple(value) if isinstance(value, list) else value
            assert got == expect, f"{profile}: {where}.{key} = {got!r}, file says {value!r}"

    for section, values in raw.items():
        if isinstance(values, dict) and section != "data":
            check(getattr(cfg, section), values, section)
    assert cfg.seeds == tuple(raw["seeds"])
    assert cfg.data.name == raw["data"]["name"]


def test_cifar10_transfer_profile_sections():
    cfg = Config.from_dict(_raw("cifar10-transfer"))
    assert isinstance(cfg.pretrain, PretrainConfig)
    assert set(cfg.pretrain.classes).isdisjoint(cfg.data.classes)
    assert cfg.data.num_classes == len(cfg.data.classes)
    assert Config.from_dict(_raw("smoke")).pretrain is None


def test_round_trip_from_dict_to_dict():
    for profile in PROFILES:
        cfg = Config.from_dict(_raw(profile))
        d = cfg.to_dict()
        assert Config.from_dict(d) == cfg
        assert isinstance(d["seeds"], list) and isinstance(d["lora"]["targets"], list)
    default = Config()
    assert Config.from_dict(default.to_dict()) == default
    assert Config.from_dict({}) == default


@pytest.mark.parametrize(
    ("edit", "dotted", "suggestion"),
    [
        (lambda raw: raw["train"].update(lrr=raw["train"].pop("lr")), "train.lrr", "train.lr"),
        (lambda raw: raw.update(seedz=raw.pop("seeds")), "seedz", "seeds"),
        (lambda raw: raw["data"]["synthetic"].update(n_trian=10), "data.synthetic.n_trian", "data.synthetic.n_train"),
    ],
)
def test_unknown_key_names_file_key_and_suggestion(edit, dotted, suggestion, tmp_path):
    raw = _raw("smoke")
    edit(raw)
    path = _write(tmp_path, raw)
    msg = _one_line_error(path)
    assert f"unknown key '{dotted}'" in msg, msg
    assert f"did you mean '{suggestion}'" in msg, msg


def test_unknown_key_without_close_match_says_remove(tmp_path):
    raw = _raw("smoke")
    raw["train"]["zzzzzz"] = 1
    msg = _one_line_error(_write(tmp_path, raw))
    assert "'train.zzzzzz'" in msg and "remove it" in msg, msg


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("train", "epochs", "3", "'train.epochs' must be int, got '3' (str)"),
        ("train", "epochs", 3.0, "'train.epochs' must be int, got 3.0 (float)"),
        ("train", "epochs", True, "'train.epochs' must be int, got True (bool)"),
        ("train", "lr", "fast", "'train.lr' must be float, got 'fast'"),
        ("train", "grad_clip", "x", "'train.grad_clip' must be float, got 'x'"),
        ("data", "classes", 5, "'data.classes' must be a list, got 5"),
        ("model", "kwargs", [1], "'model.kwargs' must be a mapping, got [1]"),
        ("lora", "targets", ["qkv", 3], "'lora.targets' must be str, got 3 (int)"),
        ("train", "epochs", 0, "'train.epochs' is 0; it must be ≥ 1"),
        ("train", "lr", 0.0, "'train.lr' is 0.0; it must be > 0.0"),
        ("laplace", "fit_size", -5, "'laplace.fit_size' is -5; it must be ≥ 1"),
        ("laplace", "prior_init", -1.0, "'laplace.prior_init' is -1.0; it must be > 0.0"),
        ("predictive", "n_samples", 1, "'predictive.n_samples' is 1; it must be ≥ 2"),
        ("predictive", "scale_images", 0, "'predictive.scale_images' is 0; it must be ≥ 1"),
        ("stats", "alpha", 1.0, "'stats.alpha' is 1.0; it must be > 0.0 and < 1.0"),
        ("stats", "n_bins", 0, "'stats.n_bins' is 0; it must be ≥ 1"),
        ("stats", "equivalence_margin", 0.0, "'stats.equivalence_margin' is 0.0; it must be > 0.0 and < 1.0"),
        ("deploy", "n_warmup", -1, "'deploy.n_warmup' is -1; it must be ≥ 0"),
    ],
)
def test_wrong_type_or_out_of_range_names_the_key(section, key, value, expected, tmp_path):
    raw = _raw("smoke")
    raw[section][key] = value
    msg = _one_line_error(_write(tmp_path, raw))
    assert expected in msg, msg


def test_int_is_accepted_for_float_and_null_for_optional(tmp_path):
    raw = _raw("smoke")
    raw["train"].update(lr=1, grad_clip=None)
    cfg = Config.from_dict(load_params(_write(tmp_path, raw, "ok.yml")))
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.grad_clip is None


def test_section_that_is_not_a_mapping(tmp_path):
    raw = _raw("smoke")
    raw["train"] = [1, 2]
    msg = _one_line_error(_write(tmp_path, raw))
    assert "'train' must be a mapping" in msg, msg


@pytest.mark.parametrize(
    ("section", "key", "value", "options"),
    [
        ("laplace", "structure", "full", ("'kron'", "'diag'")),
        ("laplace", "fisher", "empirical", ("'exact'", "'mc'")),
        ("predictive", "method", "laplace", ("'mc'", "'probit'")),
        (None, "device", "tpu", ("'auto'", "'cpu'", "'cuda'")),
        ("data", "name", "mnist", ("'synthetic'", "'cifar10'", "'cifar100'")),
    ],
)
def test_literal_rejected_with_options(section, key, value, options, tmp_path):
    raw = _raw("smoke")
    (raw if section is None else raw[section])[key] = value
    msg = _one_line_error(_write(tmp_path, raw))
    dotted = key if section is None else f"{section}.{key}"
    assert f"'{dotted}' is '{value}'" in msg, msg
    for option in options:
        assert option in msg, msg


def test_missing_file_names_file_and_lists_profiles(tmp_path):
    path = tmp_path / "nope.yml"
    msg = _one_line_error(path)
    assert "not found" in msg
    for profile in PROFILES:
        assert profile in msg, msg


def test_invalid_yaml_and_non_mapping(tmp_path):
    bad = tmp_path / "syntax.yml"
    bad.write_text("train: {epochs: 3\n")
    assert "not valid YAML" in _one_line_error(bad)
    listy = tmp_path / "list.yml"
    listy.write_text("- 1\n- 2\n")
    assert "must be a mapping" in _one_line_error(listy)


def test_missing_cifar10_root_names_data_root_and_fix(tmp_path):
    raw = _raw("cifar10-transfer")
    raw["data"]["root"] = str(tmp_path / "absent")
    msg = _one_line_error(_write(tmp_path, raw))
    assert "data.root" in msg and str(tmp_path / "absent") in msg, msg
    assert "python -m lib.data materialize-cifar10" in msg, msg


def test_cifar10_root_without_the_dataset_folder_is_rejected(tmp_path):
    """An existing root that lacks ``cifar-10-batches-py/`` is as unusable as a missing one."""
    raw = _raw("cifar10-transfer")
    raw["data"]["root"] = str(tmp_path)
    msg = _one_line_error(_write(tmp_path, raw))
    assert "data.root" in msg and "cifar-10-batches-py" in msg, msg
    (tmp_path / "cifar-10-batches-py").mkdir()
    assert load_params(_write(tmp_path, raw))["data"]["root"] == str(tmp_path)


def test_missing_cifar100_root_suggests_download(tmp_path):
    raw = _raw("vit-b16-cifar100")
    raw["data"].update(root=str(tmp_path / "absent"), download=False)
    msg = _one_line_error(_write(tmp_path, raw))
    assert "data.root" in msg and "data.download: true" in msg, msg
    raw["data"]["download"] = True  # downloadable: the root need not exist yet
    assert load_params(_write(tmp_path, raw))["data"]["download"] is True


def test_relative_data_root_resolves_against_repo():
    from lib.paths import ROOT

    cfg = Config.from_dict({"data": {"name": "cifar10", "root": "data"}})
    assert cfg.data_root == ROOT / "data"
    cfg = Config.from_dict({"data": {"name": "cifar10", "root": "/abs/where"}})
    assert cfg.data_root == Path("/abs/where")


def test_section_selects_plain_dicts():
    cfg = Config.from_dict({"train": {"lr": 0.5}, "model": {"kwargs": {"img_size": 16}}})
    sec = cfg.section("model", "train")
    assert set(sec) == {"model", "train"}
    assert sec["train"]["lr"] == 0.5 and sec["model"]["kwargs"] == {"img_size": 16}
    assert cfg.train == TrainConfig(lr=0.5) and cfg.model == ModelConfig(kwargs={"img_size": 16})
    assert cfg.laplace == LaplaceConfig()


def test_check_data_false_skips_only_the_data_root(tmp_path):
    """Hashing a profile (freshness test, CI) needs no dataset; validation of keys still applies."""
    path = tmp_path / "p.yml"
    path.write_text("data: {name: cifar10, root: /nonexistent, num_classes: 10}\n")
    with pytest.raises(ParamsError, match="data.root"):
        load_params(path)
    assert load_params(path, check_data=False)["data"]["root"] == "/nonexistent"
    path.write_text("data: {name: cifar10, roott: /nonexistent}\n")
    with pytest.raises(ParamsError, match="data.root"):
        load_params(path, check_data=False)


def test_bounds_accept_their_edge_values(tmp_path):
    raw = _raw("smoke")
    raw["deploy"]["n_warmup"] = 0
    raw["predictive"]["n_samples"] = 2
    raw["laplace"]["fit_size"] = 1
    cfg = Config.from_dict(load_params(_write(tmp_path, raw, "ok.yml")))
    assert (cfg.deploy.n_warmup, cfg.predictive.n_samples, cfg.laplace.fit_size) == (0, 2, 1)


@pytest.mark.parametrize(("key", "value"), [("val_size", 10), ("test_size", 10), ("train_per_class", 3), ("classes", [0, 1])])
def test_cifar_only_data_keys_are_rejected_for_synthetic_data(key, value, tmp_path):
    raw = _raw("smoke")
    raw["data"][key] = value
    msg = _one_line_error(_write(tmp_path, raw))
    assert f"'data.{key}' applies to cifar10/cifar100 only" in msg and "data.synthetic" in msg, msg


@pytest.mark.parametrize("key", ["drop_rate", "attn_drop_rate", "drop_path_rate"])
def test_model_dropout_is_rejected(key, tmp_path):
    raw = _raw("smoke")
    raw["model"]["kwargs"][key] = 0.1
    msg = _one_line_error(_write(tmp_path, raw))
    assert f"'model.kwargs.{key}' is 0.1; dropout must stay 0" in msg, msg
    raw["model"]["kwargs"][key] = 0.0
    assert Config.from_dict(load_params(_write(tmp_path, raw, "ok.yml"))).model.kwargs[key] == 0.0


def test_lora_dropout_is_not_a_key(tmp_path):
    raw = _raw("smoke")
    raw["lora"]["dropout"] = 0.1
    msg = _one_line_error(_write(tmp_path, raw))
    assert "unknown key 'lora.dropout'" in msg, msg


@pytest.mark.parametrize("value", [[1.0], [10.0, 1.0], [0.0, 1.0]])
def test_bad_scale_range_names_the_key(value, tmp_path):
    raw = _raw("smoke")
    raw["predictive"]["scale_range"] = value
    msg = _one_line_error(_write(tmp_path, raw))
    assert f"'predictive.scale_range' is {value}; give two numbers [low, high] with 0 < low < high" in msg, msg


@pytest.mark.parametrize(("profile", "size"), [("smoke", 4 * 16 * 64), ("cifar10-transfer", 24_576),
                                               ("vit-b16-cifar100", 196_608)])
def test_lora_block_params_of_the_profiles(profile, size):
    """r · Σ_targets (in + out) of a timm ViT block: r · 16 D for qkv, proj, fc1, fc2 (mlp_ratio 4)."""
    cfg = Config.from_dict(_raw(profile))
    assert lora_block_params(cfg.model, cfg.lora) == size
    assert DENSE_BLOCK_MAX_PARAMS >= 24_576  # cifar10-transfer's blocks fit a dense block


def test_dense_block_accepted_where_blocks_are_small(tmp_path):
    raw = _raw("smoke")
    raw["laplace"]["structure"] = "dense_block"
    assert load_params(_write(tmp_path, raw))["laplace"]["structure"] == "dense_block"


@pytest.mark.parametrize(("key", "value"), [("structure", "dense_block"), ("quality_images", 10)])
def test_dense_block_rejected_for_large_blocks(key, value, tmp_path):
    """vit-b16-cifar100 has 196,608 LoRA parameters per block: a dense block GGN is refused, naming the key."""
    raw = _with_data_root(_raw("vit-b16-cifar100"), tmp_path)
    raw["laplace"][key] = value
    msg = _one_line_error(_write(tmp_path, raw))
    assert f"'laplace.{key}'" in msg and "196608" in msg and str(DENSE_BLOCK_MAX_PARAMS) in msg, msg


def test_rank_rejected_for_dense_block(tmp_path):
    raw = _raw("smoke")
    raw["laplace"].update(structure="dense_block", rank=4)
    msg = _one_line_error(_write(tmp_path, raw))
    assert "'laplace.rank'" in msg, msg


def test_negative_quality_images_rejected(tmp_path):
    raw = _raw("smoke")
    raw["laplace"]["quality_images"] = -1
    msg = _one_line_error(_write(tmp_path, raw))
    assert "'laplace.quality_images' is -1" in msg, msg


@pytest.mark.parametrize("text, key, value", [
    ("stats.n_bins=20", "stats.n_bins", 20),
    ("seeds=[0,1]", "seeds", [0, 1]),
    ("laplace.rank=null", "laplace.rank", None),
    ("laplace.kfac=expand", "laplace.kfac", "expand"),
    ("predictive.scale_range=[0.001, 1]", "predictive.scale_range", [0.001, 1]),
    ("model.kwargs={img_size: 32}", "model.kwargs", {"img_size": 32}),
])
def test_parse_override_reads_the_value_as_yaml(text, key, value):
    from lib.config import parse_override

    assert parse_override(text) == (key, value)


def test_overrides_are_validated_like_the_file():
    from lib.config import parse_override

    path = params_path("smoke")
    base = load_params(path)
    new = load_params(path, overrides=[parse_override("stats.n_bins=20"), parse_override("seeds=[0,1]")])
    assert new["stats"]["n_bins"] == 20 and new["seeds"] == [0, 1]
    assert {k: v for k, v in new.items() if k not in ("stats", "seeds")} == \
        {k: v for k, v in base.items() if k not in ("stats", "seeds")}
    assert {k: v for k, v in new["stats"].items() if k != "n_bins"} == \
        {k: v for k, v in base["stats"].items() if k != "n_bins"}
    for overrides, expected in [
        ([("stats.n_binz", 20)], r"with --set stats\.n_binz=20: unknown key 'stats\.n_binz'; did you mean 'stats\.n_bins'"),
        ([("stats.n_bins", 0)], r"'stats\.n_bins' is 0; it must be ≥ 1"),
        ([("stats.n_bins", "many")], r"'stats\.n_bins' must be int, got 'many'"),
        ([("laplace.kfac", "both")], r"'laplace\.kfac' is 'both'; use one of 'expand', 'reduce'"),
        ([("seeds.first", 1)], r"'seeds' is \[.*\], not a section"),
    ]:
        with pytest.raises(ParamsError, match=expected) as err:
            load_params(path, overrides=overrides)
        assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_overridden_params_get_their_own_artifact_keys():
    """Stage keys hash the validated sections a stage reads, so a stage is reused under overrides
    only when none of its inputs changed (here: the MAP stage under a statistics override)."""
    from lib.artifacts import stage_key

    path = params_path("smoke")

    def key(params: dict, *sections: str) -> str:
        return stage_key("s", Config.from_dict(params).section(*sections))

    base = load_params(path)
    lr = load_params(path, overrides=[("train.lr", 0.5)])
    bins = load_params(path, overrides=[("stats.n_bins", 20)])
    assert key(lr, "data", "model", "lora", "train") != key(base, "data", "model", "lora", "train")
    assert key(bins, "stats") != key(base, "stats")
    assert key(bins, "data", "model", "lora", "train") == key(base, "data", "model", "lora", "train")


def test_baselines_section():
    """Optional; nested keys of every method named in errors; the ensembles' sizes are bounded by
    the number of seeds (their members are the study's MAP models)."""
    assert Config.from_dict({}).baselines is None
    b = Config.from_dict({"seeds": [0, 1, 2], "baselines": {"ensemble": {"sizes": [2, 3]}, "mc_dropout": {"samples": 8},
                                                            "last_layer": {"structure": "full"}}}).baselines
    assert b.ensemble.sizes == (2, 3) and b.mc_dropout.samples == 8 and b.last_layer.structure == "full"
    assert b.variational.kl_scale == 0.1 and b.finetune.epochs == 6 and b.variational.min_ranks == 2
    from lib.baselines.result import baseline_seeds
    few = Config.from_dict({"seeds": [4, 1, 2], "baselines": {"seeds": 2, "ensemble": {"sizes": [3]}}})
    assert baseline_seeds(few) == [4, 1] and baseline_seeds(Config.from_dict({"seeds": [4, 1], "baselines": {"ensemble": {"sizes": [2]}}})) == [4, 1]
    bad = [({"baselines": {"ensemble": {"size": [3]}}}, "unknown key 'baselines.ensemble.size'"),
           ({"baselines": {"ensembles": {}}}, "unknown key 'baselines.ensembles'"),
           ({"baselines": {"finetune": {"epoch": 3}}}, "unknown key 'baselines.finetune.epoch'"),
           ({"baselines": {"last_layer": {"structure": "diag"}}}, "baselines.last_layer.structure"),
           ({"baselines": {"last_layer": {"marglik_steps": 0}}}, "baselines.last_layer.marglik_steps"),
           ({"baselines": {"mc_dropout": {"rate": 1.0}}}, "baselines.mc_dropout.rate"),
           ({"baselines": {"variational": {"kl_scale": 0.0}}}, "baselines.variational.kl_scale"),
           ({"baselines": {"ensemble": {"sizes": [0]}}}, "distinct ensemble sizes"),
           ({"seeds": [0, 1], "baselines": {"ensemble": {"sizes": [3]}}}, "'seeds' has 2"),
           ({"seeds": [0, 1], "baselines": {"seeds": 3, "ensemble": {"sizes": [2]}}}, "'baselines.seeds' is 3"),
           ({"baselines": {"seeds": 0}}, "baselines.seeds")]
    for d, match in bad:
        with pytest.raises(ParamsError, match=match):
            Config.from_dict(d, source="p.yml")


@pytest.mark.parametrize(("laplace", "name"), [
    ({"structure": "kron", "kfac": "reduce"}, "K-FAC-reduce"), ({"structure": "kron", "kfac": "expand"}, "K-FAC-expand"),
    ({"structure": "diag"}, "diagonal"), ({"structure": "dense_block", "quality_images": 0}, "dense block"),
])
def test_laplace_approximation_is_named_from_structure_and_kfac(laplace, name):
    assert LaplaceConfig(**laplace).approximation == name
