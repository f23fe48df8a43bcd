"""How often the base model follows the instruction-following task's constraints, sampled as `rto eval` samples.

    python -m benchmarks.ifeval_baseline                         # writes benchmarks/results/ifeval_baseline.json
    python -m benchmarks.ifeval_baseline --max_new_tokens 64 --samples 2 --out /tmp/b.json

The embedded SmolLM2-135M-Instruct answers every eval prompt of the task `--samples` times (pure sampling at
temperature 1, top_k 0, top_p 1, empty system message, as the ifeval recipe's stages do; rto.rollout's
encode_prompts / generate / decode_responses and the task's gold scorer, as in `rto eval`). Reported:

* the gold score (share of a prompt's constraints followed) over all samples, with a 95% interval over prompts
  (each prompt's mean over its samples is one observation, since the samples of a prompt are not independent);
* per instruction kind, and per kind and argument, the share of the asked constraints followed (with counts);
* for `--train_prompts` train prompts (the subset `rto pairs` draws with the same seed), sampled 4 times each as
  the pairs stage does: the share of prompts whose 4 samples all score the same (no preference pair), counted
  as `rto pairs` counts them (answers that are only whitespace are no answer).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from rto.tasks.make_ifeval_prompts import ANSWER_TOKENS

OUT = Path(__file__).with_name("results") / "ifeval_baseline.json"
PAIR_SAMPLES = 4  # samples per prompt in the recipe's pairs stage


def prompt_means(scores: Sequence[float], k: int) -> torch.Tensor:
    """[P] mean score of each prompt, from P*k scores laid out prompt by prompt (k samples each)."""
    return torch.tensor(scores, dtype=torch.float64).view(-1, k).mean(1)


def tied_prompts(scores: Sequence[float], usable: Sequence[bool], k: int) -> list[bool]:
    """For each prompt (k samples each, laid out prompt by prompt): True when it yields no preference pair, as in
    `rto pairs`: fewer than 2 usable (non-empty) samples, or all usable samples with the same score."""
    out = []
    for i in range(len(scores) // k):
        kept = [scores[i * k + j] for j in range(k) if usable[i * k + j]]
        out.append(len(kept) < 2 or max(kept) == min(kept))
    return out


def argument_label(kwargs: Mapping | None) -> str:
    """The arguments that set a constraint's difficulty, as text ('num_words<20', 'num_placeholders=2'); the
    words themselves (keywords, forbidden words) are left out. '' for a kind without such arguments."""
    kwargs = kwargs or {}
    if "relation" in kwargs:
        size = kwargs.get("num_words", kwargs.get("frequency"))
        return f"{'<' if kwargs['relation'] == 'less than' else '>='}{size}"
    parts = [f"{k}={v}" for k, v in sorted(kwargs.items()) if k in ("num_highlights", "num_placeholders",
                                                                     "postscript_marker")]
    if "keywords" in kwargs:
        parts.append(f"{len(kwargs['keywords'])} word{'s' if len(kwargs['keywords']) > 1 else ''}")
    return ", ".join(parts)


def follow_counts(results: list[list[tuple[str, bool]]], rows: Sequence[Mapping], by_argument: bool = False) -> dict:
    """{kind (or 'kind [argument]'): {"followed", "asked", "rate"}} over every constraint of every answer;
    results[i] is the scorer's check of answer i, rows[i] the prompt row it answers."""
    counts: dict[str, list[int]] = {}
    for result, row in zip(results, rows):
        for (kind, ok), kwargs in zip(result, row["kwargs"]):
            key = f"{kind} [{argument_label(kwargs)}]" if by_argument and argument_label(kwargs) else kind
            c = counts.setdefault(key, [0, 0])
            c[0] += ok
            c[1] += 1
    return {key: {"followed": f, "asked": n, "rate": f / n} for key, (f, n) in sorted(counts.items())}


def markdown_table(counts: Mapping[str, Mapping]) -> str:
    """The per-kind counts as a markdown table: kind, success rate, n (constraints asked)."""
    lines = ["| kind | success rate | n |", "|---|---:|---:|"]
    for kind, c in sorted(counts.items(), key=lambda kv: -kv[1]["rate"]):
        lines.append(f"| {kind} | {c['rate']:.2f} | {c['asked']} |")
    return "\n".join(lines)


