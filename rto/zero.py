"""DeepSpeed ZeRO stages 1, 2 and 3 for the models a stage trains (`accelerate launch` with a DeepSpeed config).

Under ZeRO-1 and ZeRO-2 every process still holds the whole weights, as under plain data parallelism, and the
optimizer's part is split over the W processes: stage 1 splits AdamW's two moments and its fp32 copy of the
weights, stage 2 the averaged gradients too, and `offload_optimizer_device: cpu` keeps the split states in CPU
memory (ZeRO-Offload). A process then holds 1/W of 12 bytes per trained weight (stage 1) or 16 (stage 2) besides
the weights themselves. ZeRO-3 splits the weights of the trained model too (all of them, frozen layers
included): a process holds 1/W of the model's 4 bytes per weight and of the 16 per trained weight, and each
layer's weights are gathered as its forward (and its backward) runs, then dropped.

What the engine takes over and what stays rto's:
- rto builds each trained model, its AdamW and its learning-rate schedule as without DeepSpeed; `Engine` hands
  model and AdamW to deepspeed.initialize (the schedule keeps setting the learning rate of the same groups);
- each process backpropagates its own losses, weighted by the share rule of rto.distributed (W * units / total),
  through the engine, and every process as often as the others: stage 2 reduces gradients inside each backward
  (stage 3 also gathers weights inside each forward, so every process runs as many forward passes too);
- the engine's step averages the gradients over the processes (stage 1), clips them to `max_grad_norm` (the
  L2 norm of the averaged gradient, as torch's clip_grad_norm_) and skips the update when that norm is NaN/inf;
  a NaN/inf loss anywhere is turned into NaN gradients in every engine (`poison`), so every process skips;
- under ZeRO-3, sampling, no-gradient scoring and saving run inside `whole(model)`: every weight gathered once
  and the engine's per-layer gathering switched off for the block, so forward passes there need no collective
  (processes may sample different numbers of tokens) and rto's sampler may read the weights directly;
- checkpoints hold the whole weights, as always, and every process's share of the optimizer states (gathered
  into trainer.pt, read back with weights_only=True); a resume needs the same stage and number of processes.

Under ZeRO-3 the frozen roles (reference, DPO model, reward model) are split the same way, in engines without
optimizer (`split_frozen`), and no trunk is shared (the engine splits the policy's frozen bottom layers, which the
other roles would read).
"""

from __future__ import annotations

import os
import weakref
from contextlib import contextmanager

import torch
import torch.distributed as dist

from rto.config import ConfigError

STAGES = (1, 2, 3)
USE_VAR = "ACCELERATE_USE_DEEPSPEED"  # what `accelerate launch` sets from `distributed_type: DEEPSPEED`


def deepspeed_launch(environ=None) -> bool:
    """True when the launch asked accelerate for DeepSpeed."""
    from rto.distributed import env_flag

    return env_flag(os.environ if environ is None else environ, USE_VAR)


def zero_stage(environ=None) -> int:
    """The ZeRO stage of a DeepSpeed launch (accelerate's default, 2, when its config names none); 0 otherwise."""
    environ = os.environ if environ is None else environ
    if not deepspeed_launch(environ):
        return 0
    value = environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"the accelerate config's zero_stage is {value!r}; rto runs ZeRO stage 1, 2 or 3") from None


def offload_device(environ=None) -> str:
    """Where ZeRO keeps the optimizer states: "none" (with the model) or "cpu" (ZeRO-Offload)."""
    environ = os.environ if environ is None else environ
    return environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none").lower()


