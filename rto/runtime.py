"""What every stage needs at run time: seeds, precision, the accelerator, the run folder, metrics."""

from __future__ import annotations

import json
import platform
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from rto.checkpoint import checkpoint_step, latest_checkpoint, remove_checkpoints

DONE_FILE = "DONE"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 autocast is ~3x faster than fp32 there, and far slower without them."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str) -> str:
    """'auto' -> 'bf16' on a bf16-capable GPU or CPU, else 'fp32'."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def make_accelerator(precision: str):
    """An accelerate.Accelerator with bf16 autocast (fp32 master weights) or plain fp32."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # stages run one after another in one process (rto pipeline)
    return Accelerator(mixed_precision="bf16" if resolve_precision(precision) == "bf16" else "no")


def versions() -> dict:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def machine() -> str:
    cores = torch.get_num_threads()
    cap = torch.backends.cpu.get_cpu_capability()
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{platform.machine()} {cores} threads ({cap}{', native bf16' if cpu_has_native_bf16() else ''}){gpu}"


def to_plain(config) -> dict:
    return asdict(config) if is_dataclass(config) else dict(config)


# fields that change how a run goes, not what it computes: they may differ when a run is continued
RUNTIME_FIELDS = {"out", "progress", "threads", "resume", "overwrite", "checkpoint_every", "keep_checkpoints"}


class RunConflict(ValueError):
    """The run folder holds results of a run with another configuration."""


class NonFiniteError(FloatingPointError):
    """Training met NaN/inf values too many steps in a row and stopped."""


def _comparable(config: dict) -> dict:
    return json.loads(json.dumps({k: v for k, v in config.items() if k not in RUNTIME_FIELDS}))


def config_changes(out: str | Path, config) -> list[str]:
    """'field: old -> new' for every field that differs from the config.yaml stored in `out`
    (fields missing on either side are not compared; runtime fields such as threads never count)."""
    path = Path(out) / "config.yaml"
    if not path.exists():
        return []
    try:
        old = _comparable(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError:
        return ["config.yaml: unreadable"]
    new = _comparable(to_plain(config))
    return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in new if k in old and old[k] != new[k]]


def has_results(out: str | Path) -> bool:
    """A finished run, a checkpoint or logged training steps: something a new run must not silently replace."""
    out = Path(out)
    metrics = out / "metrics.jsonl"
    return is_done(out) or latest_checkpoint(out) is not None or (metrics.exists() and metrics.stat().st_size > 0)


def folder_state(cfg) -> str:
    """What a stage does with its run folder `cfg.out`:

    'new'    start from scratch (an empty folder, an attempt without results, or --resume false)
    'resume' continue from the latest checkpoint (same config, not finished; the default)
    'done'   the same config already finished there
    Raises RunConflict when the folder holds results of a different config and `cfg.overwrite` is off,
    and when --resume true finds nothing to resume.
    """
    resume, overwrite = getattr(cfg, "resume", None), getattr(cfg, "overwrite", False)
    changes = config_changes(cfg.out, cfg)
    if changes and has_results(cfg.out):
        if not overwrite:
            shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
            raise RunConflict(f"{cfg.out} holds the results of a run with a different config ({shown}); choose "
                              "another --out, or pass --overwrite true to replace that run")
        if resume:
            raise RunConflict(f"--resume true: {cfg.out} holds a run with a different config ({changes[0]})")
        return "new"
    if resume is False:
        return "new"
    if is_done(cfg.out):
        return "done"
    if latest_checkpoint(cfg.out) is not None:
        return "resume"
    if resume:
        raise RunConflict(f"--resume true: {cfg.out} has no checkpoint to resume from; leave --resume unset "
                          "to start the run")
    return "new"


def finished_summary(cfg) -> dict | None:
    """The summary of the run in `cfg.out` when it already finished with this config, else None."""
    if folder_state(cfg) != "done":
        return None
    path = Path(cfg.out) / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


class Run:
    """A run folder: config.yaml, metrics.jsonl, TensorBoard events, checkpoints/, and DONE when finished.

    With `resume_from` (a checkpoint of this folder) the run continues one that stopped at that checkpoint's
    step: metric rows and TensorBoard events past it are dropped (they are logged again); otherwise every
    trace of an earlier attempt is.
    """

    def __init__(self, out: str | Path, config, tensorboard: bool = True, resume_from: Path | None = None):
        self.dir = Path(out)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.yaml").write_text(yaml.safe_dump(to_plain(config), sort_keys=False))
        (self.dir / DONE_FILE).unlink(missing_ok=True)
        metrics = self.dir / "metrics.jsonl"
        self.resume_from = resume_from
        resume_step = checkpoint_step(resume_from) if resume_from else None
        if resume_step is None:
            remove_checkpoints(self.dir)
            shutil.rmtree(self.dir / "tb", ignore_errors=True)
            self._metrics = open(metrics, "w")
        else:
            keep_rows(metrics, lambda row: row["step"] <= resume_step)
            self._metrics = open(metrics, "a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(str(self.dir / "tb"), purge_step=purge)
        self.started = time.time()

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, "time_s": round(time.time() - self.started, 3)}
        row.update({k: (float(v) if isinstance(v, (int, float, np.floating, torch.Tensor)) else v)
                    for k, v in metrics.items()})
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, float) and k != "step":
                    self._tb.add_scalar(k, v, step)

    def note(self, text: str) -> None:
        """Print a line and keep it in the run's log.txt."""
        print(text, flush=True)
        with open(self.dir / "log.txt", "a") as f:
            f.write(text + "\n")

    def finish(self, summary: dict | None = None) -> None:
        summary = {"wall_time_s": round(time.time() - self.started, 2), **(summary or {})}
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2))
        (self.dir / DONE_FILE).write_text("")
        self.close()
        remove_checkpoints(self.dir)  # the saved model is the result; checkpoints only serve an unfinished run

    def close(self) -> None:
        self._metrics.close()
        if self._tb is not None:
            self._tb.close()


def is_done(out: str | Path) -> bool:
    return (Path(out) / DONE_FILE).exists()


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a JSON Lines log; a line cut short by a crash is ignored."""
    path = Path(path)
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def keep_rows(path: str | Path, keep) -> None:
    """Rewrite a JSON Lines log with only the rows for which keep(row) is true (used when a run resumes)."""
    Path(path).write_text("".join(json.dumps(row) + "\n" for row in read_rows(path) if keep(row)))


def read_metrics(out: str | Path) -> list[dict]:
    return read_rows(Path(out) / "metrics.jsonl")


@contextmanager
def timed(times: dict, key: str):
    start = time.perf_counter()
    yield
    times[key] = times.get(key, 0.0) + time.perf_counter() - start
