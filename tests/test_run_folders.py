"""Run folders are safe by default: rto writes only into a new or empty folder or one it made, never through a
symbolic link, one process at a time, and names that become file names stay inside the run folder.

Every test works on real files in temporary folders and compares every byte of the user's files before and after.
"""

import gc
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rto import runtime
from rto.checkpoint import CheckpointError, list_checkpoints, remove_checkpoints, save_checkpoint
from rto.cli import main
from rto.models import atomic_folder
from rto.runtime import (LOCK_FILE, RUN_MARKER, RunBusy, RunFolderError, check_name, check_run_folder,
                         claim_run_folder, inside)
from rto.stages.eval import parse_model

REPO = Path(__file__).resolve().parents[1]


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under `root` -> the sha256 of a file, 'dir', or 'link -> target' (links are not followed)."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                found[key] = f"link -> {os.readlink(path)}"
            elif path.is_dir():
                found[key] = "dir"
            else:
                found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def user_folder(root: Path) -> Path:
    """A folder of the user's own that looks like a run folder: model/, checkpoints/step-00000000, tb/, config.yaml
    and metrics.jsonl, none of them written by rto."""
    root.mkdir(parents=True)
    for rel, data in {"model/model.safetensors": b"my weights", "model/config.json": b'{"mine": true}',
                      "checkpoints/step-00000000/weights.safetensors": b"my checkpoint",
                      "tb/events.out.tfevents.1": b"my events", "config.yaml": b"lr: 1\n",
                      "metrics.jsonl": b'{"step": 1, "loss": 0.5}\n', "notes.txt": b"keep me"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Describe item {i}.", "chosen": "A lovely, great thing.",
                                        "rejected": "A sad, bad thing."}) + "\n" for i in range(8)))
    return str(path)


def dpo_argv(model: str, pairs: str, out, *extra: str) -> list[str]:
    return ["dpo", "--model", model, "--pairs", pairs, "--out", str(out), "--batch_size", "2", "--epochs", "1",
            "--eval_fraction", "0.25", "--train_layers", "2", "--checkpoint_every", "1", "--progress", "false",
            *extra]


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(autouse=True)
def no_folder_left_held():
    yield
    gc.collect()
    assert not runtime._HELD, f"run folders still held: {list(runtime._HELD)}"


# ---------------------------------------------------------------------------------------------- ownership


@pytest.mark.parametrize("flags", [[], ["--resume", "false"], ["--overwrite", "true"],
                                   ["--resume", "false", "--overwrite", "true"], ["--resume", "true"]])
def test_a_folder_rto_did_not_make_is_refused_whatever_the_flags(tmp_path, tiny_model, pairs, capsys, flags):
    folder = user_folder(tmp_path / "mine")
    before = snapshot(folder)
    err = one_line_error(capsys, dpo_argv(tiny_model, pairs, folder, *flags))
    assert f"run folder {folder} is not empty and was not made by rto" in err and RUN_MARKER in err
    assert snapshot(folder) == before


def test_an_empty_out_is_refused_and_the_current_folder_untouched(tmp_path, tiny_model, pairs, capsys,
                                                                    monkeypatch):
    here = user_folder(tmp_path / "here")
    monkeypatch.chdir(here)
    before = snapshot(here)
    for flags in ([], ["--overwrite", "true", "--resume", "false"]):
        err = one_line_error(capsys, dpo_argv(tiny_model, pairs, "", *flags))
        assert "out" in err and "empty" in err
    with pytest.raises(RunFolderError, match=r"\(--out\) is empty"):
        claim_run_folder("")
    one_line_error(capsys, dpo_argv(tiny_model, pairs, "."))  # the current folder is the user's too
    assert snapshot(here) == before


def test_a_file_as_out_is_refused(tmp_path, tiny_model, pairs, capsys):
    out = tmp_path / "file"
    out.write_text("mine")
    assert "is a file, not a folder" in one_line_error(capsys, dpo_argv(tiny_model, pairs, out))
    assert out.read_text() == "mine"


