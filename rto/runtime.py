"""What every stage needs at run time: seeds, precision, the accelerator, the run folder, metrics."""

from __future__ import annotations

import fcntl
import importlib
import json
import os
import platform
import random
import shlex
import shutil
import sys
import time
import weakref
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from rto.checkpoint import checkpoint_step, latest_checkpoint, remove_checkpoints
from rto.config import ConfigError

DONE_FILE = "DONE"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _cpuinfo() -> str:
    """/proc/cpuinfo's text, '' where it cannot be read (another OS, no permission)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 autocast is ~3x faster than fp32 there, and far slower without them."""
    flags = _cpuinfo()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_vendor() -> str:
    """The CPU's vendor_id as /proc/cpuinfo gives it ('GenuineIntel', 'AuthenticAMD'), '' where it cannot be read."""
    return next((line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines() if line.startswith("vendor_id")), "")


def resolve_precision(precision: str) -> str:
    """'auto' -> 'bf16' on a bf16-capable GPU or CPU, else 'fp32'."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def emulated_bf16_note(precision: str, device: torch.device) -> str | None:
    """A log line for a resolved `precision` of bf16 on a CPU without native bf16 (where 'auto' would pick fp32),
    else None."""
    if precision != "bf16" or device.type != "cpu" or cpu_has_native_bf16():
        return None
    return ("bf16 on a CPU without native bf16 (no AVX512-BF16 or AMX flag): its bf16 products are emulated, slower "
            "than fp32's (about 4x for SmolLM2's weights on a 2-core AVX512 Xeon); --precision auto picks fp32 on "
            "this CPU")


# --report_to: where a run's scalars go besides metrics.jsonl, through accelerate's trackers.
# name -> (the module it imports, the optional extra of rto-rlhf that installs it; None: a core dependency)
TRACKERS: dict[str, tuple[str | None, str | None]] = {
    "tensorboard": ("tensorboard", None), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"), "none": (None, None)}
TRACKER_PROJECT = "rto"  # the wandb and trackio project, the mlflow experiment


def check_report_to(report_to: str) -> str:
    """`report_to` when it names a tracker of TRACKERS whose package imports; otherwise a one-line ConfigError
    that lists the choices, or names the optional extra that installs the missing package."""
    if report_to not in TRACKERS:
        raise ConfigError(f"report_to must be one of {', '.join(TRACKERS)}, got {report_to!r}")
    module, extra = TRACKERS[report_to]
    if module is None:
        return report_to
    try:
        importlib.import_module(module)
    except ImportError:
        install = (f"pip install 'rto-rlhf[{extra}]' (in a clone: pip install -e '.[{extra}]')" if extra
                   else "reinstall rto-rlhf")
        raise ConfigError(f"--report_to {report_to} needs the package {module}"
                          + (f" (the optional extra '{extra}')" if extra else "") + f", which is not installed: "
                          f"{install}, or choose another --report_to") from None
    return report_to


def check_engine(environ) -> None:
    """Refuse a launch that asks accelerate for an engine rto does not drive (`accelerate launch` sets
    ACCELERATE_USE_MEGATRON_LM from its config's distributed_type), which would otherwise run as plain data parallel
    without saying so. FSDP and DeepSpeed are carried out by rto itself (rto.distributed.shard_trained,
    rto.zero.Engine), with the settings that rto.distributed.check_fsdp and rto.zero.check_deepspeed accept."""
    from rto.distributed import check_fsdp, env_flag
    from rto.zero import check_deepspeed, deepspeed_launch

    if env_flag(environ, "ACCELERATE_USE_MEGATRON_LM"):
        raise ValueError("this launch asks for Megatron-LM (ACCELERATE_USE_MEGATRON_LM set by the accelerate config); "
                         "rto runs several processes as data parallel, shards the trained layers with FSDP or splits "
                         "the optimizer with DeepSpeed ZeRO: launch with configs/accelerate/ddp-*.yaml, fsdp-*.yaml, "
                         "zero2-*.yaml or torchrun (docs/scaling.md)")
    if env_flag(environ, "ACCELERATE_USE_FSDP") and deepspeed_launch(environ):
        raise ValueError("this launch asks for both FSDP and DeepSpeed; choose one accelerate config")
    if env_flag(environ, "ACCELERATE_USE_FSDP"):
        check_fsdp(environ)
    if deepspeed_launch(environ):
        check_deepspeed(environ)


def make_accelerator(precision: str, report_to: str = "none", run_dir: str | Path | None = None):
    """An accelerate.Accelerator with bf16 autocast (fp32 master weights) or plain fp32, logging to the tracker
    `report_to` (TRACKERS; "none": none) once a Run starts it, local files under `run_dir`."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # stages run one after another in one process (rto pipeline)
    from rto.distributed import accelerate_without_deepspeed, is_main, on_cpus

    check_engine(os.environ)

    main = is_main()  # the trackers log from process 0 only
    with accelerate_without_deepspeed():
        return Accelerator(mixed_precision="bf16" if resolve_precision(precision) == "bf16" else "no", cpu=on_cpus(),
                           log_with=None if check_report_to(report_to) == "none" or not main else report_to,
                           project_dir=None if run_dir is None else str(run_dir))


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
RUNTIME_FIELDS = {"out", "progress", "threads", "resume", "overwrite", "checkpoint_every", "keep_checkpoints",
                  "report_to"}


class RunConflict(ValueError):
    """The run folder holds results of a run with another configuration."""


class NonFiniteError(FloatingPointError):
    """Training met NaN/inf values too many steps in a row and stopped."""


# Run folders are rto's own: a stage writes only into a new or empty folder, or one rto made (it holds
# RUN_MARKER); one process at a time writes it (an OS lock on LOCK_FILE, released when the process ends,
# however it ends); and what rto replaces or deletes there is never a symbolic link.
RUN_MARKER = ".rto-run"
LOCK_FILE = ".rto-lock"
RUN_FOLDERS = ("checkpoints", "tb", "model", "policy", "critic", "samples", "plots")
MODEL_FOLDERS = ("model", "policy", "critic")  # the saved models (rto.models.save_model), each with its model card
RUN_FILES = ("config.yaml", "metrics.jsonl", "log.txt", "summary.json", DONE_FILE, "eval.json", "pairs.jsonl",
             "all_pairs.jsonl", "rollouts.jsonl", "report.md", "report.html", "pipeline.json", "recipe.yaml",
             RUN_MARKER, LOCK_FILE)
MARKER_TEXT = "This folder was made by rto, which replaces and deletes the files it wrote here.\n"
MAX_NAME = 100


class RunFolderError(ValueError):
    """A folder rto must not write into: not its own, or a symbolic link where rto writes."""


class RunBusy(RunFolderError):
    """Another process is writing the run folder."""


def check_name(value: str, what: str) -> str:
    """`value` when it can name a file or folder inside a run folder (an eval label, a pipeline stage):
    ASCII letters, digits, '-', '_' and '.', not starting with '.', at most MAX_NAME characters.
    Raises a one-line ValueError naming `what` otherwise."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be text, got {value!r}")
    bad = "".join(sorted({ch for ch in value if not (ch.isascii() and ch.isalnum()) and ch not in "-_."}))
    problem = ("is empty" if not value else f"contains {bad!r}" if bad else "starts with '.'" if value[0] == "."
               else f"is longer than {MAX_NAME} characters" if len(value) > MAX_NAME else None)
    if problem:
        raise ValueError(f"{what} {value!r} {problem}; it becomes a file or folder name inside the run folder, "
                         "so use only letters, digits, '-', '_' and '.' (not first)")
    return value


def inside(path: str | Path, root: str | Path) -> bool:
    """True when `path` is `root` or lies under it, once both are resolved ('..' and symbolic links followed)."""
    path, root = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([path, root]) == root


def is_run_folder(folder: str | Path) -> bool:
    """True when rto made `folder` (it holds the RUN_MARKER file)."""
    marker = Path(folder) / RUN_MARKER
    return marker.is_file() and not marker.is_symlink()


def _links(folder: Path) -> list[Path]:
    """The symbolic links among what rto writes in `folder`: its files, its folders and their entries."""
    found = [folder / name for name in (*RUN_FOLDERS, *RUN_FILES) if (folder / name).is_symlink()]
    for name in RUN_FOLDERS:
        if (folder / name).is_dir() and not (folder / name).is_symlink():
            found += sorted(p for p in (folder / name).iterdir() if p.is_symlink())
    return found


def check_run_folder(out: str | Path) -> Path:
    """`out` as a Path when a stage may write there, else a RunFolderError; reads only, changes nothing.

    Accepted: a folder that does not exist yet, an empty one, and one rto made (RUN_MARKER), as long as
    nothing rto replaces or deletes there (config.yaml, checkpoints/, model/, ...) is a symbolic link."""
    if out is None or not str(out).strip():
        raise RunFolderError("the run folder (--out) is empty; name a folder, e.g. --out runs/dpo")
    folder = Path(out)
    if folder.is_symlink() and not folder.exists():
        raise RunFolderError(f"run folder {out} is a symbolic link to a missing folder; remove the link or "
                             "choose another --out")
    if not folder.exists():
        return folder
    if not folder.is_dir():
        raise RunFolderError(f"run folder {out} is a file, not a folder; choose another --out")
    if not is_run_folder(folder) and any(folder.iterdir()):
        raise RunFolderError(f"run folder {out} is not empty and was not made by rto (it has no {RUN_MARKER} "
                             "file), so rto writes and deletes nothing there; choose a new or empty --out (for a "
                             f"folder an older rto made, create an empty {folder / RUN_MARKER} first)")
    links = _links(folder)
    if links:
        more = f" (and {len(links) - 1} more)" if len(links) > 1 else ""
        raise RunFolderError(f"{links[0]} is a symbolic link{more}; rto replaces and deletes what it writes in "
                             f"its run folder and never through a link: remove the link, or choose another --out")
    return folder


class _Lock:
    """The locked LOCK_FILE of one run folder in this process, and how many claims use it."""

    def __init__(self, key: str, fd: int):
        self.key, self.fd, self.claims = key, fd, 1

    def drop(self) -> None:
        """Release one claim; the lock goes with the last one."""
        self.claims -= 1
        if self.claims == 0 and self.fd >= 0:
            if _HELD.get(self.key) is self:
                del _HELD[self.key]
            os.ftruncate(self.fd, 0)  # the holder line is read only while a process holds the lock
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = -1


_HELD: dict[str, _Lock] = {}  # real path of a run folder -> its lock, while this process holds it


class FolderClaim:
    """This process's hold on a run folder (claim_run_folder); release() it once, or use it in a `with`."""

    def __init__(self, lock: _Lock):
        self._lock, self.released = lock, False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._lock.drop()

    def __enter__(self) -> FolderClaim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder_line() -> str:
    command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv else []).replace("\n", " ")
    return f"pid {os.getpid()}: {command[:300]}"


