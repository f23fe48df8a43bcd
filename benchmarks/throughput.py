"""Side-by-side throughput of one PPO iteration: rto's RTO and sparse PPO, TRL 1.12.0's PPOTrainer, and rto's
RTO at an earlier commit, on SmolLM2-135M-Instruct, in one run (see benchmarks/README.md).

    python -m benchmarks.throughput            # the whole benchmark (writes benchmarks/results/throughput.*)
    python -m benchmarks.throughput --quick    # a smoke run in a minute or two (results stay in the scratch folder)

Every contender runs in its own process (so its peak resident memory is its own) for `iterations` PPO
iterations; the last one is timed (the first warms up), load time is reported apart. Contenders are
interleaved: each repetition runs all of them once, in a rotated order. The scratch folder (TRL's virtual
environment, the model folders, the older source tree, run folders, logs and the samples measured so far) is
`benchmarks/.scratch/`. A long benchmark can be split: `--only limits`, `--only all`, `--only top6` (each
appends what it measures) and `--only report` (writes the results from everything measured with the same
settings).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from benchmarks._flops import SMOLLM2_135M, mfu, phase_flops, weight_matrices

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
TORCH_PIN = "torch==2.13.0"
TRL_PINS = ("trl==1.12.0", "transformers==5.24.0", "accelerate==1.15.0", "datasets==5.2.0")  # TRL 1.12 allows these
BEFORE_COMMIT = "ed5f4a3"
CONTENDERS = ("ours_rto", "ours_ppo", "trl_ppo", "ours_rto_before")
GROUPS = {"all": None, "top6": 6}  # layer setting -> train_layers
PHASES = ("generate", "score", "update")


# ----------------------------------------------------------------------------------------------- arguments

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line settings; --quick sets rollout 8, 8 new tokens and 1 repetition unless given explicitly."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: rollout 8, 8 new tokens, 1 repetition")
    p.add_argument("--reps", type=int, default=None, help="repetitions (rounds over all contenders); default 3")
    p.add_argument("--rollout_size", type=int, default=None, help="responses per iteration; default 32")
    p.add_argument("--max_new_tokens", type=int, default=None, help="fixed response length; default 40")
    p.add_argument("--minibatch_size", type=int, default=8)
    p.add_argument("--ppo_epochs", type=int, default=1)
    p.add_argument("--iterations", type=int, default=2, help="iterations per process; the last one is timed")
    p.add_argument("--system_prompt", default="", help="system message of every prompt (rto's default: empty)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="every contender's precision: fp32, or bf16 autocast with fp32 weights (rto's --precision "
                        "bf16, TRL's bf16=True) on CPUs with native bf16; a bf16 run writes throughput-bf16.*")
    p.add_argument("--groups", default="all,top6", help="layer settings: all (every layer trains), top6")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--only", choices=("limits", "all", "top6", "report"), default=None,
                   help="run one part and keep its measurements (then --only report writes the results)")
    p.add_argument("--before", default=BEFORE_COMMIT, help="commit of the 'before' contender")
    p.add_argument("--scratch", default=str(HERE / ".scratch"))
    p.add_argument("--results", default=None, help="results folder; default benchmarks/results "
                                                   "(--quick: the scratch folder's quick-results)")
    p.add_argument("--steps", type=int, default=None,
                   help="with --only all|top6: run at most this many contender processes, then stop (the next call "
                        "continues the interleaved schedule)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=int, default=1800, help="seconds allowed to one contender process")
    args = p.parse_args(argv)
    quick = {"reps": 1, "rollout_size": 8, "max_new_tokens": 8}
    full = {"reps": 3, "rollout_size": 32, "max_new_tokens": 40}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.results is None:
        args.results = str(Path(args.scratch) / "quick-results") if args.quick else str(HERE / "results")
    args.groups = [g for g in args.groups.split(",") if g]
    args.contenders = [c for c in args.contenders.split(",") if c]
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Refuse settings the contenders cannot all run (ValueError naming the setting)."""
    for name in ("reps", "rollout_size", "max_new_tokens", "minibatch_size", "ppo_epochs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.iterations < 2:
        raise ValueError(f"--iterations must be >= 2 (the first one warms up), got {args.iterations}")
    if args.rollout_size % args.minibatch_size:
        raise ValueError(f"--rollout_size ({args.rollout_size}) must be a multiple of --minibatch_size "
                         f"({args.minibatch_size})")
    if bad := [g for g in args.groups if g not in GROUPS]:
        raise ValueError(f"--groups takes {', '.join(GROUPS)}; got {', '.join(bad)}")
    if bad := [c for c in args.contenders if c not in CONTENDERS]:
        raise ValueError(f"--contenders takes {', '.join(CONTENDERS)}; got {', '.join(bad)}")
    if args.precision == "bf16":
        from rto.runtime import cpu_has_native_bf16

        if not cpu_has_native_bf16():
            raise ValueError("--precision bf16 needs a CPU with native bf16 (AVX512-BF16 or AMX); elsewhere torch "
                             "emulates it, far slower than fp32")


def settings_key(args: argparse.Namespace) -> str:
    """Short digest of the settings a measurement depends on: samples of other settings are never mixed."""
    fields = [args.rollout_size, args.max_new_tokens, args.minibatch_size, args.ppo_epochs, args.iterations,
              args.system_prompt, args.before, args.seed] + ([args.precision] if args.precision != "fp32" else [])
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:10]


