"""What the training stages share: the common config fields, set-up, optimizers, pair batches.

Every stage is a `Config` dataclass plus a `run(config)` function; `rto.cli` exposes both on the
command line (YAML via --config, every field as --flag).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from rto.data import PreferencePair, load_prompts
from rto.models import decoder_of, frozen_layers, shares_trunk, trunk_hidden
from rto.rollout import encode_prompts, encode_response
from rto.runtime import Run, make_accelerator, resolve_precision, seed_everything
from rto.sequences import SeqBatch, collate
from rto.tasks import get_task


@dataclass
class Common:
    """Fields every stage has."""

    out: str = "runs/stage"  # the run folder (config.yaml, metrics.jsonl, tb/, the saved model)
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16 (bf16 autocast with fp32 master weights)
    train_layers: int | None = 6  # train only the top k decoder layers (+ final norm); null = all
    system_prompt: str | None = ""  # system message for every prompt; null = the chat template's default
    trust_remote_code: bool = False  # never executes model code from the hub unless turned on
    threads: int | None = None  # torch CPU threads; null = torch's default
    progress: bool = True  # progress bars


def start(cfg: Common, name: str) -> tuple[Run, object]:
    """Seed everything, create the run folder and the accelerator; returns (run, accelerator)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    run = Run(cfg.out, cfg)
    accelerator = make_accelerator(cfg.precision)
    run.note(f"{name}: precision {resolve_precision(cfg.precision)}, device {accelerator.device}, out {run.dir}")
    return run, accelerator


def task_prompts(task: str, prompts: str | None, split: str, limit: int | None, seed: int) -> list[list[dict]]:
    """Prompts from a file (validated) or from an embedded task's split; a seeded subset when `limit` is set."""
    rows = load_prompts(prompts) if prompts else get_task(task).prompts(split)
    if limit is not None and limit < len(rows):
        rows = random.Random(seed).sample(rows, limit)
    return rows


def param_groups(model, lr: float, head_lr: float | None = None) -> list[dict]:
    """Trainable parameters; a value model's head gets its own learning rate when `head_lr` is set."""
    head = {id(p) for p in getattr(getattr(model, "head", None), "parameters", lambda: [])()}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head]
    groups = [{"params": body, "lr": lr}]
    head_params = [p for p in model.parameters() if p.requires_grad and id(p) in head]
    if head_params:
        groups.append({"params": head_params, "lr": head_lr or lr})
    return groups


def make_optimizer(groups, total_steps: int, betas=(0.9, 0.95), weight_decay: float = 0.0,
                   warmup_ratio: float = 0.03, min_lr_ratio: float = 0.1):
    """AdamW + linear warm-up + cosine decay to `min_lr_ratio` of the peak."""
    optimizer = torch.optim.AdamW(groups, betas=tuple(betas), weight_decay=weight_decay)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=math.ceil(warmup_ratio * total_steps),
        num_training_steps=max(total_steps, 1), min_lr_rate=min_lr_ratio,
    )
    return optimizer, scheduler


def shared_trunk_layers(models: list, train_layers: int | None) -> int:
    """How many bottom layers every role can share (0 if they differ: each role then runs its full stack)."""
    n = frozen_layers(models[0], train_layers)
    return n if shares_trunk(models, n) else 0


def trunk_or_none(model, n_frozen: int, batch: SeqBatch):
    return trunk_hidden(model, n_frozen, batch.input_ids, batch.attention_mask, batch.position_ids) if n_frozen else None


def truncate(prompt: list[int], response: list[int], max_prompt: int, max_response: int):
    return prompt[-max_prompt:], response[:max_response]


def pair_batch(tokenizer, pairs: list[PreferencePair], system_prompt: str | None,
               max_prompt_tokens: int, max_response_tokens: int) -> SeqBatch:
    """One SeqBatch of 2B rows: the B chosen responses first, then the B rejected ones."""
    prompt_ids = encode_prompts(tokenizer, [p.prompt for p in pairs], system_prompt)
    chosen = [encode_response(tokenizer, p.chosen, p.chosen_ended) for p in pairs]
    rejected = [encode_response(tokenizer, p.rejected, p.rejected_ended) for p in pairs]
    rows = [truncate(p, r, max_prompt_tokens, max_response_tokens)
            for p, r in zip(prompt_ids + prompt_ids, chosen + rejected)]
    return collate([p for p, _ in rows], [r for _, r in rows], tokenizer.pad_token_id)


def batches(items: list, size: int, epochs: int, seed: int):
    """Shuffled batches over `epochs` passes (the last short batch of a pass is kept)."""
    rng = random.Random(seed)
    for epoch in range(epochs):
        order = list(range(len(items)))
        rng.shuffle(order)
        for start in range(0, len(order), size):
            yield epoch, [items[i] for i in order[start : start + size]]


def steps_per_run(n: int, size: int, epochs: int) -> int:
    return math.ceil(n / size) * epochs


def split_heldout(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded (train, held-out) split; held-out gets round(fraction * n) items."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    k = round(fraction * len(items))
    return [items[i] for i in order[k:]], [items[i] for i in order[:k]]


def save_model(model, tokenizer, folder: Path) -> Path:
    """save_pretrained (safetensors) of a causal LM or ValueModel plus its tokenizer, written atomically."""
    import os
    import shutil
    import tempfile

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def n_layers(model) -> int:
    return len(decoder_of(model).layers)


def fit(run: Run, accelerator, model, optimizer, scheduler, batch_iter, total: int, loss_fn,
        max_grad_norm: float, desc: str, progress: bool) -> int:
    """The optimisation loop of the offline stages: loss -> backward -> clip -> step, one log row per step.

    `loss_fn(items) -> (loss, stats)` builds and scores one batch. Returns the number of steps.
    """
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    step = 0
    with tqdm(total=total, desc=desc, unit="step", disable=not progress) as bar:
        for epoch, items in batch_iter:
            with accelerator.autocast():
                loss, stats = loss_fn(items)
            accelerator.backward(loss)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            metrics = {"loss": loss.item(), "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                       "epoch": epoch, **{f"train/{k}": float(v) for k, v in stats.items()}}
            run.log(step, metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
    model.eval()
    return step


@torch.no_grad()
def score_in_batches(fn, items: list, size: int) -> list:
    """Apply `fn` to consecutive slices of `items` without gradients; concatenates the tensors it returns."""
    outs = [fn(items[i : i + size]) for i in range(0, len(items), size)]
    return [torch.cat(parts) for parts in zip(*outs)] if outs and isinstance(outs[0], tuple) else torch.cat(outs)
