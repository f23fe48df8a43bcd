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
from rto.models import DEFAULT_MODEL, load_causal_lm, load_tokenizer
from rto.rollout import decode_responses, generate
from rto.stages.common import Common, check_token_budget, drop_long_prompts, start
from rto.tasks import get_task, prompts_and_rows


@dataclass
class PairsConfig(Common):
    out: str = "runs/pairs"
    policy: str = DEFAULT_MODEL  # the model that samples the responses
    task: str = "sentiment"  # embedded task: its train prompts and its gold scorer
    prompts: str | None = None  # a prompt file instead of the task's prompts
    num_prompts: int | None = 320  # a seeded subset; null = all
    samples_per_prompt: int = 2
    max_new_tokens: int = 40
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k (pure sampling)
    top_p: float = 1.0
    batch_size: int = 64
    all_pairs: bool = False  # also write all_pairs.jsonl with every untied pair of the k samples


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
    rollout = generate(model, tokenizer, repeated, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                       top_p=cfg.top_p, top_k=cfg.top_k, batch_size=cfg.batch_size, autocast=accelerator.autocast,
                       desc="sampling pairs", progress=cfg.progress)
    texts = decode_responses(tokenizer, rollout.response_ids)
    scores = torch.tensor(scorer(texts, [r for r in prompt_rows for _ in range(k)])).view(len(prompts), k)
    ended = rollout.ended.view(len(prompts), k)

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
    path = write_jsonl(run_.dir / "pairs.jsonl", rows)
    summary = {
        "prompts": len(prompts), "samples": len(texts), "pairs": len(rows), "ties_dropped": ties,
        "empty_samples": int((~usable).sum()), "prompts_without_two_answers": too_few,
        "gold_mean": float(scores.mean()), "eos_rate": float(rollout.ended.float().mean()),
        "chosen_minus_rejected": float(sum(r["chosen_score"] - r["rejected_score"] for r in rows) / max(len(rows), 1)),
        "file": str(path),
    }
    if cfg.all_pairs:
        summary["all_pairs"] = len(every)
        summary["all_pairs_file"] = str(write_jsonl(run_.dir / "all_pairs.jsonl", every))
    if too_few:
        run_.note(f"pairs: {int((~usable).sum())} of {len(texts)} samples were empty or only whitespace; "
                  f"{too_few} prompts dropped: fewer than 2 non-empty samples")
    run_.note(f"pairs: {len(rows)} pairs from {len(prompts)} prompts x {k} samples "
              f"({ties} prompts dropped: all samples tied)"
             f"{f', {len(every)} in all_pairs.jsonl' if cfg.all_pairs else ''}; gold mean {summary['gold_mean']:.3f}; -> {path}")
    run_.finish(summary)
    return summary