# ----------------------------------------------------------------------------------------------- set-up

def run_logged(cmd: list[str], log: Path, **kwargs) -> None:
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True, **kwargs)


def trl_python(scratch: Path) -> Path:
    """TRL's own virtual environment, created on first use (python -m venv; torch first, the CPU wheel, so no
    CUDA build is pulled in; then TRL 1.12.0 with transformers, accelerate and datasets pinned to rto's)."""
    venv = scratch / "trl-venv"
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import trl, sys; sys.exit(trl.__version__ != '1.12.0')"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    log = scratch / "logs" / "trl-venv.log"
    print(f"creating TRL's virtual environment in {venv} (log: {log})", flush=True)
    run_logged([sys.executable, "-m", "venv", "--clear", str(venv)], log)
    run_logged([str(python), "-m", "pip", "install", "-q", TORCH_PIN], log)
    run_logged([str(python), "-m", "pip", "install", "-q", *TRL_PINS], log)
    subprocess.run(check, check=True)
    return python


def model_folders(scratch: Path, seed: int) -> dict[str, str]:
    """The embedded SmolLM2-135M-Instruct as a plain save_pretrained folder (TRL's policy, reference, value
    and reward models start from it; rto's DPO model is this same folder, i.e. pi_dpo = pi_ref), and rto's
    reward model: a ValueModel on it with a seeded random head (N(0, 0.02)), reward mean 0 and std 1."""
    import torch

    from rto.models import DEFAULT_MODEL, ValueModel, load_causal_lm, load_tokenizer, save_model

    base, rm = scratch / "models" / "base", scratch / "models" / "rm"
    if not (base / "model.safetensors").exists():
        save_model(load_causal_lm(DEFAULT_MODEL), load_tokenizer(DEFAULT_MODEL), base)
    if not (rm / "value_head.safetensors").exists():
        torch.manual_seed(seed)
        model = ValueModel(load_causal_lm(str(base)), meta={"reward_mean": 0.0, "reward_std": 1.0, "pooling": "last"})
        torch.nn.init.normal_(model.head.weight, std=0.02)
        save_model(model, load_tokenizer(str(base)), rm)
    return {"base": str(base), "rm": str(rm)}


def before_tree(scratch: Path, commit: str) -> Path:
    """The source tree of `commit`, extracted once with `git archive COMMIT | tar -x`."""
    target = scratch / f"before-{commit}"
    if not (target / "rto" / "stages" / "ppo.py").exists():
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def rollout_prompt_ids(args: argparse.Namespace) -> list[list[int]]:
    """Token ids of the prompts rto's PPO stage draws in its first `iterations` rollouts (the sentiment task's
    train prompts in the stage's seeded order, chat template, --system_prompt): TRL gets exactly these."""
    import torch

    from rto.models import DEFAULT_MODEL, load_tokenizer
    from rto.rollout import encode_prompts
    from rto.tasks import prompts_and_rows

    prompts, _ = prompts_and_rows("sentiment", None, "train", None, args.seed)
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed)).tolist()
    picked = [prompts[order[i % len(order)]] for i in range(args.rollout_size * args.iterations)]
    return encode_prompts(load_tokenizer(DEFAULT_MODEL), picked, args.system_prompt)


# ----------------------------------------------------------------------------------------------- contenders