def check_deepspeed(environ) -> None:
    """Refuse, in one line each, the DeepSpeed settings rto does not carry out: ZeRO stages other than 1, 2 and
    3, a DeepSpeed config file of the user's own (rto writes the engine's config from its own fields), parameter
    offloading, offloading to NVMe, ZeRO-3's zero.Init at load, accelerate's gradient accumulation and clipping
    (rto's are --micro_batch_size and --max_grad_norm); and a missing deepspeed package."""
    from rto.distributed import env_flag

    stage = zero_stage(environ)
    if stage not in STAGES:
        raise ConfigError(f"this launch asks for DeepSpeed ZeRO stage {stage}; rto runs stage 1, 2 or 3 "
                          "(configs/accelerate/zero2-*.yaml, zero3-*.yaml), or plain data parallelism with "
                          "configs/accelerate/ddp-*.yaml")
    if environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        raise ConfigError("the accelerate config names a deepspeed_config_file; rto writes DeepSpeed's config itself "
                          "from zero_stage, offload_optimizer_device and its own fields (--max_grad_norm, "
                          "--micro_batch_size, --precision): remove deepspeed_config_file and set those two keys")
    if offload_device(environ) not in ("none", "cpu"):
        raise ConfigError(f"offload_optimizer_device: {offload_device(environ)} is not supported; use none or cpu")
    if environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none").lower() != "none":
        raise ConfigError("offload_param_device is not supported (rto's ZeRO-3 keeps each process's share of the "
                          "weights with the model): set it to none; offload_optimizer_device: cpu is")
    if environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1") not in ("1", "none", "None"):
        raise ConfigError("the accelerate config sets gradient_accumulation_steps; rto takes each batch in passes "
                          "of --micro_batch_size items instead: remove it (or set it to 1)")
    if environ.get("ACCELERATE_GRADIENT_CLIPPING", "none").lower() not in ("none", ""):
        raise ConfigError("the accelerate config sets gradient_clipping; rto clips to its --max_grad_norm: remove it")
    if env_flag(environ, "ACCELERATE_DEEPSPEED_ZERO3_INIT"):
        raise ConfigError("zero3_init_flag is not supported: rto loads each model whole, then its ZeRO-3 engine splits "
                          "the weights; set it to false")
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise ConfigError("this launch asks for DeepSpeed, which is not installed: pip install 'rto-rlhf[deepspeed]' "
                          "(in a clone: pip install -e '.[deepspeed]')") from None


def engine_config(max_grad_norm: float) -> dict:
    """DeepSpeed's config for one trained model: the launch's ZeRO stage and offload device; no gradient
    accumulation of its own (managed_gradient_accumulation off: every backward adds to the gradients, and a step
    ends them), clipping to `max_grad_norm` (0: none), fp32 weights (rto's --precision bf16 is autocast around
    the forward passes, as without DeepSpeed), and nothing printed."""
    offload = offload_device()
    zero = {"stage": zero_stage()}
    if offload != "none":
        zero["offload_optimizer"] = {"device": offload, "pin_memory": torch.cuda.is_available()}
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "managed_gradient_accumulation": False, "gradient_clipping": float(max_grad_norm or 0.0),
            "zero_optimization": zero, "zero_allow_untested_optimizer": True,
            # torch's AdamW (fused) as the client optimizer, also with ZeRO-Offload (no compiled DeepSpeed ops)
            "zero_force_ds_cpu_optimizer": False, "steps_per_print": 2**62, "wall_clock_breakdown": False}