def _lock(folder: Path) -> int:
    """Take the OS lock on `folder`/LOCK_FILE without waiting and write this process's pid and command into it;
    raises RunBusy naming the process that holds it."""
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 2000, 0).decode("utf-8", "replace").strip() or "it is starting"
        os.close(fd)
        raise RunBusy(f"run folder {folder} is in use by another rto process ({holder}); wait for it to end or "
                      "stop it, or choose another --out") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, (_holder_line() + "\n").encode(), 0)
    return fd


def _mark(folder: Path) -> None:
    """Write RUN_MARKER into `folder` (new or empty), making it rto's."""
    try:
        fd = os.open(folder / RUN_MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:  # another process marked it first; the lock decides which one writes
        return
    with os.fdopen(fd, "w") as f:
        f.write(MARKER_TEXT)


def claim_run_folder(out: str | Path) -> FolderClaim:
    """Make `out` this process's run folder before anything in it is read for a decision or changed:
    check it (check_run_folder), create and mark it when new or empty, and lock it against other processes
    (RunBusy when one holds it). Claims nest within one process (a pipeline, then its stages); the lock
    goes when every claim is released, and with the process in any case (SIGKILL included)."""
    check_run_folder(out)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(folder)
    if key in _HELD:
        _HELD[key].claims += 1
        return FolderClaim(_HELD[key])
    if not is_run_folder(check_run_folder(out)):  # again: another process may have written it meanwhile
        _mark(folder)
    _HELD[key] = _Lock(key, _lock(folder))
    claim = FolderClaim(_HELD[key])
    try:
        check_run_folder(out)  # a process that held the lock until now may have changed it
    except BaseException:
        claim.release()
        raise
    return claim


def release_run_folders() -> None:
    """Release every run folder this process holds (for a long-lived process after a stage failed)."""
    for lock in list(_HELD.values()):
        lock.claims = 1
        lock.drop()


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
    and when --resume true finds nothing to resume; RunFolderError when `cfg.out` is not a folder rto may
    write (check_run_folder), whatever --resume and --overwrite say.
    """
    check_run_folder(cfg.out)
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
    """A run folder: config.yaml, metrics.jsonl, checkpoints/, and DONE when finished; with an `accelerator`
    made with a tracker (make_accelerator's `report_to`), every logged scalar also goes to that tracker through
    accelerate (init_trackers, log, and each tracker's finish when the run closes): TensorBoard events in tb/.

    With `resume_from` (a checkpoint of this folder) the run continues one that stopped at that checkpoint's
    step: metric rows and TensorBoard events past it are dropped (they are logged again); otherwise every
    trace of an earlier attempt is. `stage` (e.g. "dpo --loss ipo") names the run for the trackers and in the
    model cards that finish() completes.

    The run holds its folder (claim_run_folder: rto's own, no other process writing it) until finish() or
    close(), or until it is garbage-collected (a stage that raised), or the process ends.

    With several processes (rto.distributed), process 0 alone writes the folder and prints; on the others a Run
    writes nothing, and finish() waits until process 0 has written everything.
    """

    def __init__(self, out: str | Path, config, resume_from: Path | None = None, accelerator=None,
                 stage: str | None = None):
        from rto.distributed import is_main

        self.dir, self.stage, self.resume_from = Path(out), stage, resume_from
        self.writer = is_main()
        self.started = time.time()
        if not self.writer:
            return
        claim = claim_run_folder(out)
        self._release = weakref.finalize(self, claim.release)
        try:
            self._open(config, accelerator, resume_from)
        except BaseException:
            self._release()
            raise

    def _open(self, config, accelerator, resume_from: Path | None) -> None:
        (self.dir / "config.yaml").write_text(yaml.safe_dump(to_plain(config), sort_keys=False))
        (self.dir / DONE_FILE).unlink(missing_ok=True)
        metrics = self.dir / "metrics.jsonl"
        resume_step = checkpoint_step(resume_from) if resume_from else None
        if resume_step is None:
            remove_checkpoints(self.dir)
            shutil.rmtree(self.dir / "tb", ignore_errors=True)
            self._metrics = open(metrics, "w")
        else:
            keep_rows(metrics, lambda row: row["step"] <= resume_step)
            self._metrics = open(metrics, "a")
        self._accelerator = accelerator if accelerator is not None and accelerator.log_with else None
        if self._accelerator is not None:
            # TensorBoard writes into <project_dir>/<project name>: tb/ of the run folder; the others name a project
            # and a run. TensorBoard gets no hyperparameters: config.yaml lies beside tb/.
            tensorboard = [str(t) for t in self._accelerator.log_with] == ["tensorboard"]
            name = f"{self.stage or 'rto'} ({self.dir})"
            self._accelerator.init_trackers(
                "tb" if tensorboard else TRACKER_PROJECT, config=None if tensorboard else to_plain(config),
                init_kwargs={"tensorboard": {"purge_step": None if resume_step is None else resume_step + 1},
                             "wandb": {"name": name, "dir": str(self.dir)}, "mlflow": {"run_name": name},
                             "trackio": {"name": name}})
        self.started = time.time()

    def log(self, step: int, metrics: dict) -> None:
        if not self.writer:
            return
        row = {"step": step, "time_s": round(time.time() - self.started, 3)}
        row.update({k: (float(v) if isinstance(v, (int, float, np.floating, torch.Tensor)) else v)
                    for k, v in metrics.items()})
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        if self._accelerator is not None:
            self._accelerator.log({k: v for k, v in row.items() if isinstance(v, float) and k != "step"}, step=step)

    def note(self, text: str) -> None:
        """Print a line and keep it in the run's log.txt (process 0 only)."""
        if not self.writer:
            return
        print(text, flush=True)
        with open(self.dir / "log.txt", "a") as f:
            f.write(text + "\n")

    def finish(self, summary: dict | None = None) -> None:
        """Write summary.json, complete the model cards of the models saved here (stage and headline metrics,
        rto.cards), write DONE and remove the checkpoints; then close()."""
        from rto.cards import write_card
        from rto.distributed import barrier

        if not self.writer:
            barrier()  # process 0 writes the models, summary and DONE before any process goes on
            return
        summary = {"wall_time_s": round(time.time() - self.started, 2), **(summary or {})}
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2))
        for name in MODEL_FOLDERS:
            folder = self.dir / name
            if (folder / "config.json").is_file() and not folder.is_symlink():
                write_card(folder, self.stage, summary)
        (self.dir / DONE_FILE).write_text("")
        remove_checkpoints(self.dir)  # the saved model is the result; checkpoints only serve an unfinished run
        self.close()
        barrier()

    def close(self) -> None:
        """Close the logs and release the run folder (another process, or the next stage, may then use it)."""
        if not self.writer:
            return
        try:
            self._metrics.close()
            if self._accelerator is not None:
                trackers, self._accelerator.trackers = self._accelerator.trackers, []
                for tracker in trackers:  # not accelerator.end_training(): the process group (of a multi-process
                    tracker.finish()  # run) must outlive this stage, which is one of a pipeline's
        finally:
            self._release()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
