"""`rto sft` (optional): supervised fine-tuning on the chosen responses of a preference file.

The embedded default is already instruction-tuned, so the demo starts from it directly; this stage
is for users whose start model is not, or who want to fit it to their own preferred answers first.
"""

from __future__ import annotations

from dataclasses import dataclass

from rto.data import load_preferences
from rto.models import DEFAULT_MODEL, frozen_layers, load_causal_lm, load_tokenizer, set_trainable
from rto.sequences import nll_loss
from rto.stages.common import (Common, batches, fit, make_optimizer, pair_batch, param_groups, save_model,
                               score_in_batches, split_heldout, start, steps_per_run, trunk_or_none)


@dataclass
class SFTConfig(Common):
    out: str = "runs/sft"
    model: str = DEFAULT_MODEL
    data: str = "runs/pairs/pairs.jsonl"  # preference file; trains on prompt -> chosen
    epochs: int = 1
    batch_size: int = 8
    lr: float = 2e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    eval_fraction: float = 0.1
    max_prompt_tokens: int = 256
    max_response_tokens: int = 256


def run(cfg: SFTConfig) -> dict:
    run_, accelerator = start(cfg, "sft")
    train, heldout = split_heldout(load_preferences(cfg.data), cfg.eval_fraction, cfg.seed)
    if not train:
        raise ValueError(f"{cfg.data}: no rows to train on")
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    model = load_causal_lm(cfg.model, cfg.trust_remote_code).to(accelerator.device)
    set_trainable(model, cfg.train_layers)
    n_frozen = frozen_layers(model, cfg.train_layers)

    def nll(items):
        batch = pair_batch(tokenizer, items, cfg.system_prompt, cfg.max_prompt_tokens,
                           cfg.max_response_tokens).to(accelerator.device)
        chosen = batch.select(slice(0, len(items)))  # the first half of a pair batch holds the chosen answers
        return nll_loss(model, chosen, trunk_or_none(model, n_frozen, chosen), n_frozen)

    total = steps_per_run(len(train), cfg.batch_size, cfg.epochs)
    optimizer, scheduler = make_optimizer(param_groups(model, cfg.lr), total, cfg.betas, cfg.weight_decay,
                                          cfg.warmup_ratio, cfg.min_lr_ratio)
    steps = fit(run_, accelerator, model, optimizer, scheduler, batches(train, cfg.batch_size, cfg.epochs, cfg.seed),
                total, lambda items: (nll(items), {}), cfg.max_grad_norm, "sft", cfg.progress)
    summary = {"steps": steps, "train_rows": len(train)}
    if heldout:
        with accelerator.autocast():
            losses = score_in_batches(lambda it: nll(it).reshape(1), heldout, cfg.batch_size)
        summary["heldout_nll"] = float(losses.mean())
    save_model(model, tokenizer, run_.dir / "model")
    run_.note(f"sft: {steps} steps; held-out nll {summary.get('heldout_nll', float('nan')):.3f} -> {run_.dir / 'model'}")
    run_.finish(summary)
    return summary
