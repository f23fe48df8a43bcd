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
from rto.trunk import checked_trunk_layers, frozen_layers, share_trunk_weights
from rto.zero import engine_for
from rto.rollout import encode_prompts, encode_response
from rto.runtime import (NonFiniteError, Run, check_report_to, emulated_bf16_note, folder_state, make_accelerator,
                         resolve_precision, seed_everything)
from rto.sequences import SeqBatch, collate


# a skipped update (NaN/inf loss, gradient or reward) still advances the schedules on purpose (they follow the
# data position), which torch reports as a scheduler step before an optimizer step
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")

@dataclass
class Common:
    """Fields every stage has."""

    out: str = "runs/stage"
    """The run folder (config.yaml, metrics.jsonl, log.txt, tb/, the saved model): a new or empty folder, or
    one rto made."""
    seed: int = 0
    """Random seed of the run: data order, held-out split, prompt subset and sampling follow it; >= 0."""
    precision: str = "auto"
    """auto | fp32 | bf16. bf16 = bf16 autocast with fp32 master weights; auto = bf16 on a GPU or CPU with
    native bf16 (AVX512-BF16, AMX), else fp32."""
    train_layers: int | None = 6
    """Train only the top k decoder layers (+ the final norm and a value head); null = every layer; >= 1.
    Frozen bottom layers that are identical in every role are computed once per batch and shared."""
    system_prompt: str | None = ""
    """System message added to every prompt that has none ("" = an empty one); null = the chat template's
    default."""
    trust_remote_code: bool = False
    """Run model code shipped with a hub model or folder (transformers' trust_remote_code); off by default."""
    threads: int | None = None
    """torch CPU threads; null = torch's default; >= 1."""
    progress: bool = True
    """Show progress bars."""
    resume: bool | None = None
    """null: continue from the last checkpoint in `out` when the same config stopped there (a finished run is
    not run again); true: the same, but fail when there is no checkpoint; false: start over."""
    overwrite: bool = False
    """Replace the results of a run with a different config in `out` (otherwise that folder is refused)."""
    max_prompt_tokens: int = 256
    """Longest prompt kept, in tokens after the chat template; longer ones are skipped and counted in the
    log; >= 1."""
    report_to: str = "tensorboard"
    """Where metrics go besides metrics.jsonl: tensorboard (tb/) | wandb | mlflow | trackio | none; wandb,
    mlflow and trackio need the optional extra of the same name."""

    def __post_init__(self):
        check_fields(self)  # every field within its range (rto.config.RULES), whatever built the config
        check_report_to(self.report_to)  # a known tracker whose package is installed (its extra named if not)


@dataclass
class Checkpointing:
    """When a training stage saves its state (see rto.checkpoint); it always does at the end of training."""

    checkpoint_every: int = 50
    """Optimisation steps between checkpoints (rto ppo: iterations); 0 = only after the last one; >= 0. An
    interrupted run continues from its last checkpoint."""
    keep_checkpoints: int = 1
    """How many of the newest checkpoints are kept; all are removed once the stage finishes; >= 1."""


@dataclass
class Optimization:
    """AdamW and schedule fields shared by every training stage (see make_optimizer)."""

    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW's decay rates of the running mean of the gradient and of its square; two numbers in [0, 1)."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay; >= 0."""
    warmup_ratio: float = 0.03
    """Share of the optimisation steps spent warming the learning rate up linearly from 0; in [0, 1)."""
    min_lr_ratio: float = 0.1
    """Learning rate at the end of the cosine decay, as a share of the peak; in [0, 1]."""
    max_grad_norm: float = 1.0
    """Each trained model's gradient is clipped to this L2 norm before every update; > 0."""
    max_nonfinite_steps: int = 3
    """Updates in a row that may be skipped for a NaN/inf loss, gradient or reward before the stage stops;
    >= 0."""
    micro_batch_size: int | None = None
    """Items (pairs; rto ppo: responses) per forward and backward pass in each process: a batch's share is
    split into micro-batches whose gradients add up before the one update, which is the whole batch's up to
    float rounding, with a micro-batch's activations in memory instead of the share's; null = the whole share
    at once; >= 1."""


