"""`rto dpo`: offline preference optimisation (sigmoid DPO by default) against a frozen reference.

The trained model is RTO's pi_dpo: its per-token log-ratio to the reference is the dense reward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rto.data import load_preferences
from rto.losses import PREFERENCE_LOSSES, sequence_logprob
from rto.models import DEFAULT_MODEL, load_causal_lm, load_tokenizer, set_trainable
from rto.sequences import token_logprobs
from rto.stages.common import (Common, batches, fit, make_optimizer, pair_batch, param_groups, save_model,
                               score_in_batches, shared_trunk_layers, split_heldout, start, steps_per_run,
                               trunk_or_none)


@dataclass
class DPOConfig(Common):
    out: str = "runs/dpo"
    model: str = DEFAULT_MODEL  # the policy to start from
    ref: str | None = None  # the frozen reference; null = a copy of `model`
    pairs: str = "runs/pairs/pairs.jsonl"
    loss: str = "dpo"  # a name in rto.losses.PREFERENCE_LOSSES
    beta: float = 0.1
    epochs: int = 1
    batch_size: int = 8  # pairs per step
    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    eval_fraction: float = 0.1
    max_prompt_tokens: int = 256
    max_response_tokens: int = 256


def run(cfg: DPOConfig) -> dict:
    if cfg.loss not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown loss {cfg.loss!r}; available: {', '.join(PREFERENCE_LOSSES)}")
    loss_impl = PREFERENCE_LOSSES[cfg.loss]
    run_, accelerator = start(cfg, "dpo")
    pairs = load_preferences(cfg.pairs)
    train, heldout = split_heldout(pairs, cfg.eval_fraction, cfg.seed)
    if not train:
        raise ValueError(f"{cfg.pairs}: no preference pairs to train on")
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    policy = load_causal_lm(cfg.model, cfg.trust_remote_code).to(accelerator.device)
    ref = load_causal_lm(cfg.ref or cfg.model, cfg.trust_remote_code).to(accelerator.device).eval()
    ref.requires_grad_(False)
    set_trainable(policy, cfg.train_layers)
    n_shared = shared_trunk_layers([policy, ref], cfg.train_layers)

    def logps(items, grad_policy: bool):
        batch = pair_batch(tokenizer, items, cfg.system_prompt, cfg.max_prompt_tokens,
                           cfg.max_response_tokens).to(accelerator.device)
        trunk = trunk_or_none(ref, n_shared, batch)
        with torch.no_grad():
            ref_lp = sequence_logprob(token_logprobs(ref, batch, trunk, n_shared), batch.response_mask)
        with torch.set_grad_enabled(grad_policy):
            pol_lp = sequence_logprob(token_logprobs(policy, batch, trunk, n_shared), batch.response_mask)
        B = len(items)
        return pol_lp[:B], pol_lp[B:], ref_lp[:B], ref_lp[B:]

    def loss_fn(items):
        return loss_impl(*logps(items, True), beta=cfg.beta)

    total = steps_per_run(len(train), cfg.batch_size, cfg.epochs)
    optimizer, scheduler = make_optimizer(param_groups(policy, cfg.lr), total, cfg.betas, cfg.weight_decay,
                                          cfg.warmup_ratio, cfg.min_lr_ratio)
    steps = fit(run_, accelerator, policy, optimizer, scheduler, batches(train, cfg.batch_size, cfg.epochs, cfg.seed),
                total, loss_fn, cfg.max_grad_norm, "dpo", cfg.progress)
    summary = {"steps": steps, "train_pairs": len(train), "heldout_pairs": len(heldout)}
    if heldout:
        with accelerator.autocast():
            _, stats = loss_impl(*score_in_batches(lambda it: logps(it, False), heldout, 2 * cfg.batch_size),
                                 beta=cfg.beta)
        summary.update({f"heldout_{k}": float(v) for k, v in stats.items()})
    save_model(policy, tokenizer, run_.dir / "model")
    run_.note(f"dpo: {steps} steps; held-out accuracy {summary.get('heldout_accuracy', float('nan')):.3f}, "
              f"margin {summary.get('heldout_reward_margin', float('nan')):.3f} -> {run_.dir / 'model'}")
    run_.finish(summary)
    return summary



