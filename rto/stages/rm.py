"""`rto rm`: a Bradley-Terry reward model, a causal-LM backbone with a scalar head.

The saved folder holds the reward mean and std over the training responses (rto_model.json);
PPO normalises scores with them: r_norm = (r - mean) / std.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from rto.distributed import gather_lists, gathered, shard_trained, share, world
from rto.losses import bradley_terry_loss
from rto.models import DEFAULT_MODEL, ValueModel, load_tokenizer, save_model, set_trainable
from rto.rollout import encode_prompts
from rto.sequences import probe_batch, sequence_scores, shared_trunk, token_values
from rto.stages.common import (PairTraining, batches, fit, load_pair_split, pair_batch, param_groups, score_in_batches,
                               shared_trunk_layers, start)


@dataclass
class RMConfig(PairTraining):
    """Fields of `rto rm`: a Bradley-Terry reward model trained on a preference file."""

    out: str = "runs/rm"
    model: str = DEFAULT_MODEL
    """Backbone to start from, a causal LM that gets a zero-initialised scalar head: the embedded name, a
    local folder or a hub id."""
    pairs: str = "runs/pairs/pairs.jsonl"
    """Preference file: JSON Lines, Parquet or a datasets folder."""
    epochs: int = 2
    lr: float = 3e-5
    """Peak learning rate of the backbone (the head has head_lr); > 0."""
    head_lr: float = 1e-3
    """Peak learning rate of the scalar head; > 0."""
    pooling: str = "last"
    """A response's score: last = the head's output on its last token | mean = the head's output averaged
    over its tokens. PPO and eval score with the pooling the model was trained with."""


def reward_statistics(score_pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Mean, std and accuracy of reward scores that arrive as (chosen, rejected) batches, in one pass that
    keeps only running sums (memory independent of the number of batches).

    Each batch's scores x_1..x_b (chosen and rejected together) give, in float64, b, their mean m_b and
    M2_b = sum_i (x_i - m_b)^2, merged into the running (n, m, M2) by Chan et al.'s rule:
        delta = m_b - m,  m <- m + delta * b / (n + b),  M2 <- M2 + M2_b + delta^2 * n * b / (n + b),  n <- n + b.
    reward_std = sqrt(M2 / (n - 1)) (the unbiased std, as torch.std), at least 1e-6; train_accuracy = the share
    of pairs whose chosen score is above the rejected one.
    """
    n = mean = m2 = 0.0
    pairs = wins = 0
    for chosen, rejected in score_pairs:
        x = torch.cat([chosen, rejected]).detach().double()
        b, m_b = x.numel(), float(x.mean())
        m2_b = float(((x - m_b) ** 2).sum())
        delta = m_b - mean
        mean += delta * b / (n + b)
        m2 += m2_b + delta * delta * n * b / (n + b)
        n += b
        pairs += len(chosen)
        wins += int((chosen > rejected).sum())
    std = math.sqrt(m2 / (n - 1)) if n > 1 else float("nan")
    return {"reward_mean": mean, "reward_std": max(std, 1e-6), "train_accuracy": wins / pairs}


def run(cfg: RMConfig) -> dict:
    run_, accelerator = start(cfg, "rm")
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code, role="model")
    train, heldout = load_pair_split(cfg.pairs, cfg, run_, tokenizer)
    model = ValueModel.from_pretrained(cfg.model, cfg.trust_remote_code, role="model").to(accelerator.device)
    set_trainable(model, cfg.train_layers)
    probe = probe_batch(encode_prompts(tokenizer, [p.prompt for p in train[:2]], cfg.system_prompt),
                        tokenizer.pad_token_id)
    n_frozen = shared_trunk_layers([model], cfg.train_layers, probe, run_.note)
    shard_trained(model, "reward model", run_.note)  # FSDP launches: trained layers split over the processes

    def scores(batch, trunk):
        s = sequence_scores(token_values(model, batch, trunk, n_frozen), batch, cfg.pooling)
        half = len(batch) // 2  # a pair batch holds the chosen responses, then the rejected ones
        return s[:half], s[half:]

    def encoded(items):
        batch = pair_batch(tokenizer, items, cfg.system_prompt, cfg.max_response_tokens).to(accelerator.device)
        return batch, shared_trunk(model, batch, n_frozen)

    steps = fit(run_, accelerator, model, param_groups(model, cfg.lr, cfg.head_lr), train, cfg,
                lambda epoch, items: bradley_terry_loss(*scores(*encoded(items))), "reward model")

    with gathered(model), accelerator.autocast(), torch.no_grad():
        # reward statistics of the training responses under the final weights, in the batches of the final epoch
        # (which saw each pair once), streamed: one batch is encoded and scored at a time, then dropped; with
        # several processes each scores its share of every batch and only the scores travel
        final = (scores(*encoded(share(items))) for epoch, items in batches(train, cfg.batch_size, cfg.epochs, cfg.seed)
                 if epoch == cfg.epochs - 1 and share(items))
        if world()[1] > 1:
            final = gather_lists([(chosen.cpu(), rejected.cpu()) for chosen, rejected in final])
        summary = {"steps": steps, "train_pairs": len(train), "heldout_pairs": len(heldout),
                   **reward_statistics(final)}
        if heldout:
            hc, hr = score_in_batches(lambda items: scores(*encoded(items)), heldout, 2 * cfg.batch_size)
            summary["heldout_accuracy"] = float((hc > hr).float().mean())
    model.meta.update({k: summary[k] for k in ("reward_mean", "reward_std")})
    model.meta["trained_on"] = str(cfg.pairs)
    model.meta["pooling"] = cfg.pooling
    save_model(model, tokenizer, run_.dir / "model", metrics=summary)
    run_.note(f"rm: {steps} steps; train accuracy {summary['train_accuracy']:.3f}, held-out "
              f"{summary.get('heldout_accuracy', float('nan')):.3f} on {len(heldout)} pairs; "
              f"reward mean {summary['reward_mean']:.3f} std {summary['reward_std']:.3f} -> {run_.dir / 'model'}")
    run_.finish(summary)
    return summary