@dataclass
class PairTraining(Checkpointing, Optimization, Common):
    """Fields of the stages that train on a preference file (sft, rm, dpo)."""

    epochs: int = 1
    """Passes over the training pairs; >= 1."""
    batch_size: int = 8
    """Preference pairs per optimisation step (rm and dpo score the chosen and the rejected response of
    each, sft the chosen one); >= 1."""
    lr: float = 5e-5
    """Peak learning rate, reached after the warm-up, then decayed (cosine) to min_lr_ratio of it; > 0."""
    eval_fraction: float = 0.1
    """Share of the prompts whose pairs are held out for evaluation (a prompt's pairs stay on one side);
    in [0, 1)."""
    max_response_tokens: int = 256
    """Responses are cut to this many tokens (a cut response loses its EOS); >= 1."""


def start(cfg: Common, name: str) -> tuple[Run, object]:
    """Seed everything, create the accelerator (with the tracker `cfg.report_to`), open the run folder (resuming
    from its last checkpoint when the same config stopped there, see runtime.folder_state); returns (run, accelerator).

    The folder is claimed first (runtime.claim_run_folder: rto's own, no symbolic links where rto writes, no
    other process using it), so nothing in it is read for a decision or changed before; the run holds it
    until `run.finish()` or `run.close()`."""
    from rto.distributed import broadcast, is_main
    from rto.runtime import claim_run_folder

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)  # the same seed in every process: they draw the same global random numbers
    accelerator = make_accelerator(cfg.precision, cfg.report_to, cfg.out)
    if is_main():  # with several processes, process 0 decides and writes; the others follow its decision
        with claim_run_folder(cfg.out):
            resume_from = latest_checkpoint(cfg.out) if folder_state(cfg) == "resume" else None
            run = Run(cfg.out, cfg, resume_from=resume_from, accelerator=accelerator, stage=name)
        broadcast(resume_from)
    else:
        cfg.progress = False  # progress bars and log lines come from process 0 only
        resume_from = broadcast(None)
        run = Run(cfg.out, cfg, resume_from=resume_from, accelerator=accelerator, stage=name)
    precision = resolve_precision(cfg.precision)
    run.note(f"{name}: precision {precision}, device {accelerator.device}, out {run.dir}"
             + (f"; resuming from {resume_from}" if resume_from else ""))
    if note := emulated_bf16_note(precision, accelerator.device):
        run.note(f"{name}: {note}")
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

    from rto.lora import adapter_base, is_adapter_folder
    from rto.models import resolve_model

    try:
        folder = resolve_model(path, role)
        if is_adapter_folder(folder):  # a LoRA adapter: the positions are its base model's
            folder = resolve_model(adapter_base(folder), role)
        config = AutoConfig.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
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


def backward(accelerator, loss: torch.Tensor, engine=None) -> bool:
    """Backpropagate `loss` unless it is NaN/inf; returns whether it was finite (for clip_gradients, or
    end_batch). When gradients are reduced inside the backward pass (collective_backward) every process
    backpropagates, NaN or not: clip_gradients then poisons the gradients, and a DeepSpeed `engine` (rto.zero)
    skips a NaN update itself."""
    ok = finite(loss.detach())
    if engine is not None:
        engine.backward(loss)
    elif ok or collective_backward():
        accelerator.backward(loss)
    return ok


def collective_backward() -> bool:
    """True when every process must run as many backward passes as the others: FSDP and DeepSpeed ZeRO-2 reduce
    gradients inside them (and ZeRO-1 is held to the same rule, so that both stages take one code path)."""
    from rto.distributed import sharded_training
    from rto.zero import zero_stage

    return sharded_training() or zero_stage() > 0


def end_batch(engines: list, ok: bool) -> list[float]:
    """The step of DeepSpeed `engines` (rto.zero.Engine) after a batch's backward passes (`ok`: all their losses
    were finite in this process): when a loss was NaN/inf in any process, every engine's gradient is made NaN
    first, so that all of them skip the update together. Returns their gradient norms before clipping (NaN/inf
    for a skipped update)."""
    from rto.distributed import any_true

    if any_true(not ok):
        for engine in engines:
            engine.poison()
    return [engine.step() for engine in engines]


