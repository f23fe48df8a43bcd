"""Several processes (`accelerate launch` or `torchrun`): data parallelism.

Every process holds a full copy of the models and takes its share of each batch; gradients are averaged across
processes before each optimiser step, so the trained weights stay identical everywhere. Process 0 alone writes the
run folder (logs, metrics, checkpoints, models); the others only compute. With one process every function here is
the identity, and nothing about a single-process run changes.

The sharing rule: a global batch of n items splits into contiguous shares, process r taking items
[r * n // W, (r + 1) * n // W) of W processes (`share`). A loss that is a mean over the global batch is then
    L = sum_r (n_r / n) * L_r        (L_r the mean over process r's n_r items)
and, since gradients are averaged (divided by W), each process backpropagates (n_r * W / n) * L_r (`share_weight`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist


def launched() -> bool:
    """True in a process started by `torchrun` or `accelerate launch` with several processes (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def on_cpus() -> bool:
    """Several processes without a GPU: accelerate then joins them with gloo, one process per CPU share."""
    return launched() and not torch.cuda.is_available()


def world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) in a single process. A launched process joins its
    process group at the first call (through accelerate's PartialState, as its Accelerator will)."""
    if launched() and dist.is_available() and not dist.is_initialized():
        from accelerate import PartialState

        with accelerate_without_deepspeed():
            PartialState(cpu=on_cpus())
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextmanager
def accelerate_without_deepspeed():
    """Hide a DeepSpeed launch from accelerate while it sets up (its process group, its Accelerator): accelerate
    would otherwise take the run over with its own DeepSpeed engine (its autocast then does nothing, and its
    backward wants models it prepared). rto drives DeepSpeed itself (rto.zero), after accelerate has set up."""
    value = os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    try:
        yield
    finally:
        if value is not None:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = value


def is_main() -> bool:
    """True in the process that writes the run folder (rank 0), and in a single-process run."""
    return world()[0] == 0


def share_bounds(n: int, rank: int | None = None, size: int | None = None) -> tuple[int, int]:
    """[start, stop) of process `rank`'s contiguous share of n items: [r * n // W, (r + 1) * n // W)."""
    r, w = world() if rank is None or size is None else (rank, size)
    return r * n // w, (r + 1) * n // w


def share(items: list, rank: int | None = None, size: int | None = None) -> list:
    """This process's contiguous share of `items` (share_bounds); all of them with one process."""
    start, stop = share_bounds(len(items), rank, size)
    return items[start:stop]


def share_weight(local: float, total: float) -> float:
    """The factor W * local / total that makes averaged gradients of local means equal the global mean's
    (module docstring): 1 with one process, or when every process holds the same share."""
    _, w = world()
    return w * local / total if total else 0.0


def all_sum(x: torch.Tensor | float) -> torch.Tensor:
    """The sum over processes of a tensor (or a number), returned on every process (a float64 copy)."""
    t = torch.as_tensor(x, dtype=torch.float64).clone()
    if world()[1] > 1:
        dist.all_reduce(t)
    return t


def all_mean(x: torch.Tensor | float) -> torch.Tensor:
    """The mean over processes (of per-process values computed on equal shares)."""
    return all_sum(x) / world()[1]


def any_true(flag: bool) -> bool:
    """True on every process when `flag` is true on one of them."""
    return bool(all_sum(float(flag)) > 0)


def average_gradients(params: list[torch.nn.Parameter], poison: bool = False) -> None:
    """Replace each parameter's gradient by its mean over processes (a missing gradient counts as zeros), in one
    all-reduce of a flat buffer. `poison` (this process met a NaN/inf loss and did not backpropagate) fills its
    contribution with NaN, so every process sees a non-finite gradient and skips the same update."""
    _, w = world()
    params = [p for p in params if not is_sharded(p)]  # FSDP reduce-scatters those in the backward pass
    if w == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    if poison:
        flat.fill_(float("nan"))
    dist.all_reduce(flat)
    flat /= w
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
        offset += n


def env_flag(environ, var: str, default: bool = False) -> bool:
    """A true/false variable as `accelerate launch` writes them ("true"/"false"; 1 and yes count as true)."""
    return environ.get(var, str(default)).lower() in ("1", "true", "yes")


def sharded_training() -> bool:
    """True when the launch asked accelerate for FSDP (ACCELERATE_USE_FSDP) and several processes run."""
    return launched() and env_flag(os.environ, "ACCELERATE_USE_FSDP")


def _reshard_after_forward() -> bool:
    return env_flag(os.environ, "FSDP_RESHARD_AFTER_FORWARD", default=True)


def check_fsdp(environ) -> None:
    """Refuse the FSDP settings rto does not carry out, in one line each: FSDP version 1 (rto wraps with FSDP2),
    parameter offloading, and accelerate's activation checkpointing (rto's own is --gradient_checkpointing)."""
    if environ.get("FSDP_VERSION", "1") != "2":
        raise ValueError(f"this launch asks for FSDP version {environ.get('FSDP_VERSION', '1')}; rto shards with FSDP2: "
                         "set fsdp_version: 2 in the accelerate config (as configs/accelerate/fsdp-*.yaml do)")
    for var, why in (("FSDP_OFFLOAD_PARAMS", "parameter offloading is not supported"),
                     ("FSDP_ACTIVATION_CHECKPOINTING", "use rto's --gradient_checkpointing true instead")):
        if env_flag(environ, var):
            raise ValueError(f"the accelerate config sets {var} (fsdp_{var[5:].lower()}: true): {why}; set it to false")


def shard_trained(model: torch.nn.Module, role: str, note) -> int:
    """Under sharded training (module docstring), wrap each decoder layer of `model` that has trainable weights
    with FSDP2's fully_shard and say so through `note` (e.g. run.note); returns how many were wrapped (0 otherwise:
    the model is left as it is). Call it after set_trainable and trunk sharing, before the optimizer is built (the
    wrapped weights become DTensors)."""
    if not sharded_training():
        return 0
    from rto.models import decoder_of

    reshard = _reshard_after_forward()
    layers = [layer for layer in decoder_of(model).layers if any(p.requires_grad for p in layer.parameters())]
    _shard_layers(model, layers, reshard)
    note(f"fsdp: the {role}'s {len(layers)} trained layers sharded over {world()[1]} processes (each holds 1/"
         f"{world()[1]} of their weights, gradients and AdamW states; reshard after forward: {str(reshard).lower()})")
    return len(layers)


def shard_frozen(model: torch.nn.Module, role: str, n_shared: int, note) -> int:
    """Under sharded training, wrap the decoder layers of a frozen role (reference, DPO model, reward model) above
    the `n_shared` bottom layers that every role shares (rto.trunk, kept whole) with FSDP2's fully_shard, resharded
    after every forward: a process holds 1/W of their weights and gathers one layer at a time while the role scores.
    Every process must then run as many forward passes of the role (its layers gather collectively), which the
    stages keep by giving each process an equal share. Returns how many layers were wrapped (0 without sharding).
    Under DeepSpeed ZeRO-3 (no trunk shared there) the role's weights are split by rto.zero.split_frozen instead."""
    from rto.models import decoder_of
    from rto.zero import split_frozen

    if split_frozen(model, role, note):
        return len(decoder_of(model).layers)
    if not sharded_training():
        return 0
    layers = list(decoder_of(model).layers)[n_shared:]
    _shard_layers(model, layers, True)
    note(f"fsdp: the {role}'s {len(layers)} frozen layers above the shared trunk sharded over {world()[1]} processes "
         f"(each holds 1/{world()[1]} of their weights, gathered one layer at a time as it scores)")
    return len(layers)


def _shard_layers(model: torch.nn.Module, layers: list, reshard: bool) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from rto.config import ConfigError
    from rto.models import is_peft_model

    if is_peft_model(model):
        raise ConfigError("--lora true and FSDP do not combine yet: launch LoRA runs with configs/accelerate/ddp-*.yaml "
                          "(the adapters are small; every process holds the base)")
    mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (world()[1],))
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)


