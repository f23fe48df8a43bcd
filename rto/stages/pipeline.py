"""`rto pipeline RECIPE.yaml` and `rto demo`: run stages in order, skipping finished ones.

A recipe is YAML:

    title: my run
    out: runs/mine                 # the run folder; "{run}" in any string below stands for it
    defaults: {seed: 0}            # applied to every stage that has the field
    stages:
      - {name: pairs, stage: pairs, num_prompts: 320}
      - {name: rm, stage: rm, pairs: "{run}/pairs/pairs.jsonl"}
      ...

A recipe may start from another: `base: demo.yaml` (a built-in recipe, or a path relative to the recipe)
takes the base's title, out, defaults and stages; the recipe's own `defaults` are added to the base's, and each
of its `stages` entries names a stage of the base and changes only the fields it gives.

Each stage writes to `{run}/{name}` unless it sets `out`. A stage that already finished there with the
same config is skipped and an unfinished one continues from its last checkpoint, so re-running a
pipeline after a crash loses at most the steps since the last checkpoint. A stage whose folder holds
the results of a different config stops the pipeline unless `overwrite` is set.
"""

from __future__ import annotations

import dataclasses
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from rto.config import check_fields
from rto.distributed import broadcast, is_main
from rto.runtime import check_name, check_report_to, claim_run_folder, finished_summary, inside
from rto.stages.registry import STAGES, parse_config

ALWAYS_RUN = {"report"}  # cheap, and should reflect the latest results


@dataclass
class PipelineConfig:
    """Fields of `rto pipeline`: a recipe's stages in order, with settings that override every stage's."""

    recipe: str
    """Path of the recipe YAML."""
    out: str | None = None
    """The run folder ("{run}" in the recipe; a stage writes to {run}/NAME unless it sets `out`); null = the
    recipe's `out`."""
    seed: int | None = None
    """Seed of every stage; null = as in the recipe; >= 0."""
    precision: str | None = None
    """Precision of every stage, auto | fp32 | bf16; null = as in the recipe."""
    threads: int | None = None
    """torch CPU threads of every stage; null = as in the recipe; >= 1."""
    progress: bool = True
    """Show progress bars (in every stage)."""
    overwrite: bool | None = None
    """Replace the results of stages whose config changed since they ran; null = as in the recipe."""
    report_to: str | None = None
    """Where every stage's metrics also go: tensorboard | wandb | mlflow | trackio | none (rto.runtime.TRACKERS);
    null = as in the recipe (tensorboard unless it says otherwise)."""

    def __post_init__(self):
        check_fields(self)
        if self.report_to is not None:
            check_report_to(self.report_to)


def _fill(value, run_dir: str):
    if isinstance(value, str):
        return value.replace("{run}", run_dir)
    if isinstance(value, list):
        return [_fill(v, run_dir) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, run_dir) for k, v in value.items()}
    return value


def stage_configs(recipe: dict, source: str, overrides: dict) -> list[tuple[str, str, object]]:
    """Recipe dict -> [(name, stage, config)], every entry parsed and checked as on the command line
    (registry.parse_config), before anything runs; errors name the recipe, the stage and the field.

    A stage writes to `{run}/{name}` unless it sets `out`; a relative `out` must stay inside the recipe's run
    folder (an absolute path is taken as written, on purpose)."""
    run_dir = str(overrides.get("out") or recipe.get("out") or "runs/pipeline")
    defaults = {**(recipe.get("defaults") or {}), **{k: v for k, v in overrides.items() if k != "out" and v is not None}}
    entries = recipe.get("stages")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{source}: needs a non-empty `stages` list")
    out, names = [], set()
    for i, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            raise ValueError(f"{source}: stage {i} is a {type(entry).__name__}; each stage is a mapping with `stage`")
        entry = dict(entry)
        stage = entry.pop("stage", None)
        if stage not in STAGES:
            raise ValueError(f"{source}: stage {i} has stage {stage!r}; use one of: {', '.join(STAGES)}")
        name = check_name(str(entry.pop("name", stage)), f"{source}: stage {i} name")
        if name in names:
            raise ValueError(f"{source}: two stages are named {name!r}; give each stage its own name")
        names.add(name)
        config_cls = STAGES[stage][0]
        known = {f.name for f in dataclasses.fields(config_cls)}
        unknown = sorted(set(entry) - known)
        if unknown:
            raise ValueError(f"{source}: stage {name!r} ({stage}) has unknown fields {unknown}; known: {sorted(known)}")
        values = {k: v for k, v in defaults.items() if k in known}
        values.update(entry)
        values.setdefault("out", f"{{run}}/{name}")
        if stage == "report" and recipe.get("title"):
            values.setdefault("title", recipe["title"])  # a report is titled as its recipe unless it says otherwise
        written = str(values["out"])  # as the recipe wrote it, before "{run}" is filled in
        values = _fill(values, run_dir)
        raw_out = str(values["out"])
        if not Path(written).is_absolute() and not inside(raw_out, run_dir):
            raise ValueError(f"{source}: stage {name!r} writes to {raw_out!r}, outside the run folder {run_dir!r}; "
                             "use a path under \"{run}\" (or an absolute path, taken as written)")
        out.append((name, stage, parse_config(stage, values, f"{source}: stage {name!r} ({stage})")))
    return out