def clip_gradients(param_sets: list[list], max_norm: float, ok: bool) -> list[float]:
    """After one or more `backward` calls (`ok`: all their losses finite): the gradients averaged over processes
    (rto.distributed; nothing with one process), then each parameter set clipped to `max_norm`; returns their norms
    before clipping. A NaN/inf loss (`ok` false) gives NaN norms, in every process when one of them met it: the update
    goes ahead only if all are finite. Without DeepSpeed (rto.zero: end_batch)."""
    from rto.distributed import average_gradients, is_sharded, world

    if world()[1] > 1:
        average_gradients([p for params in param_sets for p in params], poison=not ok)
        if not ok:  # the sharded gradients too: their norm, summed over processes, is then NaN in every process
            for p in (p for params in param_sets for p in params if is_sharded(p) and p.grad is not None):
                p.grad.to_local().fill_(float("nan"))
    elif not ok:
        return [float("nan")] * len(param_sets)
    return [clip_grad_norm(params, max_norm) for params in param_sets]


def clip_grad_norm(params: list, max_norm: float) -> float:
    """torch's clip_grad_norm_ (scale every gradient by min(1, max_norm / (norm + 1e-6)), norm the L2 norm of all
    of them), also for a set that mixes sharded parameters (rto.distributed) with whole ones: the sharded part's
    norm is summed over processes first. Returns the norm before clipping."""
    from rto.distributed import full, is_sharded

    if not any(is_sharded(p) for p in params):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    parts = [[p.grad for p in params if p.grad is not None and is_sharded(p) == sharded] for sharded in (True, False)]
    norm = float(torch.stack([full(torch.nn.utils.get_total_norm(grads)) if grads else torch.zeros(())
                              for grads in parts]).norm())
    coef = min(1.0, max_norm / (norm + 1e-6))
    if coef < 1.0:
        for grads in parts:
            if grads:
                torch._foreach_mul_(grads, coef)
    return norm


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
    """AdamW + linear warm-up + cosine decay to `opt.min_lr_ratio` of the peak.

    AdamW runs fused (one kernel over all parameters) on CPU and CUDA: the same update up to fp32 rounding
    (~1e-8), 5-8x faster than torch's default per-tensor loop on CPU (0.12 s against 0.7-1.0 s a step for the
    135M parameters of SmolLM2 on 2 cores), where the per-tensor loop cost about 1 s of each PPO minibatch."""
    from rto.distributed import is_sharded

    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    if any(is_sharded(p) for p in params):  # a fused update takes sharded and whole tensors in separate groups
        groups = [{**g, "params": part} for g in groups for part in
                  ([p for p in g["params"] if is_sharded(p)], [p for p in g["params"] if not is_sharded(p)]) if part]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    optimizer = torch.optim.AdamW(groups, betas=tuple(opt.betas), weight_decay=opt.weight_decay, fused=fused or None)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=math.ceil(opt.warmup_ratio * total_steps),
        num_training_steps=max(total_steps, 1), min_lr_rate=opt.min_lr_ratio,
    )
    return optimizer, scheduler