class Engine:
    """A trained model and its AdamW inside a DeepSpeed ZeRO engine (stage 1, 2 or 3; module docstring).

    backward(loss) adds a loss's gradients (in every process, as often as every other process), step() ends the
    batch: averages, clips and updates, and returns the gradient norm before clipping (inf or NaN when the update
    was skipped). As an entry of a checkpoint's `stateful`, state_dict() gathers every process's optimizer share
    on process 0 (a collective) and load_state_dict() puts this process's share back."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float,
                 role: str, note):
        import deepspeed

        from rto.distributed import world

        _set_up()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=engine_config(max_grad_norm), dist_init_required=False)
        self.base = optimizer  # rto's AdamW, now stepping this process's flat share of the weights
        self.stage, offload, w = zero_stage(), offload_device(), world()[1]
        if self.stage == 3:
            _SPLIT[model] = self.optimizer.parameter_offload
        split = {1: "AdamW states", 2: "AdamW states and gradients", 3: "weights, gradients and AdamW states"}
        note(f"deepspeed: the {role}'s {split[self.stage]} split over {w} process{'es' if w > 1 else ''} "
             f"(ZeRO-{self.stage}{', states in CPU memory' if offload == 'cpu' else ''})")

    def backward(self, loss: torch.Tensor) -> None:
        # what the engine's own forward does first, rto calling the model itself: a backward after another adds to
        # its gradients (ZeRO-3 counts the backward passes of a step with it; without, each one replaced the last)
        self.optimizer.clear_backward_seen_flag()
        self.engine.backward(loss, scale_wrt_gas=False)

    def poison(self) -> None:
        """Make this batch's gradient NaN, so that step() skips the update (every process must call it)."""
        self.optimizer.clear_backward_seen_flag()
        with gathered_params(self.params if self.stage == 3 else []):  # ZeRO-3: gradients of whole weights
            self.engine.backward(sum(p.sum() for p in self.params) * float("nan"), scale_wrt_gas=False)

    def step(self) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the model's gradients (set to None, whatever `set_to_none`, which is there for the optimizer's
        signature) through the engine, whose own buffers stay: with offload its step writes the averaged gradient
        into a buffer that rto's AdamW's zero_grad would drop."""
        self.engine.zero_grad()

    def state_dict(self) -> dict:
        """Every process's share of the optimizer states, on process 0 (which writes checkpoints; a collective).
        Under ZeRO-3 a share is AdamW's states and this process's fp32 share of the weights (DeepSpeed's
        optimizer state without its loss scaler, a Python object that weights_only=True would not read back)."""
        from rto.distributed import full_state, gather_to_main

        if self.stage == 3:
            state = self.optimizer.state_dict()
            share = {"adamw": state["optimizer_state_dict"], "fp32": state["fp32_flat_groups"]}
        else:
            share = self.base.state_dict()
        return {"shares": gather_to_main(full_state(share))}

    def load_state_dict(self, state: dict) -> None:
        from rto.distributed import world

        rank, w = world()
        if len(state["shares"]) != w:
            raise ValueError(f"the checkpoint holds {len(state['shares'])} optimizer shares for {w} processes")
        share = state["shares"][rank]
        if self.stage == 3:  # DeepSpeed reads the entry of this rank; its fp32 share also sets this share's weights
            mine = {"loss_scaler": self.optimizer.loss_scaler, "dynamic_loss_scale": self.optimizer.dynamic_loss_scale,
                    "overflow": False, "optimizer_state_dict": share["adamw"], "fp32_flat_groups": share["fp32"]}
            self.optimizer.load_state_dict([mine if r == rank else None for r in range(w)],
                                           load_optimizer_states=True, load_from_fp32_weights=True)
            return
        self.base.load_state_dict(share)
        self.optimizer.refresh_fp32_params()  # the fp32 copy of this share, from the weights just loaded


def _set_up() -> None:
    """What DeepSpeed needs before its first engine: no compiled ops, and a process group."""
    import deepspeed.ops

    if "__compatible_ops__" not in vars(deepspeed.ops):
        # which compiled ops DeepSpeed may build, probed with the C++ compiler on first use; it asks only to build
        # the shared-memory all-reduce of its CPU backend (about a minute of compiling on a first start), which
        # rto does not use: its reductions go through torch.distributed. Nothing is probed or built.
        deepspeed.ops.__compatible_ops__ = {}
    if not dist.is_initialized():  # one process (e.g. ZeRO-Offload on one GPU): DeepSpeed still wants a process
        # group, here one of this process alone, its store in memory; and it reads its device from LOCAL_RANK
        os.environ.setdefault("LOCAL_RANK", "0")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)


# what splits each ZeRO-3 model's weights and gathers them around its layers (DeepSpeed's DeepSpeedZeRoOffload), by
# model: whole() turns it off for a block
_SPLIT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def split_frozen(model: torch.nn.Module, role: str, note) -> bool:
    """Under ZeRO-3, split the weights of a frozen role (reference, DPO model, reward model) over the processes as
    the trained models' are, in an engine without optimizer (DeepSpeed's ZeRO-3 inference): a process holds 1/W of
    them, and each layer's weights are gathered as its forward runs, then dropped. Every process must then run as
    many forward passes of the role (they gather collectively), which the stages keep by giving each process an
    equal share. Returns whether it split (False without ZeRO-3)."""
    if zero_stage() != 3:
        return False
    import deepspeed

    from rto.distributed import world

    _set_up()
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "steps_per_print": 2**62,
              "wall_clock_breakdown": False}
    engine, _, _, _ = deepspeed.initialize(model=model, config=config, dist_init_required=False)
    _SPLIT[model] = engine.optimizer  # without an optimizer, the engine's DeepSpeedZeRoOffload
    w = world()[1]
    note(f"deepspeed: the {role}'s weights split over {w} process{'es' if w > 1 else ''} (ZeRO-3, frozen: gathered "
         "one layer at a time as it scores)")
    return True


def partitioned(t) -> bool:
    """A parameter that a ZeRO-3 engine split over the processes (DeepSpeed marks it with ds_id and ds_status)."""
    return hasattr(t, "ds_id") and hasattr(t, "ds_status")


@contextmanager
def gathered_params(params: list, modifier_rank: int | None = None):
    """DeepSpeed's GatheredParameters over `params` (a collective); nothing when the list is empty."""
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def whole_copy(p: torch.Tensor) -> torch.Tensor:
    """A ZeRO-3 parameter's whole value, gathered from every process (all must call it), as a detached copy."""
    with torch.no_grad(), gathered_params([p]):
        return p.detach().clone()