def ours_argv(kind: str, train_layers: int | None, out: Path, models: dict, args: argparse.Namespace) -> list[str]:
    """`rto ppo` flags of one contender: the stage's defaults except the benchmark's shared settings, the
    precision, no checkpoint before the last iteration, no progress bars."""
    argv = ["--out", str(out), "--reward", "sparse" if kind == "ours_ppo" else "rto", "--reward_model", models["rm"],
            "--iterations", str(args.iterations), "--rollout_size", str(args.rollout_size),
            "--minibatch_size", str(args.minibatch_size), "--ppo_epochs", str(args.ppo_epochs),
            "--max_new_tokens", str(args.max_new_tokens), "--precision", args.precision,
            "--train_layers", "null" if train_layers is None else str(train_layers), "--checkpoint_every", "0",
            "--progress", "false", "--resume", "false", "--overwrite", "true", "--seed", str(args.seed),
            "--system_prompt", args.system_prompt]
    if kind != "ours_ppo":
        argv += ["--dpo_model", models["base"]]
    return argv


def trl_spec(train_layers: int | None, out: Path, models: dict, prompt_ids: list, args: argparse.Namespace) -> dict:
    return {"model": models["base"], "train_layers": train_layers, "seed": args.seed, "pad_token": "<|endoftext|>",
            "rollout_size": args.rollout_size, "minibatch_size": args.minibatch_size, "ppo_epochs": args.ppo_epochs,
            "iterations": args.iterations, "forward_batch_size": args.rollout_size,
            "max_new_tokens": args.max_new_tokens, "lr": 3e-5, "out_dir": str(out), "prompt_ids": prompt_ids,
            "bf16": args.precision == "bf16"}


def run_child(cmd: list[str], env: dict, log: Path, timeout: int) -> tuple[int, float]:
    """Run `cmd`, output to `log`; returns (exit status, peak resident memory in MB of that process and its
    children, from wait4's ru_maxrss)."""
    with open(log, "w") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        deadline = time.monotonic() + timeout
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() > deadline:
                    proc.kill()
                    pid, status, usage = os.wait4(proc.pid, 0)
                    break
                time.sleep(0.2)
        except BaseException:  # interrupted (Ctrl-C, SIGTERM): the contender must not run on unobserved
            proc.kill()
            os.wait4(proc.pid, 0)
            raise
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024


def measure(kind: str, group: str, rep: int, ctx: dict, args: argparse.Namespace) -> dict:
    """One process of one contender: its timed (last) iteration, every iteration, load time and peak RSS."""
    scratch, layers = ctx["scratch"], GROUPS[group]
    name = f"{kind}-{group}-{rep}"
    run_dir, spec_path, out_path = scratch / "runs" / name, scratch / "specs" / f"{name}.json", scratch / "specs" / f"{name}.out.json"
    shutil.rmtree(run_dir, ignore_errors=True)
    out_path.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if kind == "trl_ppo":
        spec = trl_spec(layers, run_dir, ctx["models"], ctx["prompt_ids"], args)
        cmd = [str(ctx["trl_python"]), str(HERE / "_trl_child.py"), str(spec_path), str(out_path)]
    else:
        spec = {"argv": ours_argv(kind.removesuffix("_before"), layers, run_dir, ctx["models"], args), "no_eos": True}
        env["PYTHONPATH"] = str(ctx["before"] if kind.endswith("_before") else ROOT)
        cmd = [sys.executable, str(HERE / "_ours_child.py"), str(spec_path), str(out_path)]
    spec_path.write_text(json.dumps(spec))
    started = time.time()
    code, rss_mb = run_child(cmd, env, scratch / "logs" / f"{name}.log", args.timeout)
    sample = {"contender": kind, "group": group, "rep": rep, "exit": code, "peak_rss_mb": rss_mb,
              "wall_s": time.time() - started, "log": str(scratch / "logs" / f"{name}.log")}
    if code == 0 and out_path.exists():
        sample.update(json.loads(out_path.read_text()))
    shutil.rmtree(run_dir, ignore_errors=True)  # saved policy/critic: not needed, large
    return sample


def round_order(contenders: list[str], round_index: int) -> list[str]:
    """The contenders of repetition `round_index`, rotated by it so none always runs first."""
    k = round_index % len(contenders)
    return contenders[k:] + contenders[:k]


