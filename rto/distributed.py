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

        PartialState(cpu=on_cpus())
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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


def gather_lists(items: list) -> list:
    """Every process's list, concatenated in rank order, on every process (picklable items)."""
    _, w = world()
    if w == 1:
        return list(items)
    parts: list = [None] * w
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def broadcast(value):
    """Process 0's `value` on every process (a picklable object)."""
    if world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait until every process gets here (e.g. before reading what process 0 wrote)."""
    if world()[1] > 1:
        dist.barrier()


def check_in_sync(models: dict[str, torch.nn.Module]) -> None:
    """Raise when the trainable weights differ between processes (they must stay identical under averaged
    gradients): compares the sum and the sum of squares of every role's trainable parameters, exactly."""
    _, w = world()
    if w == 1:
        return
    for role, model in models.items():
        params = [p.detach().double() for p in model.parameters() if p.requires_grad]
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
