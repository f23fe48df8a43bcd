"""Generation speed: transformers' `generate` (the old path) against rto's decode loop, in one process.

`python -m benchmarks.generation` samples responses to 32 train prompts of the sentiment task (with the chat
template's default system prompt, max_new_tokens 40, T = 1, top_k 0, top_p 1) from SmolLM2-135M-Instruct in
fp32, alternating the two paths `--reps` times each, and counts tokens as PPO's tokens_per_s_generate does: real
response tokens, EOS included. It prints the median and spread of each path's tokens/s and their ratio, and
writes benchmarks/results/generation.json (with --demo: generation-demo.json).

`--demo` samples at the settings of the demo's PPO rollout instead: rto's empty system message, max_new_tokens 32,
`--precision auto` (bf16 on a CPU with native bf16, else fp32) and the policy as the demo trains it (the top 6 of
its 30 layers trainable, the rest frozen; rto's loop then keeps the states of the 24 frozen layers for the scoring
pass, as PPO has it do). The frozen weights matter to the old path: under bf16 autocast, transformers' `generate`
casts a frozen weight again at every step (autocast caches only the casts of weights that require gradients).
Each of these settings can also be given alone (`--system_prompt`, `--max_new_tokens`, `--precision`,
`--train_layers`).

It also times the weight products inside rto's loop (every linear layer and the LM head, as
rto.decoding.PackedProducts runs them) and reports their share of the loop's time, and the bound they set:
tokens / products' seconds, against transformers' tokens/s of the same repetition. That bound is the speed-up
over `generate` that a loop running these products could reach if everything else it does (attention, norms,
sampling, Python) took no time at all.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
import transformers

from benchmarks._machine import cpu_info
from rto.decoding import PackedProducts
from rto.models import DEFAULT_MODEL, load_causal_lm, load_tokenizer, set_trainable
from rto.rollout import _generate_transformers, encode_prompts, generate
from rto.runtime import resolve_precision
from rto.tasks import get_task


@contextmanager
def product_clock():
    """While active, every product that rto.decoding.PackedProducts computes is timed: yields a dict whose
    "seconds" and "products" add up their wall-clock time and count."""
    clock = {"seconds": 0.0, "products": 0}
    forward = PackedProducts._forward

    def timed(self, linear, x):
        start = time.perf_counter()
        y = forward(self, linear, x)
        clock["seconds"] += time.perf_counter() - start
        clock["products"] += 1
        return y
    PackedProducts._forward = timed
    try:
        yield clock
    finally:
        PackedProducts._forward = forward


def timed_rollout(fn, model, tokenizer, prompt_ids, max_new_tokens: int, seed: int, autocast=None) -> dict:
    """One call of `fn` on all prompts: seconds, response tokens (EOS included), tokens/s, EOS rate, and the
    seconds and count of the products that rto's PackedProducts ran in it (0 for transformers' `generate`)."""
    torch.manual_seed(seed)
    with product_clock() as clock:
        start = time.perf_counter()
        rollout = fn(model, tokenizer, prompt_ids, max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0,
                     top_k=0, batch_size=len(prompt_ids), progress=False, return_logprobs=True, autocast=autocast)
        seconds = time.perf_counter() - start
    tokens = int(rollout.batch.response_mask.sum())
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "ended": float(rollout.ended.float().mean()), "products_s": clock["seconds"],
            "products": clock["products"]}


def products_bound(rto_runs: list[dict], transformers_runs: list[dict]) -> dict:
    """The products' share of rto's loop, and the speed-up over `generate` they leave room for: per repetition
    (tokens / products' seconds) / transformers' tokens/s, the median over repetitions."""
    shares = [r["products_s"] / r["seconds"] for r in rto_runs]
    bounds = [r["tokens"] / r["products_s"] / t["tokens_per_s"] for r, t in zip(rto_runs, transformers_runs)]
    return {"products_share_median": statistics.median(shares), "products_only_bound_median": statistics.median(bounds),
            "products_only_bound_min": min(bounds), "products_only_bound_max": max(bounds)}


def summary(runs: list[dict]) -> dict:
    rates = [r["tokens_per_s"] for r in runs]
    return {"tokens_per_s_median": statistics.median(rates), "tokens_per_s_min": min(rates),
            "tokens_per_s_max": max(rates), "runs": runs}


DEMO = {"max_new_tokens": 32, "system_prompt": "", "precision": "auto", "train_layers": 6}
PLAIN = {"max_new_tokens": 40, "system_prompt": None, "precision": "fp32", "train_layers": None}


def fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """The settings left unset (None) take the demo's PPO rollout's with --demo (DEMO), else PLAIN's."""
    for key, value in (DEMO if args.demo else PLAIN).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=None, help="default 40 (--demo: 32)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--group_size", type=int, default=1, help="each prompt repeated this many times in a row")
    parser.add_argument("--system_prompt", default=None,
                        help="system message of every prompt (default: the chat template's own; --demo: empty)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "auto"], default=None,
                        help="fp32 (default) or bf16 autocast; auto: bf16 on a CPU with native bf16 (--demo)")
    parser.add_argument("--train_layers", type=int, default=None,
                        help="only the top N layers trainable, as a PPO policy (--demo: 6; default: all)")
    parser.add_argument("--demo", action="store_true", help="the demo's PPO rollout settings (above)")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/generation.json "
                                                     "(--demo: generation-demo.json)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = str(Path(__file__).parent / "results" / ("generation-demo.json" if args.demo else "generation.json"))
    fill_defaults(args)
    precision = resolve_precision(args.precision)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else None

    model, tokenizer = load_causal_lm(DEFAULT_MODEL).eval(), load_tokenizer(DEFAULT_MODEL)
    set_trainable(model, args.train_layers)
    trunk = 0 if args.train_layers is None else max(model.config.num_hidden_layers - args.train_layers, 0)
    paths = {"transformers": _generate_transformers, "rto": partial(generate, trunk_layers=trunk)}
    prompts = get_task("sentiment").prompts("train")[: args.prompts // args.group_size]
    prompt_ids = [ids for ids in encode_prompts(tokenizer, prompts, args.system_prompt) for _ in range(args.group_size)]
    for fn in paths.values():  # warm-up of both code paths
        timed_rollout(fn, model, tokenizer, prompt_ids[:4], 4, seed=0, autocast=autocast)
    runs: dict[str, list[dict]] = {name: [] for name in paths}
    for rep in range(args.reps):
        for name, fn in paths.items():  # alternate, same seed per repetition for both paths
            runs[name].append(timed_rollout(fn, model, tokenizer, prompt_ids, args.max_new_tokens, seed=rep,
                                            autocast=autocast))
            print(f"rep {rep} {name:12s} {runs[name][-1]['tokens']:5d} tokens in {runs[name][-1]['seconds']:6.2f} s "
                  f"= {runs[name][-1]['tokens_per_s']:6.1f} tok/s (EOS rate {runs[name][-1]['ended']:.2f})", flush=True)
    figures = {name: summary(r) for name, r in runs.items()}
    ratio = figures["rto"]["tokens_per_s_median"] / figures["transformers"]["tokens_per_s_median"]
    for name, f in figures.items():
        print(f"{name:12s} median {f['tokens_per_s_median']:6.1f} tok/s (min {f['tokens_per_s_min']:.1f}, "
              f"max {f['tokens_per_s_max']:.1f})")
    print(f"ratio rto / transformers: {ratio:.2f}x")
    bound = products_bound(runs["rto"], runs["transformers"])
    print(f"rto's products: {bound['products_share_median']:.0%} of its loop; with nothing else, at most "
          f"{bound['products_only_bound_median']:.2f}x transformers ({bound['products_only_bound_min']:.2f}-"
          f"{bound['products_only_bound_max']:.2f})")
    cpu = cpu_info(Path("/proc/cpuinfo").read_text()) if Path("/proc/cpuinfo").exists() else {}
    result = {
        "command": "python -m benchmarks.generation " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": {k: cpu.get(k) for k in ("model", "logical_cpus", "vector_flags")},
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
        "settings": {"model": DEFAULT_MODEL, "precision": precision, "prompts": len(prompt_ids),
                     "group_size": args.group_size,
                     "system_prompt": "chat template default" if args.system_prompt is None else args.system_prompt,
                     "train_layers": args.train_layers, "trunk_layers_kept_by_rto": trunk,
                     "mean_prompt_tokens": sum(map(len, prompt_ids)) / len(prompt_ids),
                     "max_new_tokens": args.max_new_tokens, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                     "batch_size": len(prompt_ids), "reps": args.reps},
        "tokens_counted": "response tokens, EOS included (as PPO's tokens_per_s_generate)",
        "paths": figures, "ratio_median": ratio, "products": bound,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