def schedule(contenders: list[str], reps: int) -> list[tuple[int, str]]:
    """(repetition, contender) in the order they run: repetition after repetition, each over every contender
    (round_order). A run split over several calls continues this list where the stored samples end."""
    return [(rep, kind) for rep in range(reps) for kind in round_order(contenders, rep)]


def source_fingerprint(kind: str, ctx: dict) -> dict:
    """Which code a contender ran: a digest of the rto sources it imports (this checkout or the older tree)."""
    if kind == "trl_ppo":
        return {"trl": "1.12.0"}
    tree = Path(ctx["before"] if kind.endswith("_before") else ROOT)

    def digest(files) -> str:
        h = hashlib.sha256()
        for f in sorted(files):
            h.update(f.read_bytes())
        return h.hexdigest()[:12]

    generation = [f for f in (tree / "rto" / "rollout.py", tree / "rto" / "decoding.py") if f.exists()]
    return {"tree": str(tree), "rto_sources_sha256": digest((tree / "rto").rglob("*.py")),
            "generation_sources_sha256": digest(generation)}


# ----------------------------------------------------------------------------------------------- results

def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(samples: list[dict], limits: dict | None, args: argparse.Namespace, prompt_tokens: float) -> dict:
    """Per (group, contender): samples/s of the timed iteration, response tokens/s and MFU per phase, peak RSS,
    load time, each as median with min-max over repetitions."""
    out: dict = {}
    for group in GROUPS:
        for kind in CONTENDERS:
            ok = [s for s in samples if s["group"] == group and s["contender"] == kind and s.get("iterations")]
            failed = [s for s in samples if s["group"] == group and s["contender"] == kind and not s.get("iterations")]
            if not ok and not failed:
                continue
            entry: dict = {"failed_runs": [{"rep": s["rep"], "exit": s["exit"], "log": s["log"]} for s in failed]}
            if ok:
                timed = [s["iterations"][-1] for s in ok]
                tokens = args.rollout_size * args.max_new_tokens
                entry["samples_per_s"] = spread([args.rollout_size / t["time_iteration_s"] for t in timed])
                entry["iteration_s"] = spread([t["time_iteration_s"] for t in timed])
                entry["phase_s"] = {p: spread([t[f"time_{p}_s"] for t in timed]) for p in PHASES}
                entry["tokens_per_s"] = {p: spread([tokens / t[f"time_{p}_s"] for t in timed]) for p in PHASES}
                entry["peak_rss_mb"] = spread([s["peak_rss_mb"] for s in ok])
                entry["load_s"] = spread([s["load_s"] for s in ok])
                entry["threads"] = ok[0].get("threads")
                if "length" in timed[0]:  # rto records them: every response must have run to the budget
                    entry["response_length"] = spread([t["length"] for t in timed])
                    entry["eos_rate"] = spread([t["eos_rate"] for t in timed])
                    entry["fixed_length_ok"] = all(t["length"] == args.max_new_tokens and t["eos_rate"] == 0
                                                   for t in timed)
                entry["sources"] = sorted({json.dumps(s["source"], sort_keys=True) for s in ok if "source" in s})
                flops = phase_flops(kind.removesuffix("_before"), SMOLLM2_135M, args.rollout_size, prompt_tokens,
                                    args.max_new_tokens, GROUPS[group], args.ppo_epochs,
                                    # the older tree rescored the policy and ran the trunk; the current one
                                    # rescores the policy's top layers under bf16, on the sampler's trunk states
                                    policy_rescored=kind.endswith("_before") or args.precision == "bf16",
                                    trunk_from_sampler=kind in ("ours_rto", "ours_ppo"))
                entry["flops"] = flops
                if limits and f"peak_{args.precision}_gflops" in limits:  # against the run's precision's rates
                    median_s = {p: entry["phase_s"][p]["median"] for p in PHASES}
                    entry["mfu"] = mfu(flops, median_s, limits[f"peak_{args.precision}_gflops"])
                    rows = {"generate": "decode", "score": "score", "update": "update"}
                    by_rows = limits[f"best_{args.precision}_gflops_by_rows"]
                    entry["mfu_vs_phase_shape"] = {p: flops[p] / median_s[p] / (by_rows[rows[p]] * 1e9) for p in PHASES}
                for key in ("rto_file", "versions", "trainable", "optimizer"):
                    if key in ok[0]:
                        entry[key] = ok[0][key]
            out.setdefault(group, {})[kind] = entry
    return out