def sample(model, tokenizer, prompts: list[list[dict]], k: int, args, autocast) -> tuple[list[str], torch.Tensor, list]:
    """k answers to each prompt (prompt by prompt), sampled as `rto eval` does: (texts, ended [P*k], lengths)."""
    from rto.rollout import decode_responses, encode_prompts, generate

    ids = encode_prompts(tokenizer, prompts, args.system_prompt)
    too_long = sum(len(x) > args.max_prompt_tokens for x in ids)
    if too_long:
        raise SystemExit(f"ifeval_baseline: {too_long} prompts are longer than {args.max_prompt_tokens} tokens")
    torch.manual_seed(args.seed)
    rollout = generate(model, tokenizer, [x for x in ids for _ in range(k)], max_new_tokens=args.max_new_tokens,
                       temperature=1.0, top_p=1.0, top_k=0, batch_size=args.batch_size, autocast=autocast,
                       desc="ifeval baseline", progress=False)
    lengths = [len(r) for r in rollout.response_ids]
    return decode_responses(tokenizer, rollout.response_ids), rollout.ended, lengths


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="base-model success rates on the ifeval task's constraints")
    parser.add_argument("--max_new_tokens", type=int, default=ANSWER_TOKENS)
    parser.add_argument("--samples", type=int, default=4, help="answers per eval prompt")
    parser.add_argument("--eval_prompts", type=int, default=None, help="a seeded subset of the eval prompts; "
                        "default all")
    parser.add_argument("--train_prompts", type=int, default=96, help="train prompts for the tie count (0: none)")
    parser.add_argument("--prompts", default=None, help="a prompt file in the task's layout instead of its own")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--system_prompt", default="")
    parser.add_argument("--max_prompt_tokens", type=int, default=256)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    from rto.models import DEFAULT_MODEL, load_causal_lm, load_tokenizer
    from rto.runtime import machine, make_accelerator, resolve_precision, versions
    from rto.stages.eval import mean_ci95
    from rto.tasks import get_task, prompts_and_rows

    accelerator = make_accelerator("auto")
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    model = load_causal_lm(DEFAULT_MODEL).to(accelerator.device).eval()
    scorer = get_task("ifeval").gold_scorer()
    start = time.perf_counter()

    k = args.samples
    prompts, rows = prompts_and_rows("ifeval", args.prompts, "eval", args.eval_prompts, args.seed)
    texts, ended, lengths = sample(model, tokenizer, prompts, k, args, accelerator.autocast)
    rows_k = [r for r in rows for _ in range(k)]
    results = scorer.check(texts, rows_k)
    gold = [sum(ok for _, ok in r) / len(r) for r in results]
    mean, ci = mean_ci95(prompt_means(gold, k))
    by_kind = follow_counts(results, rows_k)
    evaluation = {
        "prompts": len(prompts), "samples_per_prompt": k, "gold_mean": mean, "gold_ci95": ci,
        "all_followed_share": sum(g == 1.0 for g in gold) / len(gold), "eos_rate": float(ended.float().mean()),
        "mean_length": sum(lengths) / len(lengths), "by_kind": by_kind,
        "by_argument": follow_counts(results, rows_k, by_argument=True),
        "examples": [{"prompt": rows[i // k]["prompt"], "response": texts[i], "gold": gold[i]}
                     for i in range(0, min(3, len(prompts)) * k, k)],
    }
    print(f"eval: {len(prompts)} prompts x {k} samples, gold {mean:.3f} +- {ci:.3f} (95% CI over prompts), "
          f"EOS rate {evaluation['eos_rate']:.2f}, mean length {evaluation['mean_length']:.1f} tokens")
    print(markdown_table(by_kind))

    train = None
    if args.train_prompts:
        t_prompts, t_rows = prompts_and_rows("ifeval", args.prompts, "train", args.train_prompts, args.seed)
        t_texts, t_ended, _ = sample(model, tokenizer, t_prompts, PAIR_SAMPLES, args, accelerator.autocast)
        t_gold = scorer(t_texts, [r for r in t_rows for _ in range(PAIR_SAMPLES)])
        tied = tied_prompts(t_gold, [bool(t.strip()) for t in t_texts], PAIR_SAMPLES)
        train = {"prompts": len(t_prompts), "samples_per_prompt": PAIR_SAMPLES, "all_tied": sum(tied),
                 "all_tied_share": sum(tied) / len(tied), "gold_mean": sum(t_gold) / len(t_gold),
                 "eos_rate": float(t_ended.float().mean())}
        print(f"train: {sum(tied)} of {len(tied)} prompts have all {PAIR_SAMPLES} samples tied "
              f"({train['all_tied_share']:.2f}); gold {train['gold_mean']:.3f}")

    report = {
        "command": " ".join(["python -m benchmarks.ifeval_baseline", *map(shlex.quote, argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": machine(), "versions": versions(), "precision": resolve_precision("auto"),
        "model": DEFAULT_MODEL, "seed": args.seed,
        "settings": {"task": "ifeval", "prompts": args.prompts or str(get_task("ifeval").prompts_file.name),
                     "max_new_tokens": args.max_new_tokens, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                     "system_prompt": args.system_prompt, "batch_size": args.batch_size},
        "eval": evaluation, "train_ties": train, "seconds": round(time.perf_counter() - start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({report['seconds']} s sampling and scoring)")
    return report


if __name__ == "__main__":
    main()