def is_sharded(t: torch.Tensor) -> bool:
    """A tensor that only a share of lives in this process (a DTensor of an FSDP-wrapped layer)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded one (FSDP) or a ZeRO-3 parameter (rto.zero) gathered from every process (all
    must call it), any other as it is."""
    from rto.zero import partitioned, whole_copy

    if partitioned(t):
        return whole_copy(t)
    return t.full_tensor() if is_sharded(t) else t


def assign(p: torch.Tensor, value: torch.Tensor) -> None:
    """Set parameter `p` to the whole `value` (the same in every process): a sharded parameter takes its own shard
    of it, a ZeRO-3 one its own share (both collectives), any other all of it."""
    from rto.zero import gathered_params, partitioned

    with torch.no_grad():
        if partitioned(p):
            with gathered_params([p], modifier_rank=0):  # process 0's value is cut into every process's share
                p.copy_(value)
        else:
            p.copy_(reshard_like(value, p))


def reshard_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A whole tensor `t` cut into `like`'s shards (every process passes the same `t`); `t` when `like` is whole."""
    if not is_sharded(like):
        return t
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(t.to(like.dtype), like.device_mesh, like.placements)


def _fsdp_layers(models) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for model in models if model is not None for m in model.modules() if isinstance(m, FSDPModule)]


def has_sharded_layers(model: torch.nn.Module) -> bool:
    """True when shard_trained wrapped layers of `model` (gathered or not: its state_dict() then holds shards)."""
    return bool(_fsdp_layers([model]))


