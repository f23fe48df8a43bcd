"""DeepSpeed ZeRO stages 1 and 2 for the models a stage trains (`accelerate launch` with a DeepSpeed config).

Under ZeRO every process still holds the whole weights, as under plain data parallelism, and the optimizer's
part is split over the W processes: stage 1 splits AdamW's two moments and its fp32 copy of the weights, stage 2
the averaged gradients too, and `offload_optimizer_device: cpu` keeps the split states in CPU memory
(ZeRO-Offload). A process then holds 1/W of 12 bytes per trained weight (stage 1) or 16 (stage 2) besides the
weights themselves.

What the engine takes over and what stays rto's:
- rto builds each trained model, its AdamW and its learning-rate schedule as without DeepSpeed; `Engine` hands
  model and AdamW to deepspeed.initialize (the schedule keeps setting the learning rate of the same groups);
- each process backpropagates its own losses, weighted by the share rule of rto.distributed (W * units / total),
  through the engine, and every process as often as the others: stage 2 reduces gradients inside each backward;
- the engine's step averages the gradients over the processes (stage 1), clips them to `max_grad_norm` (the
  L2 norm of the averaged gradient, as torch's clip_grad_norm_) and skips the update when that norm is NaN/inf;
  a NaN/inf loss anywhere is turned into NaN gradients in every engine (`poison`), so every process skips;
- checkpoints hold the whole weights, as always, and every process's share of the optimizer states (gathered
  into trainer.pt, read back with weights_only=True); a resume needs the same stage and number of processes.

Stage 3 (weights split too) is refused: rto's FSDP2 path (rto.distributed) splits the trained layers that way.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from rto.config import ConfigError

STAGES = (1, 2)
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
        raise ConfigError(f"the accelerate config's zero_stage is {value!r}; rto runs ZeRO stage 1 or 2") from None


def offload_device(environ=None) -> str:
    """Where ZeRO keeps the optimizer states: "none" (with the model) or "cpu" (ZeRO-Offload)."""
    environ = os.environ if environ is None else environ
    return environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none").lower()


def check_deepspeed(environ) -> None:
    """Refuse, in one line each, the DeepSpeed settings rto does not carry out: ZeRO stages other than 1 and 2,
    a DeepSpeed config file of the user's own (rto writes the engine's config from its own fields), parameter
    offloading, offloading to NVMe, accelerate's gradient accumulation and clipping (rto's are
    --micro_batch_size and --max_grad_norm); and a missing deepspeed package."""
    from rto.distributed import env_flag

    stage = zero_stage(environ)
    if stage == 3:
        raise ConfigError("this launch asks for DeepSpeed ZeRO stage 3, which rto does not run: to split the trained "
                          "weights too, launch with configs/accelerate/fsdp-*.yaml (FSDP2 with "
                          "fsdp_reshard_after_forward: true splits them as ZeRO-3 does), or set zero_stage: 2")
    if stage not in STAGES:
        raise ConfigError(f"this launch asks for DeepSpeed ZeRO stage {stage}; rto runs stage 1 or 2 "
                          "(configs/accelerate/zero2-*.yaml), or plain data parallelism with configs/accelerate/ddp-*.yaml")
    if environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        raise ConfigError("the accelerate config names a deepspeed_config_file; rto writes DeepSpeed's config itself "
                          "from zero_stage, offload_optimizer_device and its own fields (--max_grad_norm, "
                          "--micro_batch_size, --precision): remove deepspeed_config_file and set those two keys")
    if offload_device(environ) not in ("none", "cpu"):
        raise ConfigError(f"offload_optimizer_device: {offload_device(environ)} is not supported; use none or cpu")
    if environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none").lower() != "none":
        raise ConfigError("offload_param_device is a ZeRO-3 setting, and rto runs stages 1 and 2: set it to none")
    if environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1") not in ("1", "none", "None"):
        raise ConfigError("the accelerate config sets gradient_accumulation_steps; rto takes each batch in passes "
                          "of --micro_batch_size items instead: remove it (or set it to 1)")
    if environ.get("ACCELERATE_GRADIENT_CLIPPING", "none").lower() not in ("none", ""):
        raise ConfigError("the accelerate config sets gradient_clipping; rto clips to its --max_grad_norm: remove it")
    if env_flag(environ, "ACCELERATE_DEEPSPEED_ZERO3_INIT"):
        raise ConfigError("zero3_init_flag is a ZeRO-3 setting, and rto runs stages 1 and 2: set it to false")
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
    """A trained model and its AdamW inside a DeepSpeed ZeRO engine (stage 1 or 2; module docstring).

    backward(loss) adds a loss's gradients (in every process, as often as every other process), step() ends the
    batch: averages, clips and updates, and returns the gradient norm before clipping (inf or NaN when the update
    was skipped). As an entry of a checkpoint's `stateful`, state_dict() gathers every process's optimizer share
    on process 0 (a collective) and load_state_dict() puts this process's share back."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float,
                 role: str, note):
        import deepspeed
        import deepspeed.ops

        from rto.distributed import world

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
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=engine_config(max_grad_norm), dist_init_required=False)
        self.base = optimizer  # rto's AdamW, now stepping this process's flat share of the weights
        stage, offload, w = zero_stage(), offload_device(), world()[1]
        note(f"deepspeed: the {role}'s AdamW states{' and gradients' if stage == 2 else ''} split over {w} "
             f"process{'es' if w > 1 else ''} (ZeRO-{stage}{', states in CPU memory' if offload == 'cpu' else ''})")

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def poison(self) -> None:
        """Make this batch's gradient NaN, so that step() skips the update (every process must call it)."""
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
        """Every process's share of the optimizer states, on process 0 (which writes checkpoints; a collective)."""
        from rto.distributed import full_state, gather_to_main

        return {"shares": gather_to_main(full_state(self.base.state_dict()))}

    def load_state_dict(self, state: dict) -> None:
        from rto.distributed import world

        rank, w = world()
        if len(state["shares"]) != w:
            raise ValueError(f"the checkpoint holds {len(state['shares'])} optimizer shares for {w} processes")
        self.base.load_state_dict(state["shares"][rank])
        self.optimizer.refresh_fp32_params()  # the fp32 copy of this share, from the weights just loaded


def engine_for(model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float, role: str,
               note) -> Engine | None:
    """An Engine around `model` and `optimizer` under a DeepSpeed launch; None otherwise (rto then averages,
    clips and steps itself)."""
    return Engine(model, optimizer, max_grad_norm, role, note) if zero_stage() else None