def headline(table: dict) -> dict:
    """The flat keys of throughput.json (no suffix: every layer trained; _top6: the top 6 layers)."""
    flat: dict = {}
    spreads: dict = {}
    for group, suffix in (("all", ""), ("top6", "_top6")):
        g = table.get(group, {})

        def put(key: str, kind: str, field: tuple, stat: str = "median") -> None:
            node = g.get(kind)
            for f in field:
                node = node.get(f) if isinstance(node, dict) else None
            if isinstance(node, dict):
                flat[key] = node[stat]
                spreads[key] = [node["min"], node["max"]]

        for kind in ("ours_rto", "ours_ppo", "trl_ppo"):
            put(f"{kind}_samples_per_s{suffix}", kind, ("samples_per_s",))
            put(f"peak_rss_{kind}_mb{suffix}", kind, ("peak_rss_mb",), "max")
        put(f"ours_rto_samples_per_s_before{suffix}", "ours_rto_before", ("samples_per_s",))
        put(f"peak_rss_ours_rto_before_mb{suffix}", "ours_rto_before", ("peak_rss_mb",), "max")
        flat[f"mfu{suffix}"] = {kind: e["mfu"] for kind, e in g.items() if "mfu" in e}
    if "ours_rto_samples_per_s_before" not in flat and "ours_rto_samples_per_s_before_top6" in flat:
        # the older commit measured with the top 6 layers only (its generation does not depend on the layers)
        flat["ours_rto_samples_per_s_before"] = flat["ours_rto_samples_per_s_before_top6"]
        spreads["ours_rto_samples_per_s_before"] = spreads["ours_rto_samples_per_s_before_top6"]
        flat["before_layers"] = "top6"
    gen = [t for grp in ("all", "top6") for t in [table.get(grp, {}).get("ours_rto", {}).get("tokens_per_s")] if t]
    gen_before = [t for grp in ("all", "top6")
                  for t in [table.get(grp, {}).get("ours_rto_before", {}).get("tokens_per_s")] if t]
    if gen:
        flat["generation_tokens_per_s"] = statistics.median([t["generate"]["median"] for t in gen])
    if gen_before:
        flat["generation_tokens_per_s_before"] = statistics.median([t["generate"]["median"] for t in gen_before])
    return {**flat, "spreads": spreads}


def generation_ceiling(limits: dict | None, precision: str = "fp32") -> float | None:
    """Tokens/s no fp32 decode loop at the rollout's batch size can pass here: rows / the step's matmul floor
    (measured in fp32 only: None for a bf16 run)."""
    if precision != "fp32":
        return None
    return ((limits or {}).get("decode_step_floor") or {}).get("ceiling_tokens_per_s")


def acceptance(flat: dict) -> dict:
    """The targets, as measured: top 6 layers RTO >= 2x TRL; all layers RTO >= TRL; peak memory <= TRL's."""
    def ratio(a: str, b: str):
        return flat[a] / flat[b] if a in flat and b in flat else None

    checks = {
        "rto_vs_trl_top6": (ratio("ours_rto_samples_per_s_top6", "trl_ppo_samples_per_s_top6"), 2.0, ">="),
        "rto_vs_trl_all": (ratio("ours_rto_samples_per_s", "trl_ppo_samples_per_s"), 1.0, ">="),
        "rss_rto_over_trl_all": (ratio("peak_rss_ours_rto_mb", "peak_rss_trl_ppo_mb"), 1.0, "<="),
        "rss_rto_over_trl_top6": (ratio("peak_rss_ours_rto_mb_top6", "peak_rss_trl_ppo_mb_top6"), 1.0, "<="),
        "rto_speedup_vs_before_all": (ratio("ours_rto_samples_per_s", "ours_rto_samples_per_s_before")
                                      if flat.get("before_layers") != "top6" else None, None, None),
        "rto_speedup_vs_before_top6": (ratio("ours_rto_samples_per_s_top6", "ours_rto_samples_per_s_before_top6"),
                                       None, None),
    }
    out = {}
    for name, (value, target, op) in checks.items():
        met = None if value is None or target is None else (value >= target if op == ">=" else value <= target)
        out[name] = {"ratio": value, "target": f"{op} {target}" if target else None, "met": met}
    return out


