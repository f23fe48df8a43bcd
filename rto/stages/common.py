"""What the training stages share: the common config fields, set-up, optimizers, pair batches.

Every stage is a `Config` dataclass plus a `run(config)` function; `rto.cli` exposes both on the
command line (YAML via --config, every field as --flag).
"""

from __future__ import annotations

import json
import math
import random
import warnings
from dataclasses import dataclass

import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from rto.config import ConfigError, check_fields
from rto.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from rto.data import PreferencePair, load_preferences
from rto.models import check_tokenizers, load_tokenizer
from rto.trunk import checked_trunk_layers
from rto.rollout import encode_prompts, encode_response
from rto.runtime import (NonFiniteError, Run, check_report_to, folder_state, make_accelerator, resolve_precision,
                         seed_everything)
from rto.sequences import SeqBatch, collate


# a skipped update (NaN/inf loss, gradient or reward) still advances the schedules on purpose (they follow the
# data position), which torch reports as a scheduler step before an optimizer step
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")

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
    resume: bool | None = None  # null: continue from the last checkpoint in `out` if any; false: start over
    overwrite: bool = False  # allow replacing the results of a run with a different config in `out`
    max_prompt_tokens: int = 256  # prompts longer than this (chat template applied) are skipped, with a count
    report_to: str = "tensorboard"  # tensorboard | wandb | mlflow | trackio | none: where metrics go besides metrics.jsonl

    def __post_init__(self):
        check_fields(self)  # every field within its range (rto.config.RULES), whatever built the config
        check_report_to(self.report_to)  # a known tracker whose package is installed (its extra named if not)


@dataclass
class Checkpointing:
    """When a training stage saves its state (see rto.checkpoint); it always does at the end of training."""

    checkpoint_every: int = 50  # optimisation steps (PPO: iterations) between checkpoints; 0 = only at the end
    keep_checkpoints: int = 1  # the newest k checkpoints are kept; all are removed once the stage finishes


@dataclass
class Optimization:
    """AdamW and schedule fields shared by every training stage (see make_optimizer)."""

    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    max_nonfinite_steps: int = 3  # updates in a row skipped for a NaN/inf loss, gradient or reward before stopping


@dataclass
class PairTraining(Checkpointing, Optimization, Common):
    """Fields of the stages that train on a preference file (sft, rm, dpo)."""

    epochs: int = 1
    batch_size: int = 8  # pairs per step
    lr: float = 5e-5
    eval_fraction: float = 0.1  # held-out pairs
    max_response_tokens: int = 256  # longer responses are cut (their EOS then dropped)


def start(cfg: Common, name: str) -> tuple[Run, object]:
    """Seed everything, create the accelerator (with the tracker `cfg.report_to`), open the run folder (resuming
    from its last checkpoint when the same config stopped there, see runtime.folder_state); returns (run, accelerator).

    The folder is claimed first (runtime.claim_run_folder: rto's own, no symbolic links where rto writes, no
    other process using it), so nothing in it is read for a decision or changed before; the run holds it
    until `run.finish()` or `run.close()`."""
    from rto.runtime import claim_run_folder

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    accelerator = make_accelerator(cfg.precision, cfg.report_to, cfg.out)
    with claim_run_folder(cfg.out):
        resume_from = latest_checkpoint(cfg.out) if folder_state(cfg) == "resume" else None
        run = Run(cfg.out, cfg, resume_from=resume_from, accelerator=accelerator, stage=name)
    run.note(f"{name}: precision {resolve_precision(cfg.precision)}, device {accelerator.device}, out {run.dir}"
             + (f"; resuming from {resume_from}" if resume_from else ""))
    return run, accelerator


def drop_long_prompts(run: Run, tokenizer, items: list, cfg: Common, what: str, prompt_of=None) -> tuple[list, list]:
    """Keep the items whose prompt (the item itself, or `prompt_of(item)`) fits in cfg.max_prompt_tokens after
    the chat template; the others are skipped and counted in the log. Returns (kept items, their prompt ids);
    raises ValueError when none fits."""
    encoded = encode_prompts(tokenizer, [prompt_of(x) if prompt_of else x for x in items], cfg.system_prompt)
    lengths = [len(ids) for ids in encoded]
    fits = [n <= cfg.max_prompt_tokens for n in lengths]
    if not all(fits):
        if not any(fits):
            raise ValueError(f"every one of the {len(items)} {what} has a prompt longer than max_prompt_tokens="
                             f"{cfg.max_prompt_tokens} tokens (shortest: {min(lengths)}); raise --max_prompt_tokens")
        run.note(f"skipped {fits.count(False)} of {len(items)} {what}: prompt longer than max_prompt_tokens="
                 f"{cfg.max_prompt_tokens} tokens (longest {max(lengths)})")
    return [x for x, ok in zip(items, fits) if ok], [ids for ids, ok in zip(encoded, fits) if ok]