def shared_trunk_layers(models: list, train_layers: int | None, probe: SeqBatch, note, trains: bool = True) -> int:
    """How many bottom layers every role can share, proven on `probe` (e.g. rto.sequences.probe_batch of the
    run's first prompts); 0 when nothing is frozen or sharing would change a result, with the reason passed to
    `note` (e.g. run.note): each role then runs its full stack. A count > 0 is noted too, in one line (how many
    layers, for how many roles), so a run's log says whether it shared; the roles then hold one copy of the trunk's
    weights (rto.trunk.share_trunk_weights). See rto.trunk.checked_trunk_layers. Under DeepSpeed ZeRO-3 a stage that
    `trains` shares nothing: the engine splits the trained model's frozen bottom layers too, which the other roles
    would read."""
    from rto.zero import zero_stage

    if zero_stage() == 3 and trains:
        if frozen_layers(models[0], train_layers):
            note("trunk sharing off: under DeepSpeed ZeRO-3 the trained models' frozen layers are split over the "
                 "processes with the rest, so each role runs its full stack")
        return 0
    n = checked_trunk_layers(models, train_layers, probe, note)
    if n:
        freed = share_trunk_weights(models, n)
        note(f"trunk sharing on: embeddings and bottom {n} layers computed once per batch (frozen, no gradients), "
             f"then the top {train_layers} layers of each role ({len(models)} role{'s' if len(models) > 1 else ''})"
             + (f"; the trunk's weights are held once ({freed / 2**20:.0f} MB not held again)" if freed else ""))
    return n


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


def batch_means(shares: list[tuple[int, float, dict[str, float]]]) -> tuple[float, dict[str, float]]:
    """The whole batch's mean loss and stats from each process's (items n_r, mean loss, mean stats):
    sum_r n_r * x_r / sum_r n_r (process shares without items are left out); one share is returned as it is."""
    shares = [part for part in shares if part[0]]
    if len(shares) == 1:
        return shares[0][1], shares[0][2]
    total = sum(n for n, _, _ in shares)
    loss = sum(n * value for n, value, _ in shares) / total
    return loss, {k: sum(n * stats[k] for n, _, stats in shares) / total for k in shares[0][2]}


def batch_gradients(accelerator, params: list, loss_fn, epoch: int, items: list, cfg: Optimization, engine=None,
                    units_fn=len) -> tuple[float, float, dict[str, float]]:
    """The gradient of one batch's mean loss in `params`, averaged over processes and clipped (fit); returns
    (gradient norm before clipping, the batch's mean loss, its mean stats). With a DeepSpeed `engine`
    (rto.zero.Engine) the losses go through it, and its step (averaging, clipping, the update) ends the batch.

    Each process takes its contiguous share of `items` (rto.distributed.share). At once, when the share fits in
    cfg.micro_batch_size: its loss, weighed by W * units / total units of the batch (share_weight), is
    backpropagated. Otherwise in micro-batches j of at most micro_batch_size items, every process the same
    number of passes (FSDP's and ZeRO-2's backward is collective): the units of every micro-batch, `units_fn(part)`
    (what loss_fn counts, or its number of items), are added up over the processes first, and each loss_j is
    backpropagated weighed by W * units_j / total, which gives the same weighted mean.
    """
    from rto.distributed import all_sum, gather_lists, share, share_weight, world

    def zero_loss():  # zero gradients through a forward and backward (FSDP and ZeRO-2 reduce inside)
        with accelerator.autocast():
            return loss_fn(epoch, items[:1])[0] * 0.0

    def finish(ok: bool) -> float:
        if engine is not None:
            return end_batch([engine], ok)[0]
        return clip_gradients([params], cfg.max_grad_norm, ok)[0]

    mine = share(items)
    size = cfg.micro_batch_size or len(items)
    passes = math.ceil(math.ceil(len(items) / world()[1]) / size)  # the largest share's micro-batches
    if passes == 1:
        units = 0
        if mine:
            with accelerator.autocast():
                loss, stats, *counted = loss_fn(epoch, mine)
            units = float(counted[0]) if counted else len(mine)
        elif collective_backward():
            loss, stats = zero_loss(), {}
        else:  # a last batch smaller than the number of processes: this one contributes zero gradients
            loss, stats = sum(p.sum() for p in params) * 0.0, {}
        # every process's (units, mean loss, mean stats): the weights of the shares, then the batch's means
        shares = gather_lists([(units, loss.item(), {k: float(v) for k, v in stats.items()})])
        ok = backward(accelerator, loss * share_weight(units, sum(n for n, _, _ in shares)), engine)
        return finish(ok), *batch_means(shares)
    parts = [mine[j * size : (j + 1) * size] for j in range(passes)]
    counts = [float(units_fn(part)) if part else 0.0 for part in parts]
    total = float(all_sum(sum(counts)))  # the batch's units, over every process
    ok, units, loss_sum, stat_sums = True, 0.0, 0.0, {}
    for part, n in zip(parts, counts):
        if part:
            with accelerator.autocast():
                loss, stats, *counted = loss_fn(epoch, part)
            if counted and float(counted[0]) != n:
                raise RuntimeError(f"units_fn counted {n:g} units in a micro-batch whose loss averages {counted[0]}")
            ok = backward(accelerator, loss * share_weight(n, total), engine) and ok
            units, loss_sum = units + n, loss_sum + loss.item() * n
            for k, v in stats.items():
                stat_sums[k] = stat_sums.get(k, 0.0) + float(v) * n
        elif collective_backward():  # a smaller share: a zero pass, so that every process runs as many backwards
            backward(accelerator, zero_loss(), engine)
    shares = gather_lists([(units, loss_sum / units if units else 0.0, {k: v / units for k, v in stat_sums.items()})])
    return finish(ok), *batch_means(shares)