def markdown_table(table: dict) -> str:
    """The results as a markdown table (one row per layer setting and contender)."""
    lines = ["| layers trained | contender | samples/s (min-max) | iteration s | gen tok/s | score tok/s | "
             "update tok/s | MFU gen / score / update | peak RSS MB | load s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for group, label in (("all", "all 30"), ("top6", "top 6")):
        for kind, e in table.get(group, {}).items():
            if "samples_per_s" not in e:
                lines.append(f"| {label} | {kind} | failed | | | | | | | |")
                continue
            s, tp, m = e["samples_per_s"], e["tokens_per_s"], e.get("mfu", {})
            lines.append(
                f"| {label} | {kind} | {s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f}) | "
                f"{e['iteration_s']['median']:.1f} | {tp['generate']['median']:.0f} | {tp['score']['median']:.0f} | "
                f"{tp['update']['median']:.0f} | "
                + " / ".join(f"{100 * m[p]:.0f}%" if p in m else "-" for p in PHASES)
                + f" | {e['peak_rss_mb']['max']:.0f} | {e['load_s']['median']:.1f} |")
    return "\n".join(lines)


def plot(table: dict, path: Path, title: str) -> None:
    """Samples/s per contender (median, min-max bars), one panel per layer setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in ("all", "top6") if g in table]
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False)
    for ax, group in zip(axes[0], groups):
        kinds = [k for k in CONTENDERS if "samples_per_s" in table[group].get(k, {})]
        med = [table[group][k]["samples_per_s"]["median"] for k in kinds]
        lo = [m - table[group][k]["samples_per_s"]["min"] for m, k in zip(med, kinds)]
        hi = [table[group][k]["samples_per_s"]["max"] - m for m, k in zip(med, kinds)]
        colors = ["tab:green" if k == "ours_rto" else "tab:blue" if k == "ours_ppo" else "tab:red" if k == "trl_ppo"
                  else "tab:gray" for k in kinds]
        ax.bar(range(len(kinds)), med, yerr=[lo, hi], capsize=4, color=colors)
        ax.margins(y=0.12)  # room above the highest cap for its label
        ax.set_xticks(range(len(kinds)), [k.replace("_", "\n", 1) for k in kinds])
        ax.set_ylabel("samples/s (responses per second of an iteration)")
        ax.set_title("every layer trained" if group == "all" else "top 6 of 30 layers trained")
        for i, (m, h) in enumerate(zip(med, hi)):  # above the error bar's cap, where the spread does not hide it
            ax.annotate(f"{m:.2f}", (i, m + h), xytext=(0, 3), textcoords="offset points", ha="center",
                        va="bottom", fontsize=8)
    # wrapped to the figure's width (about 75 characters of 9-point text per 5.5-inch panel): a machine's name
    # and the date made one line wider than a one-panel figure
    fig.suptitle(textwrap.fill(title, 75 * len(groups)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def versions(trl_sample: dict | None) -> dict:
    import accelerate
    import torch
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "trl_env": (trl_sample or {}).get("versions")}


# ----------------------------------------------------------------------------------------------- main

def load_store(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def append_store(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def results_name(args: argparse.Namespace) -> str:
    """throughput (fp32), or throughput-bf16: runs of each precision keep their own results files."""
    return "throughput" if args.precision == "fp32" else f"throughput-{args.precision}"


def write_results(args: argparse.Namespace, store: Path, limits_path: Path, prompt_ids: list, command: str) -> dict:
    rows = load_store(store)
    samples = [r for r in rows if r.get("type") == "sample"]
    limits = json.loads(limits_path.read_text()) if limits_path.exists() else None
    prompt_tokens = sum(len(p) for p in prompt_ids[-args.rollout_size:]) / args.rollout_size  # the timed rollout's
    table = summarize(samples, limits, args, prompt_tokens)
    flat = headline(table)
    trl = next((s for s in samples if s["contender"] == "trl_ppo" and s.get("versions")), None)
    result = {
        **flat,
        "generation_ceiling_tokens_per_s": generation_ceiling(limits, args.precision),
        "precision": args.precision,
        "acceptance": acceptance(flat),
        "command": command,
        "commands": sorted({r["command"] for r in rows if "command" in r}, key=lambda c: c),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "measured": sorted({r["date"] for r in rows if "date" in r}),
        "machine": (limits or {}).get("cpu"),
        "limits": limits,
        "versions": versions(trl),
        "repetitions": {f"{g}/{k}": e["samples_per_s"]["n"] for g, t in table.items() for k, e in t.items()
                        if "samples_per_s" in e},
        "settings": {"model": f"SmolLM2-135M-Instruct (rto.models.DEFAULT_MODEL), {args.precision}",
                     "precision": args.precision + (" (autocast, fp32 weights)" if args.precision == "bf16" else ""),
                     "rollout_size": args.rollout_size, "max_new_tokens": args.max_new_tokens,
                     "fixed_response_length": True, "minibatch_size": args.minibatch_size,
                     "ppo_epochs": args.ppo_epochs, "iterations_per_process": args.iterations,
                     "timed_iteration": args.iterations, "system_prompt": args.system_prompt,
                     "mean_prompt_tokens": prompt_tokens, "before_commit": args.before, "seed": args.seed,
                     "prompts": "sentiment task train prompts, rto ppo's seeded order"},
        "contenders": table,
        "table_markdown": markdown_table(table),
    }
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{results_name(args)}.json").write_text(json.dumps(result, indent=1))
    if any("samples_per_s" in e for t in table.values() for e in t.values()):
        plot(table, results / f"{results_name(args)}.png",
             f"one PPO iteration, SmolLM2-135M {args.precision}, rollout {args.rollout_size} x {args.max_new_tokens} tokens, "
             f"{(limits or {}).get('cpu', {}).get('model', '?')} ({(limits or {}).get('cpu', {}).get('logical_cpus', '?')}"
             f" CPUs), {result['date']}")
    return result


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so a running contender is stopped too
    args = parse_args(argv)
    command = shlex.join(["python", "-m", "benchmarks.throughput", *(sys.argv[1:] if argv is None else argv)])
    scratch = Path(args.scratch).resolve()
    for sub in ("logs", "specs", "runs", "models"):
        (scratch / sub).mkdir(parents=True, exist_ok=True)
    key = settings_key(args)
    store, limits_path = scratch / f"samples-{key}.jsonl", scratch / f"limits-{key}.json"
    if args.only is None and store.exists():
        store.unlink()  # a whole run starts from nothing
    prompt_ids = rollout_prompt_ids(args)
    if args.only in (None, "limits"):
        from benchmarks._machine import measure_limits

        seq = round(sum(len(p) for p in prompt_ids) / len(prompt_ids)) + args.max_new_tokens
        rows = {"decode": args.rollout_size, "score": args.rollout_size * seq, "update": args.minibatch_size * seq}
        print(f"measuring the machine's limits (matmul rows {rows})", flush=True)
        s = SMOLLM2_135M
        limits_path.write_text(json.dumps(measure_limits(s.hidden, s.intermediate, s.vocab, rows, args.quick,
                                                         weight_matrices(s)), indent=1))
        append_store(store, {"type": "limits", "command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                           time.gmtime())})
    groups = args.groups if args.only is None else [args.only] if args.only in GROUPS else []
    if groups:
        ctx = {"scratch": scratch, "models": model_folders(scratch, args.seed), "prompt_ids": prompt_ids,
               "trl_python": trl_python(scratch) if "trl_ppo" in args.contenders else None,
               "before": before_tree(scratch, args.before) if "ours_rto_before" in args.contenders else None}
        steps = args.steps
        for group in groups:
            done = sum(1 for r in load_store(store) if r.get("type") == "sample" and r["group"] == group)
            for rep, kind in schedule(args.contenders, args.reps)[done:]:
                if steps is not None and steps <= 0:
                    break
                steps = None if steps is None else steps - 1
                sample = measure(kind, group, rep, ctx, args)
                sample.update(type="sample", command=command, source=source_fingerprint(kind, ctx),
                              date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
                append_store(store, sample)
                it = (sample.get("iterations") or [{}])[-1]
                print(f"{group} rep {rep} {kind}: exit {sample['exit']}, iteration "
                      f"{it.get('time_iteration_s', float('nan')):.1f} s (gen {it.get('time_generate_s', 0):.1f}, "
                      f"score {it.get('time_score_s', 0):.1f}, update {it.get('time_update_s', 0):.1f}), "
                      f"load {sample.get('load_s', float('nan')):.1f} s, peak RSS {sample['peak_rss_mb']:.0f} MB",
                      flush=True)
    if args.only in (None, "report"):
        result = write_results(args, store, limits_path, prompt_ids, command)
        print(result["table_markdown"])
        print(json.dumps(result["acceptance"], indent=1))
        print(f"wrote {Path(args.results) / (results_name(args) + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
