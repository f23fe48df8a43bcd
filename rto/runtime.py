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


class Run:
    """A run folder: config.yaml, metrics.jsonl, TensorBoard events, and a DONE marker when finished."""

    def __init__(self, out: str | Path, config, tensorboard: bool = True):
        self.dir = Path(out)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.yaml").write_text(yaml.safe_dump(to_plain(config), sort_keys=False))
        # a stage always starts from scratch, so rows and events of an interrupted attempt are dropped
        self._metrics = open(self.dir / "metrics.jsonl", "w")
        (self.dir / DONE_FILE).unlink(missing_ok=True)
        shutil.rmtree(self.dir / "tb", ignore_errors=True)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tb"))
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

    def close(self) -> None:
        self._metrics.close()
        if self._tb is not None:
            self._tb.close()


def is_done(out: str | Path) -> bool:
    return (Path(out) / DONE_FILE).exists()


def read_metrics(out: str | Path) -> list[dict]:
    path = Path(out) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


@contextmanager
def timed(times: dict, key: str):
    start = time.perf_counter()
    yield
    times[key] = times.get(key, 0.0) + time.perf_counter() - start
