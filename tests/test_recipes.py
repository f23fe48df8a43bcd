"""The built-in recipes (rto/recipes/*.yaml): each loads, with its base merged, and every stage entry passes the
typed parsing and range checks; a recipe with a base changes only what it names."""

from __future__ import annotations

from importlib import resources

import pytest
import yaml

from rto.stages.pipeline import load_recipe, stage_configs

RECIPES = sorted(p.name for p in resources.files("rto.recipes").iterdir() if p.name.endswith(".yaml"))
METHODS = {  # recipe -> (stage name, field, value) that sets its method
    "ipo.yaml": [("dpo", "loss", "ipo")],
    "rdpo.yaml": [("dpo", "loss", "rdpo")],
    "simpo.yaml": [("dpo", "loss", "simpo"), ("dpo", "beta", 2.5), ("rto", "beta_dpo", 1.0)],
    "tdpo.yaml": [("dpo", "loss", "tdpo2")],
    "semi-rto.yaml": [("rto", "granularity", "sentence")],
    "delayed.yaml": [("rto", "granularity", "delayed")],
    "rs-ppo.yaml": [("rto", "granularity", "shaping")],
    "grpo.yaml": [(stage, field, value) for stage in ("ppo", "rto") for field, value in (("estimator", "grpo"),
                                                                                         ("group_size", 4))],
    "rloo.yaml": [(stage, field, value) for stage in ("ppo", "rto") for field, value in (("estimator", "rloo"),
                                                                                         ("group_size", 4))],
    "reinforce-pp.yaml": [("ppo", "estimator", "reinforce++"), ("rto", "estimator", "reinforce++")],
}


SCALE = {"paper-8b.yaml", "lora-24gb.yaml"}  # real-scale recipes on UltraFeedback files: no pairs stage; their
# values are checked against the paper in tests/test_scale_recipes.py


def _configs(name: str, out: str) -> dict:
    path = str(resources.files("rto.recipes").joinpath(name))
    return {stage_name: cfg for stage_name, _, cfg in stage_configs(load_recipe(path), path, {"out": out})}


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_loads_and_checks(name, tmp_path):
    configs = _configs(name, str(tmp_path / "run"))
    assert {"rm", "dpo", "ppo", "rto", "eval", "report"} | (set() if name in SCALE else {"pairs"}) <= configs.keys()
    assert all(str(c.out).startswith(str(tmp_path / "run")) for c in configs.values())
    assert configs["report"].title == load_recipe(str(resources.files("rto.recipes").joinpath(name)))["title"]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_recipe_changes_only_its_method(name, tmp_path):
    demo, method = _configs("demo.yaml", str(tmp_path / "run")), _configs(name, str(tmp_path / "run"))
    changed = {(stage, field) for stage, field, _ in METHODS[name]}
    for stage, field, value in METHODS[name]:
        assert getattr(method[stage], field) == value
    for stage in demo:  # everything else is the demo's
        for field in vars(demo[stage]):
            if (stage, field) not in changed and not (stage == "report" and field == "title"):
                assert getattr(method[stage], field) == getattr(demo[stage], field), (stage, field)
    assert set(METHODS) | {"demo.yaml", "ifeval.yaml"} | SCALE == set(RECIPES)  # every method recipe is checked here


def _write(path, recipe):
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_a_base_is_merged_by_stage_name(tmp_path):
    _write(tmp_path / "base.yaml", {"title": "base", "out": "runs/b", "defaults": {"seed": 1, "train_layers": 2},
                                    "stages": [{"stage": "pairs", "num_prompts": 8},
                                               {"name": "rto", "stage": "ppo", "reward": "sparse", "iterations": 3}]})
    child = _write(tmp_path / "child.yaml", {"base": "base.yaml", "out": "runs/c", "defaults": {"seed": 2},
                                             "stages": [{"name": "rto", "iterations": 5}]})
    assert load_recipe(child) == {
        "title": "base", "out": "runs/c", "defaults": {"seed": 2, "train_layers": 2},
        "stages": [{"stage": "pairs", "num_prompts": 8},
                   {"name": "rto", "stage": "ppo", "reward": "sparse", "iterations": 5}]}


def test_a_base_that_lacks_the_stage_or_loops_is_refused(tmp_path):
    _write(tmp_path / "base.yaml", {"out": "x", "stages": [{"stage": "pairs"}]})
    child = _write(tmp_path / "child.yaml", {"base": "base.yaml", "stages": [{"name": "rm", "epochs": 2}]})
    with pytest.raises(ValueError, match=r"stage 'rm' is not a stage of its base 'base.yaml' \(pairs\)"):
        load_recipe(child)
    _write(tmp_path / "a.yaml", {"base": "b.yaml", "stages": []})
    _write(tmp_path / "b.yaml", {"base": "a.yaml", "stages": []})
    with pytest.raises(ValueError, match="leads back to itself"):
        load_recipe(str(tmp_path / "a.yaml"))