def test_new_and_empty_folders_become_rto_run_folders(tmp_path, tiny_model, pairs, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (tmp_path / "new" / "run", empty):
        assert main(dpo_argv(tiny_model, pairs, out)) == 0
        assert (out / RUN_MARKER).is_file() and (out / "model" / "model.safetensors").exists()
        assert not (out / "checkpoints").exists()
    capsys.readouterr()
    assert main(dpo_argv(tiny_model, pairs, empty)) == 0  # its own folder: accepted again
    assert "already holds this run, finished" in capsys.readouterr().out
    assert main(dpo_argv(tiny_model, pairs, empty, "--resume", "false")) == 0  # and started over
    assert (empty / "DONE").exists() and (empty / LOCK_FILE).read_text() == ""  # the lock went with the run


def test_only_what_rto_wrote_is_deleted_from_its_folder(tmp_path, tiny_model, pairs):
    out = tmp_path / "run"
    assert main(dpo_argv(tiny_model, pairs, out)) == 0
    extra = out / "checkpoints" / "notes.txt"  # something of the user's among rto's checkpoints
    extra.parent.mkdir()
    extra.write_text("mine")
    (out / "checkpoints" / "step-00000009").mkdir()
    assert main(dpo_argv(tiny_model, pairs, out, "--resume", "false")) == 0
    assert extra.read_text() == "mine" and not list_checkpoints(out)


# ---------------------------------------------------------------------------------------------- links


@pytest.mark.parametrize("name", ["checkpoints", "model", "tb", "metrics.jsonl", "config.yaml"])
def test_a_symbolic_link_where_rto_writes_is_refused_before_training(tmp_path, tiny_model, pairs, capsys, name):
    shared = user_folder(tmp_path / "shared")  # e.g. another run's folder
    out = tmp_path / "run"
    assert main(dpo_argv(tiny_model, pairs, out)) == 0  # a run folder of rto's
    target = shared / name
    if (out / name).is_dir():
        shutil.rmtree(out / name)
    else:
        (out / name).unlink(missing_ok=True)
    (out / name).symlink_to(target)
    before, before_run = snapshot(shared), snapshot(out)
    for flags in ([], ["--resume", "false"], ["--resume", "false", "--overwrite", "true"]):
        err = one_line_error(capsys, dpo_argv(tiny_model, pairs, out, *flags))
        assert f"{out / name} is a symbolic link" in err and "remove the link" in err
    assert snapshot(shared) == before and snapshot(out) == before_run  # nothing trained, nothing written


def test_a_link_inside_checkpoints_is_refused(tmp_path, tiny_model, pairs, capsys):
    shared = user_folder(tmp_path / "shared")
    out = tmp_path / "run"
    out.mkdir()
    (out / RUN_MARKER).write_text("")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "step-00000000").symlink_to(shared / "checkpoints" / "step-00000000")
    before = snapshot(shared)
    assert "step-00000000 is a symbolic link" in one_line_error(capsys, dpo_argv(tiny_model, pairs, out))
    assert snapshot(shared) == before


def _module():
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    return model, torch.optim.AdamW(model.parameters())


def test_checkpoints_never_delete_through_a_link(tmp_path):
    shared = user_folder(tmp_path / "shared")
    before = snapshot(shared)
    model, opt = _module()

    linked = tmp_path / "linked"  # checkpoints/ itself is a link to another run's checkpoints
    linked.mkdir()
    (linked / "checkpoints").symlink_to(shared / "checkpoints")
    assert list_checkpoints(linked) == []
    with pytest.raises(CheckpointError, match="is a symbolic link"):
        save_checkpoint(linked, 1, {"m": model}, {"opt": opt}, {"step": 1})
    remove_checkpoints(linked)
    assert (linked / "checkpoints").is_symlink()

    inner = tmp_path / "inner"  # one entry of checkpoints/ is a link: never listed, pruned or removed
    (inner / "checkpoints").mkdir(parents=True)
    (inner / "checkpoints" / "step-00000000").symlink_to(shared / "checkpoints" / "step-00000000")
    for step in (1, 2, 3):
        save_checkpoint(inner, step, {"m": model}, {"opt": opt}, {"step": step}, keep=1)
    assert [p.name for p in list_checkpoints(inner)] == ["step-00000003"]
    remove_checkpoints(inner)
    assert [p.name for p in (inner / "checkpoints").iterdir()] == ["step-00000000"]
    assert snapshot(shared) == before