def check_token_budget(cfg: Common, path: str, role: str, new_tokens: int) -> None:
    """Refuse, before any weights load, a prompt budget plus `new_tokens` (generated or kept response tokens)
    beyond the positions of the model at `path` (its config's max_position_embeddings)."""
    from transformers import AutoConfig

    from rto.models import resolve_model

    try:
        config = AutoConfig.from_pretrained(resolve_model(path, role), trust_remote_code=cfg.trust_remote_code)
    except Exception:  # noqa: BLE001  (an unreadable model is reported, in one line, when its weights load)
        return
    limit = getattr(config, "max_position_embeddings", None)
    if limit and cfg.max_prompt_tokens + new_tokens > limit:
        raise ConfigError(f"max_prompt_tokens + {'max_new_tokens' if hasattr(cfg, 'max_new_tokens') else 'max_response_tokens'}"
                          f" = {cfg.max_prompt_tokens} + {new_tokens} exceeds the {limit} positions of the {role} "
                          f"({path}); lower them so that prompt and response fit")


def role_tokenizer(run: Run, cfg: Common, roles: dict[str, str | None]):
    """The tokenizer of the first role, after checking that every other role shares its vocabulary
    (models.check_tokenizers); a role folder without a tokenizer is noted in the log."""
    (first, path), *others = roles.items()
    tokenizer = load_tokenizer(path, cfg.trust_remote_code, role=first)
    for role in check_tokenizers(tokenizer, f"{first} ({path})", dict(others), cfg.trust_remote_code):
        run.note(f"{role}: no tokenizer in the folder, so its vocabulary is not checked")
    return tokenizer


def finite(x) -> bool:
    return bool(torch.isfinite(torch.as_tensor(x)).all())


def backward_and_clip(accelerator, loss: torch.Tensor, param_sets: list[list], max_norm: float) -> list[float]:
    """Backward pass, then clip each parameter set to `max_norm`; returns their norms before clipping.
    A NaN/inf loss is not backpropagated and gives NaN norms: the update goes ahead only if all are finite."""
    if not finite(loss.detach()):
        return [float("nan")] * len(param_sets)
    accelerator.backward(loss)
    return [float(torch.nn.utils.clip_grad_norm_(params, max_norm)) for params in param_sets]


class NonFiniteGuard:
    """Counts steps skipped for NaN/inf values; stops the run after `limit` of them in a row."""

    def __init__(self, run: Run, limit: int, name: str, unit: str = "step"):
        self.run, self.limit, self.name, self.unit, self.streak, self.skipped = run, limit, name, unit, 0, 0

    def ok(self) -> None:
        self.streak = 0

    def skip(self, step: int, what: str) -> None:
        self.streak += 1
        self.skipped += 1
        if self.streak > self.limit:
            last = latest_checkpoint(self.run.dir)
            raise NonFiniteError(
                f"{self.name}: NaN/inf {what} at {self.unit} {step}, {self.streak} updates in a row; stopped without "
                "saving. "
                + (f"The last good checkpoint is {last}. " if last else "No checkpoint was written yet. ")
                + "Lower the learning rate or check the data for extreme examples, then re-run (with another "
                "--out or --overwrite true when the config changes)")
        self.run.note(f"{self.name}: {self.unit} {step}: NaN/inf {what}; update skipped ({self.streak} in a row, "
                      f"at most {self.limit})")


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


def shared_trunk_layers(models: list, train_layers: int | None, probe: SeqBatch, note) -> int:
    """How many bottom layers every role can share, proven on `probe` (e.g. rto.sequences.probe_batch of the
    run's first prompts); 0 when nothing is frozen or sharing would change a result, with the reason passed to
    `note` (e.g. run.note): each role then runs its full stack. See rto.trunk.checked_trunk_layers."""
    return checked_trunk_layers(models, train_layers, probe, note)


def frozen(model):
    """A role that never trains: eval mode, no gradients."""
    model.eval().requires_grad_(False)
    return model


