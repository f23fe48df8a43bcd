"""`rto rm`: a Bradley-Terry reward model, a causal-LM backbone with a scalar head.

The saved folder holds the reward mean and std over the training responses (rto_model.json);
PPO normalises scores with them: r_norm = (r - mean) / std.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rto.data import load_preferences
from rto.losses import bradley_terry_loss
from rto.models import DEFAULT_MODEL, ValueModel, frozen_layers, load_tokenizer, set_trainable
from rto.sequences import sequence_scores, token_values
from rto.stages.common import (Common, batches, fit, make_optimizer, pair_batch, param_groups, save_model,
                               score_in_batches, split_heldout, start, steps_per_run, trunk_or_none)


@dataclass
class RMConfig(Common):
    out: str = "runs/rm"
    model: str = DEFAULT_MODEL  # backbone to start from
    pairs: str = "runs/pairs/pairs.jsonl"  # preference file (JSONL, Parquet or a datasets folder)
    epochs: int = 2
    batch_size: int = 8  # pairs per step
    lr: float = 3e-5  # backbone
    head_lr: float = 1e-3  # scalar head (zero-initialised)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    eval_fraction: float = 0.1  # held-out pairs for accuracy
    pooling: str = "last"  # score = head output on the last token, or its mean over the response ("mean")
    max_prompt_tokens: int = 256
    max_response_tokens: int = 256


def run(cfg: RMConfig) -> dict:
    run_, accelerator = start(cfg, "rm")
    pairs = load_preferences(cfg.pairs)
    train, heldout = split_heldout(pairs, cfg.eval_fraction, cfg.seed)
    if not train:
        raise ValueError(f"{cfg.pairs}: no preference pairs to train on")
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    model = ValueModel.from_pretrained(cfg.model, cfg.trust_remote_code).to(accelerator.device)
    set_trainable(model, cfg.train_layers)
    n_frozen = frozen_layers(model, cfg.train_layers)

    last_epoch: list = []  # (batch, frozen trunk) of every step of the final epoch: the statistics pass reuses them

    def scores(items, batch=None, trunk=None):
        if batch is None:
            batch = pair_batch(tokenizer, items, cfg.system_prompt, cfg.max_prompt_tokens,
                               cfg.max_response_tokens).to(accelerator.device)
            trunk = trunk_or_none(model, n_frozen, batch)
        s = sequence_scores(token_values(model, batch, trunk, n_frozen), batch, cfg.pooling)
        half = len(batch) // 2
        return (s[:half], s[half:]), batch, trunk

    def loss_fn(epoch_items):
        epoch, items = epoch_items
        (chosen, rejected), batch, trunk = scores(items)
        if epoch == cfg.epochs - 1:
            last_epoch.append((batch, trunk))
        return bradley_terry_loss(chosen, rejected)

    total = steps_per_run(len(train), cfg.batch_size, cfg.epochs)
    optimizer, scheduler = make_optimizer(param_groups(model, cfg.lr, cfg.head_lr), total, cfg.betas,
                                          cfg.weight_decay, cfg.warmup_ratio, cfg.min_lr_ratio)
    tagged = ((epoch, (epoch, items)) for epoch, items in batches(train, cfg.batch_size, cfg.epochs, cfg.seed))
    steps = fit(run_, accelerator, model, optimizer, scheduler, tagged, total, loss_fn, cfg.max_grad_norm,
                "reward model", cfg.progress)

    with accelerator.autocast(), torch.no_grad():
        # reward statistics of the training responses under the final weights (the final epoch saw each pair once)
        final = [scores(None, batch, trunk)[0] for batch, trunk in last_epoch]
        chosen, rejected = torch.cat([c for c, _ in final]), torch.cat([r for _, r in final])
        all_scores = torch.cat([chosen, rejected]).float()
        summary = {"steps": steps, "train_pairs": len(train), "heldout_pairs": len(heldout),
                   "reward_mean": float(all_scores.mean()), "reward_std": float(all_scores.std().clamp(min=1e-6)),
                   "train_accuracy": float((chosen > rejected).float().mean())}
        if heldout:
            hc, hr = score_in_batches(lambda items: scores(items)[0], heldout, 2 * cfg.batch_size)
            summary["heldout_accuracy"] = float((hc > hr).float().mean())
    model.meta.update({k: summary[k] for k in ("reward_mean", "reward_std")})
    model.meta["trained_on"] = str(cfg.pairs)
    model.meta["pooling"] = cfg.pooling
    save_model(model, tokenizer, run_.dir / "model")
    run_.note(f"rm: {steps} steps; train accuracy {summary['train_accuracy']:.3f}, held-out "
              f"{summary.get('heldout_accuracy', float('nan')):.3f} on {len(heldout)} pairs; "
              f"reward mean {summary['reward_mean']:.3f} std {summary['reward_std']:.3f} -> {run_.dir / 'model'}")
    run_.finish(summary)
    return summary
