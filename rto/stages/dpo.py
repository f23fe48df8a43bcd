"""`rto dpo`: offline preference optimisation against a frozen reference: sigmoid DPO by default, or another
loss of the DPO family by name (`--loss ipo|rdpo|simpo|tdpo1|tdpo2`, see rto.losses).

The trained model is RTO's pi_dpo: its per-token log-ratio to the reference is the dense reward. Its folder's
rto_model.json records the loss, its hyperparameters and the reference (none for the reference-free SimPO).
With `--lora true` the trained model is a LoRA adapter on `model` and the reference is that same base with the
adapter off (rto.lora), so the weights are held once; the folder is then a peft adapter folder, and its record
names the base and the fingerprint of its weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rto.config import ConfigError
from rto.distributed import gathered, shard_frozen, shard_trained
from rto.lora import LoraOptions, adapter_record, attach_adapter, base_view, enable_gradient_checkpointing, same_model
from rto.losses import PREFERENCE_LOSSES, PairScores, sequence_logprob, sequential_kl
from rto.models import DEFAULT_MODEL, load_causal_lm, save_model, set_trainable, weights_fingerprint
from rto.rollout import encode_prompts
from rto.sequences import logprobs_from_logits, probe_batch, response_logits, shared_trunk
from rto.stages.common import (PairTraining, check_token_budget, fit, frozen, load_pair_split, pair_batch, param_groups, role_tokenizer,
                               shared_trunk_layers, start)


# config field -> argument of the loss functions
HYPERPARAMETER_FIELDS = {"beta": "beta", "alpha": "alpha", "simpo_gamma": "gamma"}


@dataclass
class DPOConfig(LoraOptions, PairTraining):
    """Fields of `rto dpo`: a DPO-family model trained against a frozen reference (RTO's pi_dpo).

    `loss` picks the objective (rto.losses.PREFERENCE_LOSSES): dpo, ipo, rdpo, simpo, tdpo1, tdpo2.
    A hyperparameter left null takes the chosen loss's default, the setting the RTO paper used for that
    baseline (on Llama-3-8B; not tuned for small models here): beta 0.1 (dpo, ipo, rdpo, tdpo1, tdpo2; IPO
    has no published value there, so it keeps DPO's), beta 2.5 (simpo); alpha 0.001 (rdpo), 0.2 (tdpo2);
    simpo_gamma 0.5. A value given for a hyperparameter the loss does not take is refused."""

    out: str = "runs/dpo"
    model: str = DEFAULT_MODEL
    """The policy to start from: the embedded name, a local folder or a hub id."""
    ref: str | None = None
    """The frozen reference pi_ref; null = a copy of `model`. RTO's dense reward is log(pi_dpo / pi_ref)
    against this model, so `rto ppo` must use this same reference (it compares the weights). simpo is
    reference-free: leave it null."""
    pairs: str = "runs/pairs/pairs.jsonl"
    """Preference file: JSON Lines, Parquet or a datasets folder."""
    loss: str = "dpo"
    """dpo (sigmoid) | ipo | rdpo | simpo | tdpo1 | tdpo2 (rto.losses.PREFERENCE_LOSSES)."""
    beta: float | None = None
    """The loss's beta (IPO's tau), the scale of its implicit reward beta * log(pi / pi_ref) (simpo:
    beta / |y| * log pi); null = the loss's default, 2.5 for simpo, 0.1 for the others; > 0."""
    alpha: float | None = None
    """rdpo: weight of the length penalty alpha * |y| (tokens) in each implicit reward (null = 0.001); tdpo2:
    weight of the sequential-KL term (null = 0.2); >= 0. The other losses take none."""
    simpo_gamma: float | None = None
    """simpo only: the target reward margin gamma, on the beta-scaled reward (null = 0.5)."""

    def __post_init__(self):
        super().__post_init__()
        if self.loss not in PREFERENCE_LOSSES:
            raise ConfigError(f"loss must be one of {', '.join(PREFERENCE_LOSSES)}, got {self.loss!r}")
        loss = PREFERENCE_LOSSES[self.loss]
        taken = [f for f, name in HYPERPARAMETER_FIELDS.items() if name in loss.defaults]
        unused = [f for f in HYPERPARAMETER_FIELDS if f not in taken and getattr(self, f) is not None]
        if unused:
            raise ConfigError(f"the {self.loss} loss takes no {' or '.join(unused)} (its hyperparameters: "
                              f"{', '.join(taken)})")
        if self.ref is not None and not loss.needs_reference:
            raise ConfigError(f"the {self.loss} loss is reference-free: drop ref ({self.ref!r})")
        if self.lora and self.ref is not None and not same_model(self.ref, self.model):
            raise ConfigError(f"with lora the reference is `model` with its adapter off: drop ref ({self.ref!r})")

    def hyperparameters(self) -> dict[str, float]:
        """The chosen loss's hyperparameters, named as its function's arguments (gamma for simpo_gamma)."""
        return PREFERENCE_LOSSES[self.loss].hyperparameters(
            **{name: getattr(self, f) for f, name in HYPERPARAMETER_FIELDS.items()})


def run(cfg: DPOConfig) -> dict:
    loss_impl = PREFERENCE_LOSSES[cfg.loss]
    hyper = cfg.hyperparameters()
    run_, accelerator = start(cfg, f"dpo --loss {cfg.loss}")
    use_ref = loss_impl.needs_reference
    tokenizer = role_tokenizer(run_, cfg, {"policy": cfg.model, **({"reference": cfg.ref} if use_ref else {})})
    check_token_budget(cfg, cfg.model, "policy", cfg.max_response_tokens)
    train, heldout = load_pair_split(cfg.pairs, cfg, run_, tokenizer)
    policy = load_causal_lm(cfg.model, cfg.trust_remote_code, role="policy").to(accelerator.device)
    if cfg.lora:  # one copy of the weights: the policy is a new adapter on them, the reference the base without it
        base_fingerprint = weights_fingerprint(policy)
        policy = attach_adapter(policy, cfg, cfg.train_layers)
        ref = base_view(policy) if use_ref else None
        if cfg.lora_dropout:
            run_.note(f"lora: lora_dropout {cfg.lora_dropout:g} is recorded but inactive: rto trains in eval mode")
    else:
        ref = (frozen(load_causal_lm(cfg.ref or cfg.model, cfg.trust_remote_code, role="reference")
                      .to(accelerator.device)) if use_ref else None)
    set_trainable(policy, cfg.train_layers)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    probe = probe_batch(encode_prompts(tokenizer, [p.prompt for p in train[:2]], cfg.system_prompt),
                        tokenizer.pad_token_id).to(accelerator.device)
    n_shared = shared_trunk_layers([policy] + ([ref] if use_ref else []), cfg.train_layers, probe, run_.note)
    # the reference's digest, recorded with the model (whole weights, before any sharding)
    ref_fingerprint = weights_fingerprint(ref) if use_ref else None
    shard_trained(policy, "policy", run_.note)  # FSDP launches: trained layers split over the processes
    if use_ref:  # and the frozen reference's own layers (every process scores as many batches: rto.stages.common)
        shard_frozen(ref, "reference", n_shared, run_.note)

    def score(items, grad_policy: bool) -> PairScores:
        """What the loss reads of these pairs, and only that: reference log-probs unless reference-free,
        full-vocabulary logits of both models (sequential KL) only for TDPO."""
        batch = pair_batch(tokenizer, items, cfg.system_prompt, cfg.max_response_tokens).to(accelerator.device)
        mask = batch.response_mask
        trunk = shared_trunk(ref if use_ref else policy, batch, n_shared)
        ref_logits = ref_lp = kl = None
        if use_ref:
            with torch.no_grad():
                ref_logits = response_logits(ref, batch, trunk, n_shared)
                ref_lp = sequence_logprob(logprobs_from_logits(ref_logits, batch), mask)
        with torch.set_grad_enabled(grad_policy):
            pol_logits = response_logits(policy, batch, trunk, n_shared)
            pol_lp = sequence_logprob(logprobs_from_logits(pol_logits, batch), mask)
            if loss_impl.needs_seq_kl:
                kl = sequential_kl(ref_logits, pol_logits, mask)
        B, lengths = len(items), mask.sum(-1)  # chosen rows first, then rejected (pair_batch)
        chosen = lambda x: None if x is None else x[:B]  # noqa: E731
        rejected = lambda x: None if x is None else x[B:]  # noqa: E731
        return PairScores(
            policy_chosen_logp=chosen(pol_lp), policy_rejected_logp=rejected(pol_lp),
            chosen_length=chosen(lengths), rejected_length=rejected(lengths),
            ref_chosen_logp=chosen(ref_lp), ref_rejected_logp=rejected(ref_lp),
            chosen_seq_kl=chosen(kl), rejected_seq_kl=rejected(kl))

    steps = fit(run_, accelerator, policy, param_groups(policy, cfg.lr), train, cfg,
                lambda epoch, items: loss_impl(score(items, True), **hyper), "dpo")
    summary = {"steps": steps, "train_pairs": len(train), "heldout_pairs": len(heldout)}
    if heldout:
        size = 2 * cfg.batch_size
        with gathered(policy), accelerator.autocast(), torch.no_grad():
            scores = PairScores.cat([score(heldout[i : i + size], False) for i in range(0, len(heldout), size)])
            _, stats = loss_impl(scores, **hyper)
        summary.update({f"heldout_{k}": float(v) for k, v in stats.items()})
    # the loss and its hyperparameters, and the reference it was trained against: RTO's reward is only the DPO
    # implicit reward against that model; a reference-free (simpo) model records none
    meta = {"stage": "dpo", "loss": cfg.loss, "beta": hyper["beta"], "alpha": hyper.get("alpha"),
            "gamma": hyper.get("gamma"), "reference": (cfg.ref or cfg.model) if use_ref else None}
    if use_ref:
        meta["reference_fingerprint"] = ref_fingerprint
    if cfg.lora:  # the folder holds the adapter only: its record names the base it needs
        meta.update(adapter_record(cfg.model, base_fingerprint))
    save_model(policy, tokenizer, run_.dir / "model", meta=meta)
    run_.note(f"dpo ({cfg.loss}, {', '.join(f'{k} {v:g}' for k, v in hyper.items())}): {steps} steps; held-out "
              f"accuracy {summary.get('heldout_accuracy', float('nan')):.3f}, "
              f"margin {summary.get('heldout_reward_margin', float('nan')):.3f} -> {run_.dir / 'model'}")
    run_.finish(summary)
    return summary
