"""`rto dpo`: offline preference optimisation (sigmoid DPO by default) against a frozen reference.

The trained model is RTO's pi_dpo: its per-token log-ratio to the reference is the dense reward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rto.losses import PREFERENCE_LOSSES, sequence_logprob
from rto.models import DEFAULT_MODEL, load_causal_lm, save_model, set_trainable, weights_fingerprint
from rto.rollout import encode_prompts
from rto.sequences import probe_batch, shared_trunk, token_logprobs
from rto.stages.common import (PairTraining, check_token_budget, fit, frozen, load_pair_split, pair_batch, param_groups, role_tokenizer,
                               score_in_batches, shared_trunk_layers, start)


@dataclass
class DPOConfig(PairTraining):
    out: str = "runs/dpo"
    model: str = DEFAULT_MODEL  # the policy to start from
    ref: str | None = None  # the frozen reference; null = a copy of `model`
    pairs: str = "runs/pairs/pairs.jsonl"
    loss: str = "dpo"  # a name in rto.losses.PREFERENCE_LOSSES
    beta: float = 0.1


def run(cfg: DPOConfig) -> dict:
    if cfg.loss not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown loss {cfg.loss!r}; available: {', '.join(PREFERENCE_LOSSES)}")
    loss_impl = PREFERENCE_LOSSES[cfg.loss]
    run_, accelerator = start(cfg, "dpo")
    tokenizer = role_tokenizer(run_, cfg, {"policy": cfg.model, "reference": cfg.ref})
    check_token_budget(cfg, cfg.model, "policy", cfg.max_response_tokens)
    train, heldout = load_pair_split(cfg.pairs, cfg, run_, tokenizer)
    policy = load_causal_lm(cfg.model, cfg.trust_remote_code, role="policy").to(accelerator.device)
    ref = frozen(load_causal_lm(cfg.ref or cfg.model, cfg.trust_remote_code, role="reference").to(accelerator.device))
    set_trainable(policy, cfg.train_layers)
    probe = probe_batch(encode_prompts(tokenizer, [p.prompt for p in train[:2]], cfg.system_prompt),
                        tokenizer.pad_token_id).to(accelerator.device)
    n_shared = shared_trunk_layers([policy, ref], cfg.train_layers, probe, run_.note)

    def logps(items, grad_policy: bool):
        batch = pair_batch(tokenizer, items, cfg.system_prompt, cfg.max_response_tokens).to(accelerator.device)
        trunk = shared_trunk(ref, batch, n_shared)
        with torch.no_grad():
            ref_lp = sequence_logprob(token_logprobs(ref, batch, trunk, n_shared), batch.response_mask)
        with torch.set_grad_enabled(grad_policy):
            pol_lp = sequence_logprob(token_logprobs(policy, batch, trunk, n_shared), batch.response_mask)
        B = len(items)
        return pol_lp[:B], pol_lp[B:], ref_lp[:B], ref_lp[B:]

    steps = fit(run_, accelerator, policy, param_groups(policy, cfg.lr), train, cfg,
                lambda epoch, items: loss_impl(*logps(items, True), beta=cfg.beta), "dpo")
    summary = {"steps": steps, "train_pairs": len(train), "heldout_pairs": len(heldout)}
    if heldout:
        with accelerator.autocast():
            _, stats = loss_impl(*score_in_batches(lambda it: logps(it, False), heldout, 2 * cfg.batch_size),
                                 beta=cfg.beta)
        summary.update({f"heldout_{k}": float(v) for k, v in stats.items()})
    # the reference it was trained against: RTO's reward is only the DPO implicit reward against that model
    save_model(policy, tokenizer, run_.dir / "model", meta={
        "stage": "dpo", "loss": cfg.loss, "beta": cfg.beta, "reference": cfg.ref or cfg.model,
        "reference_fingerprint": weights_fingerprint(ref)})
    run_.note(f"dpo: {steps} steps; held-out accuracy {summary.get('heldout_accuracy', float('nan')):.3f}, "
              f"margin {summary.get('heldout_reward_margin', float('nan')):.3f} -> {run_.dir / 'model'}")
    run_.finish(summary)
    return summary