def test_a_model_folder_that_is_a_link_is_refused_before_anything_is_written(tmp_path):
    shared = user_folder(tmp_path / "shared")
    before = snapshot(shared)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model").symlink_to(shared / "model")
    with pytest.raises(ValueError, match="is a symbolic link"):
        with atomic_folder(tmp_path / "run" / "model") as tmp:
            (tmp / "x").write_text("never")
    assert snapshot(shared) == before
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["model"]


def test_a_replaced_model_folder_keeps_the_old_one_when_the_write_fails(tmp_path):
    folder = tmp_path / "model"
    with atomic_folder(folder) as tmp:
        (tmp / "w").write_text("old")
    with pytest.raises(OSError):
        with atomic_folder(folder) as tmp:
            (tmp / "w").write_text("half")
            raise OSError(28, "No space left on device")
    assert (folder / "w").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["model"]
    with atomic_folder(folder) as tmp:
        (tmp / "w").write_text("new")
    assert (folder / "w").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["model"]


# ---------------------------------------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["sft", "rto-1.5", "ppo_sparse", "A9"])
def test_plain_names_are_accepted(name):
    assert check_name(name, "label") == name


@pytest.mark.parametrize("name, problem", [
    ("", "is empty"), (".", "starts with '.'"), ("..", "starts with '.'"), (".rto-run", "starts with '.'"),
    ("../x", "contains '/'"), ("/abs", "contains '/'"), ("a\\b", "contains '\\\\'"), ("a b", "contains ' '"),
    ("x" * 101, "longer than 100"), ("café", "contains 'é'"),
])
def test_names_that_could_leave_the_folder_are_refused(name, problem):
    with pytest.raises(ValueError, match="stage name") as e:
        check_name(name, "stage name")
    assert problem in str(e.value) and len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize("label", ["../x", "/abs", "../../x/mydata", ".."])
def test_eval_labels_that_are_not_plain_names_are_refused(tmp_path, tiny_model, capsys, label):
    outside = user_folder(tmp_path / "x")
    before = snapshot(outside)
    err = one_line_error(capsys, ["eval", "--ref", tiny_model, "--models", f"[{label}={tiny_model}]",
                                  "--out", str(tmp_path / "run" / "eval"), "--progress", "false"])
    assert f"--models label {label!r}" in err
    assert snapshot(outside) == before and not (tmp_path / "run" / "eval" / "samples").exists()


def test_bare_model_paths_are_labelled_by_their_folder_name():
    assert parse_model("runs/dpo/model") == ("model", "runs/dpo/model")
    assert parse_model("rto = runs/rto/policy") == ("rto", "runs/rto/policy")
    with pytest.raises(ValueError, match=r"folder name of 'runs/\.\.'"):
        parse_model("runs/..")


def test_inside(tmp_path):
    (tmp_path / "run" / "a").mkdir(parents=True)
    (tmp_path / "run" / "out").symlink_to(tmp_path / "elsewhere")
    assert inside(tmp_path / "run" / "a" / "f.jsonl", tmp_path / "run")
    assert inside(tmp_path / "run", tmp_path / "run")
    assert not inside(tmp_path / "run" / ".." / "x", tmp_path / "run")
    assert not inside(tmp_path / "runx", tmp_path / "run")
    assert not inside("/abs/file", tmp_path / "run")
    assert not inside(tmp_path / "run" / "out" / "f", tmp_path / "run")  # through a link, outside


# ---------------------------------------------------------------------------------------------- one writer


