"""What the training stages share: the common config fields, set-up, optimizers, pair batches.

Every stage is a `Config` dataclass plus a `run(config)` function; `rto.cli` exposes both on the
command line (YAML via --config, every field as --flag).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass

import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from rto.data import PreferencePair, load_preferences, load_prompts
from rto.models import frozen_layers, shares_trunk
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


@dataclass
class Optimization:
    """AdamW and schedule fields shared by every training stage (see make_optimizer)."""

    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0


@dataclass
class PairTraining(Optimization, Common):
    """Fields of the stages that train on a preference file (sft, rm, dpo)."""

    epochs: int = 1
    batch_size: int = 8  # pairs per step
    lr: float = 5e-5
    eval_fraction: float = 0.1  # held-out pairs
    max_prompt_tokens: int = 256
    max_response_tokens: int = 256


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


def make_optimizer(groups, total_steps: int, opt: Optimization):
    """AdamW + linear warm-up + cosine decay to `opt.min_lr_ratio` of the peak."""
    optimizer = torch.optim.AdamW(groups, betas=tuple(opt.betas), weight_decay=opt.weight_decay)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=math.ceil(opt.warmup_ratio * total_steps),
        num_training_steps=max(total_steps, 1), min_lr_rate=opt.min_lr_ratio,
    )
    return optimizer, scheduler


def shared_trunk_layers(models: list, train_layers: int | None) -> int:
    """How many bottom layers every role can share (0 if they differ: each role then runs its full stack)."""
    n = frozen_layers(models[0], train_layers)
    return n if shares_trunk(models, n) else 0


def frozen(model):
    """A role that never trains: eval mode, no gradients."""
    model.eval().requires_grad_(False)
    return model


def response_batch(tokenizer, prompts: list[list[dict]], responses: list[tuple[str, bool]],
                   system_prompt: str | None, max_prompt_tokens: int, max_response_tokens: int) -> SeqBatch:
    """Prompts with given (text, ended) responses as one SeqBatch; prompts keep their last tokens, responses
    their first ones."""
    prompt_ids = encode_prompts(tokenizer, prompts, system_prompt)
    response_ids = [encode_response(tokenizer, text, ended)[:max_response_tokens] for text, ended in responses]
    return collate([p[-max_prompt_tokens:] for p in prompt_ids], response_ids, tokenizer.pad_token_id)


def pair_batch(tokenizer, pairs: list[PreferencePair], system_prompt: str | None,
               max_prompt_tokens: int, max_response_tokens: int) -> SeqBatch:
    """One SeqBatch of 2B rows: the B chosen responses first, then the B rejected ones."""
    prompts = [p.prompt for p in pairs]
    responses = [(p.chosen, p.chosen_ended) for p in pairs] + [(p.rejected, p.rejected_ended) for p in pairs]
    return response_batch(tokenizer, prompts + prompts, responses, system_prompt, max_prompt_tokens,
                          max_response_tokens)


def batches(items: list, size: int, epochs: int, seed: int):
    """Shuffled batches over `epochs` passes (the last short batch of a pass is kept)."""
    rng = random.Random(seed)
    for epoch in range(epochs):
        order = list(range(len(items)))
        rng.shuffle(order)
        for start in range(0, len(order), size):
            yield epoch, [items[i] for i in order[start : start + size]]


def split_heldout(items: list, fraction: float, seed: int, key=None) -> tuple[list, list]:
    """A seeded (train, held-out) split by group: held-out gets round(fraction * g) of the g groups.

    Items with the same `key(item)` (e.g. several pairs of one prompt) land on the same side, so
    held-out scores never come from prompts seen in training. key=None puts each item in its own group.
    """
    groups: dict = {}
    for i, item in enumerate(items):
        groups.setdefault(i if key is None else key(item), []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    k = round(fraction * len(order))
    pick = lambda parts: [items[i] for part in parts for i in part]  # noqa: E731
    return pick(order[k:]), pick(order[:k])


def load_pair_split(path: str, cfg: PairTraining) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Validated preference pairs, split into (train, held-out) by prompt."""
    prompt_key = lambda pair: json.dumps(pair.prompt, sort_keys=True)  # noqa: E731
    train, heldout = split_heldout(load_preferences(path), cfg.eval_fraction, cfg.seed, prompt_key)
    if not train:
        raise ValueError(f"{path}: no preference pairs to train on")
    return train, heldout


def fit(run: Run, accelerator, model, groups: list[dict], train: list, cfg: PairTraining, loss_fn, desc: str) -> int:
    """The optimisation loop of the offline stages: AdamW with warm-up and cosine decay over shuffled
    batches of `train`; loss -> backward -> clip -> step, one log row per step.

    `loss_fn(epoch, items) -> (loss, stats)` builds and scores one batch. Returns the number of steps.
    """
    from tqdm.auto import tqdm

    total = math.ceil(len(train) / cfg.batch_size) * cfg.epochs
    optimizer, scheduler = make_optimizer(groups, total, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    step = 0
    with tqdm(total=total, desc=desc, unit="step", disable=not cfg.progress) as bar:
        for epoch, items in batches(train, cfg.batch_size, cfg.epochs, cfg.seed):
            with accelerator.autocast():
                loss, stats = loss_fn(epoch, items)
            accelerator.backward(loss)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
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