def fit(run: Run, accelerator, model, groups: list[dict], train: list, cfg: PairTraining, loss_fn, desc: str,
        units_fn=len) -> int:
    """The optimisation loop of the offline stages: AdamW with warm-up and cosine decay over shuffled
    batches of `train`; loss -> backward -> clip -> step, one log row per step; a checkpoint every
    `cfg.checkpoint_every` steps and after the last one. A run with `run.resume_from` restores that
    checkpoint and skips the batches it had already used, so it ends with the weights of an uninterrupted run.
    A NaN/inf loss or gradient skips the update (see NonFiniteGuard).

    `loss_fn(epoch, items) -> (loss, stats)` builds and scores one batch (a mean over `items`); a loss that is a
    mean over something else (SFT's over response tokens) returns `(loss, stats, units)`, how many terms it
    averages, and `units_fn(items)` counts them without the forward pass (for micro-batches). Returns the number
    of steps. Under a DeepSpeed launch (rto.zero) the model and its AdamW go into a ZeRO engine, which averages,
    clips and steps. A step's gradient is batch_gradients': with several processes each
    takes its contiguous share of every batch, weighed by its share of the units, and the gradients are averaged;
    with cfg.micro_batch_size a share goes through in micro-batches. Either way a step equals the one-process step
    on the whole batch (up to float rounding); the logged loss and stats are the batch's means.
    """
    from tqdm.auto import tqdm

    total = math.ceil(len(train) / cfg.batch_size) * cfg.epochs
    optimizer, scheduler = make_optimizer(groups, total, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    engine = engine_for(model, optimizer, cfg.max_grad_norm, "model", run.note)
    models, stateful = {"model": model}, {"optimizer": engine or optimizer, "scheduler": scheduler}
    done = load_checkpoint(run.resume_from, models, stateful)["step"] if run.resume_from else 0
    guard = NonFiniteGuard(run, cfg.max_nonfinite_steps, desc)
    model.eval()  # dropout off: the log-probs and scores that enter the loss are those of the model itself;
    # gradients flow all the same
    with tqdm(total=total, initial=done, desc=desc, unit="step", disable=not cfg.progress) as bar:
        for step, (epoch, items) in enumerate(batches(train, cfg.batch_size, cfg.epochs, cfg.seed), start=1):
            if step <= done:  # the data position of the checkpoint: these batches were trained on
                continue
            grad_norm, batch_loss, stats = batch_gradients(accelerator, params, loss_fn, epoch, items, cfg, engine,
                                                           units_fn)
            if math.isfinite(grad_norm):
                if engine is None:  # the engine has stepped
                    optimizer.step()
                guard.ok()
            else:
                guard.skip(step, "gradient" if math.isfinite(batch_loss) else "loss")
            scheduler.step()  # a skipped batch still counts: the schedule follows the data position
            (engine or optimizer).zero_grad(set_to_none=True)
            metrics = {"loss": batch_loss, "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
                       "epoch": epoch, "skipped_steps": guard.skipped,
                       **{f"train/{k}": v for k, v in stats.items()}}
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