def test_claims_nest_within_a_process(tmp_path):
    """A pipeline holds its folder while its stages hold theirs, and its report stage writes into it."""
    root = tmp_path / "pipeline"
    with claim_run_folder(root):
        with claim_run_folder(tmp_path / "pipeline" / "pairs"):
            (root / "pairs" / "pairs.jsonl").write_text("")
        with claim_run_folder(root):  # the report stage: the pipeline's own folder, non-empty and marked
            pass
        assert str(os.path.realpath(root)) in runtime._HELD
    assert not runtime._HELD and check_run_folder(root) == root


HOLD = """
import sys, time
from rto.runtime import claim_run_folder
claim_run_folder(sys.argv[1])
print("HOLDING", flush=True)
time.sleep(300)
"""

SLOW_DPO = """
import sys, time
from rto import runtime
from rto.cli import main
log = runtime.Run.log
def log_then_wait(self, step, metrics):
    log(self, step, metrics)
    if step == 2:
        print("TRAINING", flush=True)
        time.sleep(300)
runtime.Run.log = log_then_wait
sys.exit(main(sys.argv[1:]))
"""


def start_holder(script: str, args: list[str], ready: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.strip() == ready:
            return proc
    proc.kill()
    raise AssertionError(f"the holder exited with {proc.wait()} before saying {ready}")


def files_but_tb(folder: Path) -> dict[str, str]:
    """snapshot() without tb/, which the running process's TensorBoard writer flushes on a timer."""
    return {k: v for k, v in snapshot(folder).items() if not k.startswith("tb")}


def kill(proc: subprocess.Popen) -> None:
    proc.kill()
    assert proc.wait() == -9


def test_a_held_folder_is_refused_and_free_again_after_sigkill(tmp_path):
    out = tmp_path / "run"
    holder = start_holder(HOLD, [str(out)], "HOLDING")
    try:
        busy = rf"in use by another rto process \(pid {holder.pid}: .*{re.escape(str(out))}"
        with pytest.raises(RunBusy, match=busy):
            claim_run_folder(out)
    finally:
        kill(holder)
    claim_run_folder(out).release()


def test_a_second_rto_process_on_a_running_folder_exits_2_at_once(tmp_path, tiny_model, pairs, capsys):
    out = tmp_path / "run"
    argv = dpo_argv(tiny_model, pairs, out)
    first = start_holder(SLOW_DPO, argv, "TRAINING")  # trained 2 steps, checkpointed step 1, then waits
    try:
        before = files_but_tb(out)
        started = time.time()
        second = subprocess.run([sys.executable, "-m", "rto.cli", *argv], cwd=REPO, capture_output=True, text=True,
                                timeout=240)
        took = time.time() - started
        assert second.returncode == 2, second.stderr[-2000:]
        lines = [line for line in second.stderr.splitlines() if "rto dpo" in line]
        assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr[-2000:]
        assert f"in use by another rto process (pid {first.pid}: " in lines[0] and "dpo" in lines[0]
        assert files_but_tb(out) == before  # the second process wrote nothing
        assert took < 120
        assert main(argv) == 2  # from this process too
        assert f"pid {first.pid}" in capsys.readouterr().err
    finally:
        kill(first)
    assert [p.name for p in list_checkpoints(out)] == ["step-00000001"]
    assert main(argv) == 0  # after SIGKILL the lock is gone: the same command resumes
    assert "resuming from" in capsys.readouterr().out and (out / "DONE").exists()


def test_a_failed_stage_releases_its_folder(tmp_path, tiny_model, capsys):
    out = tmp_path / "run"
    assert main(dpo_argv(tiny_model, str(tmp_path / "missing.jsonl"), out)) == 2
    capsys.readouterr()
    gc.collect()
    assert not runtime._HELD
    holder = start_holder(HOLD, [str(out)], "HOLDING")  # another process can take it at once
    kill(holder)


def test_a_run_folder_error_is_a_value_error():
    assert issubclass(RunFolderError, ValueError) and issubclass(RunBusy, RunFolderError)