@contextmanager
def gathered(*models):
    """Hold the sharded layers of `models` (FSDP), and the weights of those split by ZeRO-3 (rto.zero.whole), whole
    until the block ends (sampling, no-gradient scoring, saving): their weights are gathered once, and forward
    passes inside need no collective, so processes may run different numbers of them. Nothing happens without
    sharded layers or ZeRO-3."""
    from rto.zero import whole

    layers = _fsdp_layers(models)
    for layer in layers:
        layer.set_reshard_after_forward(False)
        layer.unshard()
    try:
        with whole(*models):
            yield
    finally:
        reshard = _reshard_after_forward()
        for layer in layers:
            layer.reshard()
            layer.set_reshard_after_forward(reshard)


def full_state(obj, keep: bool = True):
    """`obj` (a state dict, nested dicts/lists/tuples) with every sharded tensor gathered whole, and every tensor
    moved to the CPU one at a time (collective: every process calls it on the same structure). With keep=False
    (the processes that do not write a checkpoint) each tensor is dropped once gathered and None stands in its
    place, so only the writing process ever holds the whole states, and not on the GPU."""
    if isinstance(obj, dict):
        return {k: full_state(v, keep) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(full_state(v, keep) for v in obj)
    if not torch.is_tensor(obj):
        return obj
    whole = full(obj).detach()
    return whole.cpu() if keep else None


def reshard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After load_state_dict of whole states (full_state), cut each sharded parameter's state tensors (AdamW's
    moments) into that parameter's shards; AdamW's scalar step stays as it is."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if is_sharded(p):
                for key, value in optimizer.state.get(p, {}).items():
                    if torch.is_tensor(value) and not is_sharded(value) and value.shape == p.shape:
                        optimizer.state[p][key] = reshard_like(value, p)


def gather_lists(items: list) -> list:
    """Every process's list, concatenated in rank order, on every process (picklable items)."""
    _, w = world()
    if w == 1:
        return list(items)
    parts: list = [None] * w
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def gather_to_main(item):
    """Every process's `item` (picklable), in rank order, on process 0; None on the others."""
    rank, w = world()
    if w == 1:
        return [item]
    parts = [None] * w if rank == 0 else None
    dist.gather_object(item, parts, dst=0)
    return parts


def broadcast(value):
    """Process 0's `value` on every process (a picklable object)."""
    if world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def close() -> None:
    """Leave the process group at the end of a launched command. A process that exits still joined to a gloo group
    is aborted now and then as its threads are torn down ("terminate called without an active exception", exit
    code -6), and torchrun then reports the whole finished run as failed."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def leave(code: int) -> int:
    """End a command with exit status `code`. With one process, return it. With several, a command that
    succeeded waits for every process to get here (process 0 may still be writing, e.g. the report), then all
    leave the process group (close) and exit at once through os._exit, past the interpreter's teardown: there a
    finished process was still aborted now and then by a C++ thread left running ("terminate called without an
    active exception", SIGABRT), which torchrun reports as the whole run failing. Files are closed by then
    (Run.close); stdout, stderr and logging are flushed first."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        close()
        return code
    import logging
    import os
    import sys

    if code == 0:
        barrier()
    close()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def barrier() -> None:
    """Wait until every process gets here (e.g. before reading what process 0 wrote)."""
    if world()[1] > 1:
        dist.barrier()


def check_in_sync(models: dict[str, torch.nn.Module]) -> None:
    """Raise when the trainable weights differ between processes (they must stay identical under averaged
    gradients): compares the sum and the sum of squares of every role's trainable parameters held whole in every
    process, exactly. Split parameters (FSDP shards, ZeRO-3 shares) are one copy cut in pieces, so they cannot
    differ, and are not gathered for it."""
    from rto.zero import partitioned

    _, w = world()
    if w == 1:
        return
    for role, model in models.items():
        params = [p.detach().double() for p in model.parameters()
                  if p.requires_grad and not is_sharded(p) and not partitioned(p)]
        local = torch.stack([sum(p.sum() for p in params), sum((p * p).sum() for p in params)]) if params else \
            torch.zeros(2, dtype=torch.float64)
        low, high = local.clone(), local.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        if not torch.equal(low, high):
            raise RuntimeError(f"the {role}'s weights differ between the {w} processes (sum {low[0]:.6g} .. "
                               f"{high[0]:.6g}): the processes went out of step")


def mean_over_processes(metrics: dict) -> dict:
    """`metrics` with every number replaced by its mean over processes (one all-reduce for all of them; the same
    keys in every process). Means of per-process means: exact for quantities averaged over responses, since every
    process holds the same number of them; token averages are weighted by response instead of by token."""
    _, w = world()
    keys = [k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if w == 1 or not keys:
        return metrics
    values = all_sum(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)) / w
    return {**metrics, **{k: float(v) for k, v in zip(keys, values)}}


def masked_moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population variance of the masked entries of x over every process's batch (two passes:
    mean = sum(x) / n, then var = sum((x - mean)^2) / n, each sum over all processes)."""
    m = mask.bool()
    n = all_sum(m.sum())
    mean = (all_sum(x[m].double().sum()) / n).to(x.dtype)
    var = (all_sum(((x[m] - mean).double() ** 2).sum()) / n).to(x.dtype)
    return mean, var
