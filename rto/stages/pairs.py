"""`rto pairs`: sample k responses per prompt and rank them by the task's gold scorer.

As in the DPO paper's sentiment experiment: for each prompt the best and the worst of k samples
(by gold score) become one (chosen, rejected) pair in `pairs.jsonl`; prompts whose samples all tie
are dropped. With `all_pairs`, `all_pairs.jsonl` also holds every untied pair of the k samples
(up to k(k-1)/2 per prompt, as InstructGPT trains its reward model): more comparisons for the
same sampling cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rto.data import write_jsonl
from rto.distributed import gather_lists, share_bounds
from rto.models import DEFAULT_MODEL, load_causal_lm, load_tokenizer
from rto.rollout import decode_responses, generate
from rto.stages.common import Common, check_token_budget, drop_long_prompts, start
from rto.tasks import get_task, prompts_and_rows


@dataclass
class PairsConfig(Common):
    """Fields of `rto pairs`: k sampled responses per prompt, ranked by the task's gold scorer into pairs."""

    out: str = "runs/pairs"
    policy: str = DEFAULT_MODEL
    """The model that samples the responses: the embedded name, a local folder or a hub id."""
    task: str = "sentiment"
    """The task (rto.tasks: sentiment, ifeval): its train prompts and the gold scorer that ranks the samples."""
    prompts: str | None = None
    """A prompt file (JSON Lines, Parquet or a datasets folder) instead of the task's train prompts."""
    num_prompts: int | None = 320
    """Prompts used, a subset drawn with `seed`; null = all; >= 1."""
    samples_per_prompt: int = 2
    """Responses sampled per prompt (k); the best and the worst by gold score make its pair; >= 2."""
    max_new_tokens: int = 40
    """Longest response, in tokens: sampling stops at EOS or here; >= 1."""
    temperature: float = 1.0
    """Sampling temperature T (the logits are divided by it); > 0."""
    top_k: int = 0
    """Sample only from the k most likely tokens; 0 = no cut (pure sampling); >= 0."""
    top_p: float = 1.0
    """Nucleus sampling: only from the most likely tokens whose probabilities add up to top_p; 1 = no cut;
    in (0, 1]."""
    batch_size: int = 64
    """Responses generated at a time; >= 1."""
    all_pairs: bool = False
    """Also write all_pairs.jsonl with every untied pair of the k samples (up to k(k-1)/2 per prompt)."""


def run(cfg: PairsConfig) -> dict:
    if cfg.samples_per_prompt < 2:
        raise ValueError(f"samples_per_prompt must be >= 2, got {cfg.samples_per_prompt}")
    run_, accelerator = start(cfg, "pairs")
    prompts, prompt_rows = prompts_and_rows(cfg.task, cfg.prompts, "train", cfg.num_prompts, cfg.seed)  # with each prompt's file row
    scorer = get_task(cfg.task).gold_scorer()
    tokenizer = load_tokenizer(cfg.policy, cfg.trust_remote_code, role="policy")
    check_token_budget(cfg, cfg.policy, "policy", cfg.max_new_tokens)
    kept, prompt_ids = drop_long_prompts(run_, tokenizer, list(zip(prompts, prompt_rows)), cfg, "prompts", lambda x: x[0])
    prompts, prompt_rows = [p for p, _ in kept], [r for _, r in kept]
    model = load_causal_lm(cfg.policy, cfg.trust_remote_code, role="policy").to(accelerator.device)

    k = cfg.samples_per_prompt
    repeated = [ids for ids in prompt_ids for _ in range(k)]
    # the seeds of every sample, drawn as one process draws them; each process samples its share of the prompts
    # (rto.distributed) and the texts are gathered, so the pairs do not depend on the number of processes
    pure = not cfg.top_k and cfg.top_p >= 1.0  # top-k / top-p sampling draws from the global RNG (rollout.generate)
    seeds = torch.randint(0, 2**62, (len(repeated),)).tolist() if pure else None
    start_at, stop = share_bounds(len(prompts))
    rollout = generate(model, tokenizer, repeated[start_at * k : stop * k], max_new_tokens=cfg.max_new_tokens,
                       temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, batch_size=cfg.batch_size,
                       autocast=accelerator.autocast, desc="sampling pairs", progress=cfg.progress,
                       seeds=seeds[start_at * k : stop * k] if pure else None)
    texts = gather_lists(decode_responses(tokenizer, rollout.response_ids))
    scores = torch.tensor(scorer(texts, [r for r in prompt_rows for _ in range(k)])).view(len(prompts), k)
    ended = torch.tensor(gather_lists(rollout.ended.tolist())).view(len(prompts), k)

    def pair(i: int, a: int, b: int) -> dict:  # sample a of prompt i preferred to sample b
        return {"prompt": prompts[i], "chosen": texts[i * k + a], "rejected": texts[i * k + b],
                "chosen_ended": bool(ended[i, a]), "rejected_ended": bool(ended[i, b]),
                "chosen_score": float(scores[i, a]), "rejected_score": float(scores[i, b])}

    # a sample that decodes to nothing but whitespace (e.g. only EOS) is no answer: it never becomes chosen or
    # rejected (the data check of rm, dpo and sft would refuse the file)
    usable = torch.tensor([bool(t.strip()) for t in texts]).view(len(prompts), k)
    rows, every, ties, too_few = [], [], 0, 0
    for i in range(len(prompts)):
        keep = usable[i].nonzero().flatten().tolist()
        if len(keep) < 2:
            too_few += 1
            continue
        best = max(keep, key=lambda j: float(scores[i, j]))
        worst = min(keep, key=lambda j: float(scores[i, j]))
        if scores[i, best] == scores[i, worst]:
            ties += 1
            continue
        rows.append(pair(i, best, worst))
        every += [pair(i, a, b) for a in keep for b in keep if scores[i, a] > scores[i, b]]
    path = write_jsonl(run_.dir / "pairs.jsonl", rows) if run_.writer else run_.dir / "pairs.jsonl"
    summary = {
        "prompts": len(prompts), "samples": len(texts), "pairs": len(rows), "ties_dropped": ties,
        "empty_samples": int((~usable).sum()), "prompts_without_two_answers": too_few,
        "gold_mean": float(scores.mean()), "eos_rate": float(ended.float().mean()),
        "chosen_minus_rejected": float(sum(r["chosen_score"] - r["rejected_score"] for r in rows) / max(len(rows), 1)),
        "file": str(path),
    }
    if cfg.all_pairs:
        summary["all_pairs"] = len(every)
        summary["all_pairs_file"] = str(write_jsonl(run_.dir / "all_pairs.jsonl", every) if run_.writer
                                        else run_.dir / "all_pairs.jsonl")
    if too_few:
        run_.note(f"pairs: {int((~usable).sum())} of {len(texts)} samples were empty or only whitespace; "
                  f"{too_few} prompts dropped: fewer than 2 non-empty samples")
    run_.note(f"pairs: {len(rows)} pairs from {len(prompts)} prompts x {k} samples "
              f"({ties} prompts dropped: all samples tied)"
             f"{f', {len(every)} in all_pairs.jsonl' if cfg.all_pairs else ''}; gold mean {summary['gold_mean']:.3f}; -> {path}")
    run_.finish(summary)
    return summary