def response_batch(tokenizer, prompts: list[list[dict]], responses: list[tuple[str, bool]],
                   system_prompt: str | None, max_response_tokens: int) -> SeqBatch:
    """Prompts with given (text, ended) responses as one SeqBatch; responses keep their first
    max_response_tokens tokens (over-long prompts were dropped at load, see drop_long_prompts)."""
    prompt_ids = encode_prompts(tokenizer, prompts, system_prompt)
    response_ids = [encode_response(tokenizer, text, ended)[:max_response_tokens] for text, ended in responses]
    return collate(prompt_ids, response_ids, tokenizer.pad_token_id)


def pair_batch(tokenizer, pairs: list[PreferencePair], system_prompt: str | None, max_response_tokens: int) -> SeqBatch:
    """One SeqBatch of 2B rows: the B chosen responses first, then the B rejected ones."""
    prompts = [p.prompt for p in pairs]
    responses = [(p.chosen, p.chosen_ended) for p in pairs] + [(p.rejected, p.rejected_ended) for p in pairs]
    return response_batch(tokenizer, prompts + prompts, responses, system_prompt, max_response_tokens)


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


def load_pair_split(path: str, cfg: PairTraining, run: Run, tokenizer) -> tuple[list[PreferencePair], list]:
    """Validated preference pairs without over-long prompts, split into (train, held-out) by prompt."""
    prompt_key = lambda pair: json.dumps(pair.prompt, sort_keys=True)  # noqa: E731
    pairs, _ = drop_long_prompts(run, tokenizer, load_preferences(path), cfg, f"pairs of {path}", lambda p: p.prompt)
    train, heldout = split_heldout(pairs, cfg.eval_fraction, cfg.seed, prompt_key)
    if not train:
        raise ValueError(f"{path}: no preference pairs to train on")
    return train, heldout


def fit(run: Run, accelerator, model, groups: list[dict], train: list, cfg: PairTraining, loss_fn, desc: str) -> int:
    """The optimisation loop of the offline stages: AdamW with warm-up and cosine decay over shuffled
    batches of `train`; loss -> backward -> clip -> step, one log row per step; a checkpoint every
    `cfg.checkpoint_every` steps and after the last one. A run with `run.resume_from` restores that
    checkpoint and skips the batches it had already used, so it ends with the weights of an uninterrupted run.
    A NaN/inf loss or gradient skips the update (see NonFiniteGuard).

    `loss_fn(epoch, items) -> (loss, stats)` builds and scores one batch. Returns the number of steps.
    """
    from tqdm.auto import tqdm

    total = math.ceil(len(train) / cfg.batch_size) * cfg.epochs
    optimizer, scheduler = make_optimizer(groups, total, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    models, stateful = {"model": model}, {"optimizer": optimizer, "scheduler": scheduler}
    done = load_checkpoint(run.resume_from, models, stateful)["step"] if run.resume_from else 0
    guard = NonFiniteGuard(run, cfg.max_nonfinite_steps, desc)
    model.eval()  # dropout off: the log-probs and scores that enter the loss are those of the model itself;
    # gradients flow all the same
    with tqdm(total=total, initial=done, desc=desc, unit="step", disable=not cfg.progress) as bar:
        for step, (epoch, items) in enumerate(batches(train, cfg.batch_size, cfg.epochs, cfg.seed), start=1):
            if step <= done:  # the data position of the checkpoint: these batches were trained on
                continue
            with accelerator.autocast():
                loss, stats = loss_fn(epoch, items)
            (grad_norm,) = backward_and_clip(accelerator, loss, [params], cfg.max_grad_norm)
            if math.isfinite(grad_norm):
                optimizer.step()
                guard.ok()
            else:
                guard.skip(step, "gradient" if math.isfinite(loss.item()) else "loss")
            scheduler.step()  # a skipped batch still counts: the schedule follows the data position
            optimizer.zero_grad(set_to_none=True)
            metrics = {"loss": loss.item(), "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
                       "epoch": epoch, "skipped_steps": guard.skipped,
                       **{f"train/{k}": float(v) for k, v in stats.items()}}
            run.log(step, metrics)
            if step == total or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                save_checkpoint(run.dir, step, models, stateful, {"step": step}, keep=cfg.keep_checkpoints)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
    model.eval()
    return total


@torch.no_grad()
def score_in_batches(fn, items: list, size: int) -> list:
    """Apply `fn` to consecutive slices of `items` without gradients; concatenates the tensors it returns."""
    outs = [fn(items[i : i + size]) for i in range(0, len(items), size)]
    return [torch.cat(parts) for parts in zip(*outs)] if outs and isinstance(outs[0], tuple) else torch.cat(outs)
