"""--report_to: metrics go to accelerate's trackers (TensorBoard by default), or nowhere but metrics.jsonl."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from rto.config import ConfigError
from rto.runtime import Run, make_accelerator, read_metrics
from rto.stages.dpo import DPOConfig


def scalars(tb: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files under `tb`: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[tuple[int, float]]] = {}
    for folder in sorted({events.parent for events in tb.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # reads the folder's files in order
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return found


def logged_run(tmp_path, report_to: str) -> Path:
    cfg = DPOConfig(out=str(tmp_path / report_to), report_to=report_to, progress=False)
    run = Run(cfg.out, cfg, accelerator=make_accelerator("fp32", cfg.report_to, cfg.out), stage="dpo")
    for step in (1, 2, 3):
        run.log(step, {"loss": 1.0 / step, "note": "text is kept in metrics.jsonl only"})
    run.finish({"steps": 3})
    return Path(cfg.out)


def test_tensorboard_is_the_default_and_gets_every_logged_scalar(tmp_path):
    assert DPOConfig().report_to == "tensorboard"
    out = logged_run(tmp_path, "tensorboard")
    found = scalars(out / "tb")
    assert sorted(found["loss"]) == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert "note" not in found and "step" not in found and "time_s" in found
    assert [row["loss"] for row in read_metrics(out)] == [1.0, 0.5, 1 / 3]
    assert list((out / "tb").glob("events.out.tfevents.*")), "events lie in tb/ itself, as before"


def test_none_writes_no_events_but_keeps_metrics_jsonl(tmp_path):
    out = logged_run(tmp_path, "none")
    assert not list(out.rglob("events.out.tfevents.*")) and not (out / "tb").exists()
    assert len(read_metrics(out)) == 3


def test_a_resumed_run_drops_the_events_logged_after_its_checkpoint(tmp_path):
    from rto.checkpoint import save_checkpoint

    cfg = DPOConfig(out=str(tmp_path / "r"), progress=False)
    run = Run(cfg.out, cfg, accelerator=make_accelerator("fp32", "tensorboard", cfg.out))
    for step in (1, 2, 3):
        run.log(step, {"loss": float(step)})
    checkpoint = save_checkpoint(run.dir, 2, {}, {}, {"step": 2})
    run.close()  # as if killed after step 3
    run = Run(cfg.out, cfg, resume_from=checkpoint, accelerator=make_accelerator("fp32", "tensorboard", cfg.out))
    run.log(3, {"loss": 30.0})
    run.close()
    assert sorted(scalars(Path(cfg.out) / "tb")["loss"]) == [(1, 1.0), (2, 2.0), (3, 30.0)]


@pytest.mark.parametrize("tracker", ["wandb", "mlflow", "trackio"])
def test_a_missing_tracker_package_is_one_line_naming_its_extra(monkeypatch, tracker):
    monkeypatch.setitem(sys.modules, tracker, None)  # `import <tracker>` now fails as if it were not installed
    with pytest.raises(ConfigError) as e:
        DPOConfig(report_to=tracker)
    message = str(e.value)
    assert "\n" not in message and f"rto-rlhf[{tracker}]" in message and f"--report_to {tracker}" in message


def test_the_command_line_stops_before_anything_runs(monkeypatch, capsys, tmp_path):
    from rto.cli import main

    monkeypatch.setitem(sys.modules, "wandb", None)
    out = tmp_path / "never"
    assert main(["dpo", "--out", str(out), "--report_to", "wandb"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "optional extra 'wandb'" in err and not out.exists()
    with pytest.raises(ConfigError, match="report_to must be one of tensorboard, wandb, mlflow, trackio, none"):
        DPOConfig(report_to="comet")


def test_pipeline_and_demo_pass_report_to_on_to_every_stage(tmp_path, monkeypatch):
    from rto.config import ConfigError
    from rto.stages import pipeline

    recipe = pipeline.demo_recipe()
    configs = pipeline.stage_configs(pipeline.load_recipe(recipe), recipe, {"out": str(tmp_path), "report_to": "none"})
    tracked = [cfg.report_to for _, _, cfg in configs if hasattr(cfg, "report_to")]
    assert len(tracked) >= 5 and set(tracked) == {"none"}
    unset = pipeline.stage_configs(pipeline.load_recipe(recipe), recipe, {"out": str(tmp_path), "report_to": None})
    assert {cfg.report_to for _, _, cfg in unset if hasattr(cfg, "report_to")} == {"tensorboard"}
    with pytest.raises(ConfigError, match="report_to"):
        pipeline.PipelineConfig(recipe=recipe, report_to="bogus")
    seen = []
    monkeypatch.setattr(pipeline, "run", lambda cfg: seen.append(cfg) or tmp_path)
    pipeline.demo(pipeline.DemoConfig(out=str(tmp_path), report_to="none"))
    assert seen[0].report_to == "none"
