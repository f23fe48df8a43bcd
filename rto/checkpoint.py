"""Training checkpoints: everything needed to continue a stage exactly where it stopped.

A checkpoint is a folder `{out}/checkpoints/step-{N:08d}` holding
  weights.safetensors  the trainable parameters of every model (frozen ones come from the start model)
  trainer.pt           optimizer and scheduler states (under DeepSpeed ZeRO, every process's share of the
                       optimizer states: rto.zero), the RNG states of python, numpy and torch
                       (plus any torch.Generator of the stage) and the stage's own state (step, data
                       position, KL coefficient, metrics history...); loaded with weights_only=True
  state.json           step and time, for people; the number of processes, FSDP or not and the ZeRO stage,
                       which a resume must match

It is written into a temporary sibling folder and renamed into place (models.atomic_folder, as for
saved models), so a crash or a full disk during
a save leaves the previous checkpoint as it was; only then are the oldest ones beyond `keep` removed.
(accelerate's save_state writes in place, stores whole models and unpickles RNG files in full, hence
this small module.)
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rto.models import atomic_folder

CHECKPOINTS = "checkpoints"
PREFIX = "step-"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read back."""


def checkpoint_dir(out: str | Path) -> Path:
    return Path(out) / CHECKPOINTS


def list_checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first (temporary folders of interrupted saves are ignored,
    and so are symbolic links: a checkpoint is always a folder this run wrote)."""
    folder = checkpoint_dir(out)
    if not folder.is_dir() or folder.is_symlink():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and not p.is_symlink() and p.name.startswith(PREFIX)
             and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(out: str | Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def checkpoint_step(path: str | Path) -> int:
    return int(Path(path).name[len(PREFIX):])


def trainable(models: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    """{'role/param name': parameter} for every parameter that trains (tied weights appear once)."""
    return {f"{role}/{name}": p for role, model in models.items() for name, p in model.named_parameters()
            if p.requires_grad}


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict:
    """Python, numpy and torch (CPU, every CUDA device) RNG states, plus named torch.Generators."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }


def set_rng_state(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in (generators or {}).items():
        g.set_state(state["generators"][name])


def save_checkpoint(out: str | Path, step: int, models: dict, stateful: dict, state: dict,
                    generators: dict | None = None, keep: int = 1) -> Path:
    """Write checkpoint `step` of a run folder atomically, then keep only the newest `keep` checkpoints.

    models: role -> nn.Module (its trainable parameters are saved); stateful: name -> object with
    state_dict() (optimizers, schedulers); state: plain values of the stage (numbers, strings, lists,
    dicts, tensors). Raises CheckpointError (the previous checkpoints untouched) when the write fails
    or a weight is NaN/inf.
    """
    from rto.distributed import check_in_sync, full, full_state, is_main, sharded_training, world
    from rto.zero import zero_stage

    check_in_sync(models)  # several processes: their weights must be the same, and process 0 writes them
    # sharded layers (rto.distributed) are gathered whole one tensor at a time (collectives), and only process 0
    # keeps them, in CPU memory, to write them once
    main = is_main()
    weights = {}
    for key, p in trainable(models).items():
        with torch.no_grad():
            whole = full(p)
        if main:
            weights[key] = whole.contiguous().cpu()
    states = {k: full_state(v.state_dict(), keep=main) for k, v in stateful.items()}
    if not main:
        return checkpoint_dir(out) / f"{PREFIX}{step:08d}"
    if checkpoint_dir(out).is_symlink():
        raise CheckpointError(f"{checkpoint_dir(out)} is a symbolic link; rto writes and deletes checkpoints only "
                              "in a folder of its own: remove the link and re-run the same command")
    final = checkpoint_dir(out) / f"{PREFIX}{step:08d}"
    bad = [name for name, t in weights.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"refusing to checkpoint step {step}: NaN/inf in {bad[0]}"
                              f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}")
    if final.exists():  # already saved (e.g. the end of training falls on a periodic checkpoint)
        return final
    try:
        with atomic_folder(final) as tmp:
            save_file(weights, str(tmp / "weights.safetensors"))
            torch.save({"stateful": states,
                        "rng": rng_state(generators), "state": state}, tmp / "trainer.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, "processes": world()[1],
                                                         "sharded": sharded_training(), "zero_stage": zero_stage(),
                                                         "saved_at": time.strftime("%Y-%m-%d %H:%M:%S")}))
    except Exception as e:
        previous = latest_checkpoint(out)
        kept = f"the last good checkpoint {previous} is kept" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"could not write checkpoint {final} ({e}); {kept}. Free disk space or fix the "
                              "folder, then re-run the same command to resume") from e
    for old in list_checkpoints(out)[:-max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, models: dict, stateful: dict, generators: dict | None = None) -> dict:
    """Restore a checkpoint written by save_checkpoint into the given objects; returns the stage's state.

    The models must have been built as at the start of the run (same start weights, same trainable
    parameters). The RNG states are restored last, so the run continues as if never stopped.
    """
    from rto.distributed import assign, reshard_optimizer_state, sharded_training, world
    from rto.zero import zero_stage

    path = Path(path)
    try:
        record = json.loads((path / "state.json").read_text())
        processes, sharded = record.get("processes", 1), record.get("sharded", False)
        stage = record.get("zero_stage", 0)
    except (OSError, ValueError, AttributeError):  # unreadable: the weights' check below names the checkpoint
        processes, sharded, stage = world()[1], sharded_training(), zero_stage()
    if processes != world()[1]:
        raise CheckpointError(f"checkpoint {path} was written by a run of {processes} process(es), and this run has "
                              f"{world()[1]}: each process's share of the data depends on their number, so resume with "
                              f"{processes} (torchrun --nproc_per_node {processes}, or accelerate launch --num_processes "
                              f"{processes}), or pass --resume false to start over")
    if sharded != sharded_training():
        raise CheckpointError(f"checkpoint {path} was written {'with' if sharded else 'without'} FSDP and this run is "
                              f"launched {'with' if sharded_training() else 'without'} it (its optimizer states are "
                              "grouped differently): resume with the launch config of the run that wrote it, or pass "
                              "--resume false to start over")
    if stage != zero_stage():
        written = f"with DeepSpeed ZeRO-{stage}" if stage else "without DeepSpeed"
        now = f"with DeepSpeed ZeRO-{zero_stage()}" if zero_stage() else "without it"
        raise CheckpointError(f"checkpoint {path} was written {written} and this run is launched {now} (its optimizer "
                              "states are split otherwise): resume with the launch config of the run that wrote it, "
                              "or pass --resume false to start over")
    try:
        weights = load_file(str(path / "weights.safetensors"))
        saved = torch.load(path / "trainer.pt", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path} ({e}); delete it to resume from an "
                              "earlier one, or pass --resume false to start over") from e
    params = trainable(models)
    if set(weights) != set(params):
        missing, extra = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
        raise CheckpointError(f"checkpoint {path} does not match the models: missing {missing[:3]}, unexpected "
                              f"{extra[:3]}; was it written with other models or another train_layers?")
    for key, p in params.items():
        assign(p, weights[key])  # a sharded parameter takes its own shard, a ZeRO-3 one its own share
    for name, obj in stateful.items():
        obj.load_state_dict(saved["stateful"][name])
        if isinstance(obj, torch.optim.Optimizer):
            reshard_optimizer_state(obj)
    set_rng_state(saved["rng"], generators)
    return saved["state"]


def remove_checkpoints(out: str | Path) -> None:
    """Delete the checkpoints of a run folder and the temporary folders of interrupted saves, then
    `checkpoints/` itself if nothing else is in it; never anything through a symbolic link."""
    folder = checkpoint_dir(out)
    if folder.is_symlink() or not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.name.startswith((PREFIX, f".tmp-{PREFIX}")) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
    try:
        folder.rmdir()
    except OSError:  # something else is in it: not rto's to delete
        pass