@contextmanager
def whole(*models):
    """Hold every weight of the ZeRO-3 `models` whole until the block ends (sampling, no-gradient scoring,
    saving): each is gathered once (a collective), and the engine's per-layer hooks, which would gather a layer
    before its forward and split it again after, are off for the block; forward passes inside then need no
    collective, so processes may run different numbers of them. On exit the hooks are back and each process
    keeps its own share again. Models without a ZeRO-3 engine are left as they are.

    Gradients must not flow inside: the block is for inference and for reading the weights."""
    offloads = [_SPLIT[m] for m in models if m is not None and m in _SPLIT]
    if not offloads:
        yield
        return
    from deepspeed.runtime.zero import parameter_offload

    params = [p for offload in offloads for p in offload.module.parameters()]
    with gathered_params(params):
        for offload in offloads:
            offload._remove_module_hooks()
            offload.forward_hooks, offload.backward_hooks = [], []
        for p in params:
            p.ds_active_sub_modules.clear()
        try:
            yield
        finally:
            stack = parameter_offload.FWD_MODULE_STACK  # the engines' modules are in it since they were built
            depth = len(stack)
            for offload in offloads:
                offload.setup_zero_stage3_hooks()
            del stack[depth:]


def engine_for(model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float, role: str,
               note) -> Engine | None:
    """An Engine around `model` and `optimizer` under a DeepSpeed launch; None otherwise (rto then averages,
    clips and steps itself)."""
    if not zero_stage():
        return None
    from rto.models import is_peft_model

    if zero_stage() == 3 and is_peft_model(model):
        raise ConfigError("--lora true and DeepSpeed ZeRO-3 do not combine yet: launch LoRA runs with "
                          "configs/accelerate/zero2-*.yaml or ddp-*.yaml (the adapters are small; every process "
                          "holds the base)")
    return Engine(model, optimizer, max_grad_norm, role, note)