def _read_recipe(path) -> dict:
    try:
        recipe = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read the recipe: {str(e).splitlines()[0]}") from None
    if not isinstance(recipe, dict):
        raise ValueError(f"{path}: a recipe is a YAML mapping with `out` and `stages`")
    return recipe


def load_recipe(path: str, _seen: tuple[str, ...] = ()) -> dict:
    """The recipe at `path` with its `base` (if any) merged in: the base's keys, `defaults` added to, and each
    stage entry of the recipe laid over the base's stage of the same name (see the module docstring)."""
    recipe = _read_recipe(path)
    base = recipe.pop("base", None)
    if base is None:
        return recipe
    local = Path(path).parent / str(base)
    base_path = str(local if local.is_file() else resources.files("rto.recipes").joinpath(str(base)))
    if base_path in _seen or str(path) == base_path:
        raise ValueError(f"{path}: its base {base!r} leads back to itself")
    merged = load_recipe(base_path, (*_seen, str(path)))
    stages = [dict(entry) for entry in merged.get("stages") or []]
    by_name = {str(entry.get("name", entry.get("stage"))): entry for entry in stages}
    for entry in recipe.pop("stages", None) or []:
        name = str(entry.get("name", entry.get("stage"))) if isinstance(entry, dict) else None
        if name not in by_name:
            raise ValueError(f"{path}: stage {name!r} is not a stage of its base {base!r} ({', '.join(by_name)}); "
                             "a recipe with a base changes the base's stages by name")
        by_name[name].update(entry)
    defaults = {**(merged.get("defaults") or {}), **(recipe.pop("defaults", None) or {})}
    return {**merged, **recipe, "defaults": defaults, "stages": stages}


def run(cfg: PipelineConfig) -> Path:
    source = str(cfg.recipe)
    recipe = load_recipe(source)
    overrides = {"out": cfg.out, "seed": cfg.seed, "precision": cfg.precision, "threads": cfg.threads,
                 "progress": cfg.progress, "overwrite": cfg.overwrite, "report_to": cfg.report_to}
    configs = stage_configs(recipe, source, overrides)
    run_dir = Path(cfg.out or recipe.get("out") or "runs/pipeline")
    main = is_main()  # with several processes, process 0 writes the pipeline's files and decides what to skip
    # rto's own folder, one pipeline at a time; each stage claims its own too
    with claim_run_folder(run_dir) if main else nullcontext():
        state_path = run_dir / "pipeline.json"
        state = json.loads(state_path.read_text()) if main and state_path.exists() else {}
        state.update({"recipe": source, "phase_times": state.get("phase_times", {})})
        if main:
            (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        for name, stage, config in configs:
            done = broadcast(main and stage not in ALWAYS_RUN and finished_summary(config) is not None)
            if done:
                if main:
                    print(f"pipeline: {name} already done in {config.out}; skipping")
                continue
            if main:
                print(f"pipeline: {name} ({stage}) -> {config.out}", flush=True)
            started = time.time()
            STAGES[stage][1](config)
            if stage not in ALWAYS_RUN:
                state["phase_times"][name] = round(time.time() - started, 2)
            if main:
                state_path.write_text(json.dumps(state, indent=2))
    return run_dir


DEMO_RECIPE = "demo.yaml"


def demo_recipe() -> str:
    """Path of the built-in demo recipe (copy it to start a recipe of your own)."""
    return str(resources.files("rto.recipes").joinpath(DEMO_RECIPE))


@dataclass
class DemoConfig:
    """Fields of `rto demo`: the built-in recipe rto/recipes/demo.yaml, then the report."""

    out: str = "runs/demo"
    """The run folder: one folder per stage, then report.md and report.html."""
    seed: int | None = None
    """Seed of every stage; null = the recipe's (0); >= 0."""
    precision: str | None = None
    """Precision of every stage, auto | fp32 | bf16; null = each stage's default (auto)."""
    threads: int | None = None
    """torch CPU threads of every stage; null = torch's default; >= 1."""
    progress: bool = True
    """Show progress bars (in every stage)."""
    overwrite: bool | None = None
    """Replace the results of stages whose config changed since they ran; null = no."""
    report_to: str | None = None
    """Where every stage's metrics also go: tensorboard | wandb | mlflow | trackio | none (rto.runtime.TRACKERS);
    null = tensorboard."""

    def __post_init__(self):
        check_fields(self)
        if self.report_to is not None:
            check_report_to(self.report_to)


def demo(cfg: DemoConfig) -> Path:
    """The whole RTO pipeline on the embedded default (recipe rto/recipes/demo.yaml), then the report."""
    started = time.time()
    run_dir = run(PipelineConfig(recipe=demo_recipe(), out=cfg.out, seed=cfg.seed, precision=cfg.precision,
                                 threads=cfg.threads, progress=cfg.progress, overwrite=cfg.overwrite,
                                 report_to=cfg.report_to))
    print(f"demo: finished in {time.time() - started:.0f} s; open {run_dir / 'report.html'} (or report.md)")
    return run_dir
