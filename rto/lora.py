"""LoRA mode: one copy of the large weights serves the policy, the reference and the DPO model.

With `--lora true` a stage trains a LoRA adapter (peft) on a frozen base instead of the model's weights: each targeted
linear layer computes W x + (lora_alpha / lora_r) * B A x, with A [r x in] random and B [out x r] zero at the start,
so a fresh adapter leaves the model exactly the base. RTO's three language-model roles then share one base object:

    policy      the base with its own adapter ("default", the one trained)
    reference   the base with every adapter off (base_view)
    DPO model   the base with the adapter `rto dpo --lora true` trained, loaded as a second adapter ("dpo",
                adapter_view) when it was trained on the same base weights (rto records their fingerprint)

The reward model and the critic stay separate models. With train_layers=k only the top k decoder layers get adapters
(peft's `layers_to_transform`), so the bottom layers are the base's own modules in every role and the shared trunk
(rto.trunk) still computes them once per batch.

A view is a shallow copy of the base's module tree in which each adapter layer is replaced by what that role runs (the
layer's base layer, or a copy of the adapter layer that knows one adapter only); every other module is the base's own
object. A view holds no weights of its own, its forward is the base model's own forward, and there is no adapter
state to switch between roles. peft is imported only where an adapter is made or read, so runs without --lora never
import it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from rto.config import RULES, _int_at_least, _positive, _within
from rto.models import (ModelLoadError, causal_lm_of, decoder_of, load_causal_lm, read_meta, resolve_model,
                        weights_fingerprint)

POLICY_ADAPTER = "default"  # peft's name for a model's first adapter; save_pretrained writes it at the folder's root
DPO_ADAPTER = "dpo"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class LoraOptions:
    """LoRA and memory options of the stages that train a causal LM (dpo, ppo)."""

    lora: bool = False
    """Train a LoRA adapter on the frozen model instead of its weights (saved as a peft adapter folder), on the top
    train_layers decoder layers; the reference is that base with adapters off and, in ppo, a DPO adapter of the same
    base is loaded onto it, so the large weights are held once."""
    lora_r: int = 16
    """Rank r of the adapter matrices B [out x r] and A [r x in] (a count of dimensions); >= 1."""
    lora_alpha: float = 32.0
    """Scale of the adapter: it adds (lora_alpha / lora_r) * B A x to each targeted layer's output (a plain
    number); > 0."""
    lora_dropout: float = 0.0
    """Dropout probability on the adapter's input, in [0, 1) (recorded in adapter_config.json); rto trains with its
    models in eval mode, where dropout is off, so it has no effect inside rto's stages."""
    lora_targets: str = "all-linear"
    """Which linear layers get adapters: "all-linear" (every linear layer of the decoder layers, not the LM head) or
    module names separated by commas, e.g. "q_proj,v_proj"."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations during the backward pass instead of keeping them
    (torch.utils.checkpoint) in the models a stage trains: less memory for about one more forward pass of the
    trained layers per update."""


# rto.config checks every field by its name whatever the stage: the LoRA fields join its rules here
RULES.update({"lora_r": _int_at_least(1), "lora_alpha": _positive(), "lora_dropout": _within(0, 1, high_open=True)})


def same_model(a: str, b: str) -> bool:
    """Whether two role arguments name the same model: the same string, or the same local folder."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.is_dir() and pb.is_dir() and pa.resolve() == pb.resolve()


def adapter_layers(n_layers: int, train_layers: int | None) -> list[int] | None:
    """The decoder layers that get adapters: the top `train_layers` of `n_layers` (None = all layers)."""
    if train_layers is None or train_layers >= n_layers:
        return None
    return list(range(n_layers - train_layers, n_layers))


def target_modules(model: nn.Module, targets: str, layers: list[int] | None) -> str | list[str]:
    """peft's target_modules for `targets`: module names split at commas, or "all-linear", which stays peft's keyword
    when every layer gets adapters and otherwise (peft then takes only names) becomes the names of the nn.Linear
    modules inside the decoder layers `layers`."""
    if targets.strip() != "all-linear":
        return [name.strip() for name in targets.split(",")]
    if layers is None:
        return "all-linear"
    stack = decoder_of(model).layers
    return sorted({name.rsplit(".", 1)[-1] for i in layers for name, m in stack[i].named_modules()
                   if isinstance(m, nn.Linear)})


def lora_config(model: nn.Module, opts: LoraOptions, train_layers: int | None):
    """The peft LoraConfig of a new adapter on `model`: rank, scale, dropout and targets from `opts`, on the top
    `train_layers` decoder layers (all when None)."""
    from peft import LoraConfig

    layers = adapter_layers(len(decoder_of(model).layers), train_layers)
    return LoraConfig(task_type="CAUSAL_LM", r=opts.lora_r, lora_alpha=opts.lora_alpha, lora_dropout=opts.lora_dropout,
                      target_modules=target_modules(model, opts.lora_targets, layers), layers_to_transform=layers)


def attach_adapter(model: nn.Module, opts: LoraOptions, train_layers: int | None):
    """A new trainable adapter ("default") on the causal LM `model`, which peft changes in place (adapter layers
    wrap its targeted linear layers) and freezes: returns the peft model, whose only trainable parameters are the
    adapter's. B starts at 0, so the result computes exactly what `model` did."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(model, opts, train_layers), adapter_name=POLICY_ADAPTER)


def is_adapter_folder(path: str | Path) -> bool:
    """Whether `path` is a folder holding a peft adapter (adapter_config.json) rather than a whole model."""
    return (Path(path).expanduser() / ADAPTER_CONFIG).is_file()


def _check_adapter_weights(folder: Path, role: str, name: str) -> None:
    """An adapter folder must hold safetensors weights (pickle ones are never read)."""
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise ModelLoadError(role, name, f"the adapter folder has no {ADAPTER_WEIGHTS}",
                             "save the adapter with peft's save_pretrained(folder) (safetensors, the default)",
                             "no_weights")


def load_second_adapter(model, folder: str, name: str = DPO_ADAPTER, role: str = "DPO model") -> None:
    """Load the adapter saved in `folder` onto the peft `model` as adapter `name`, frozen; the trained adapter stays
    the active one (use adapter_view(model, name) to run the new one)."""
    _check_adapter_weights(Path(folder).expanduser(), role, folder)
    model.load_adapter(folder, adapter_name=name, is_trainable=False)


def adapter_record(base: str, base_fingerprint: str) -> dict:
    """What rto_model.json says of an adapter folder: that it is a LoRA adapter, the base model it was trained on
    (as given on the command line) and the fingerprint of that base's weights (rto.models.weights_fingerprint)."""
    return {"adapter": "lora", "base_model": base, "base_fingerprint": base_fingerprint}


def adapter_base(folder: str) -> str:
    """The base model of an adapter folder: rto's record (`base_model`), else peft's `base_model_name_or_path`."""
    base = read_meta(folder).get("base_model")
    if base is None:
        base = json.loads((Path(folder).expanduser() / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    return base


def load_merged(name: str, trust_remote_code: bool = False, role: str = "model"):
    """An adapter folder as one causal LM: its base, loaded as any role is (load_causal_lm), with the adapter merged
    into the weights, W + (lora_alpha / r) * B A: the same model as base-plus-adapter, up to fp32 rounding of the
    sums. Raises ModelLoadError for a folder without safetensors adapter weights, without a known base, or whose base
    now has other weights than those the adapter was trained on (when rto recorded their fingerprint)."""
    from peft import PeftModel

    folder = Path(resolve_model(name, role)).expanduser()
    _check_adapter_weights(folder, role, name)
    base_name = adapter_base(str(folder))
    if not base_name:
        raise ModelLoadError(role, name, "the adapter folder does not say which base model it was trained on",
                             "add base_model_name_or_path to its adapter_config.json", "config")
    base = load_causal_lm(base_name, trust_remote_code, role=f"{role} (base of the adapter)")
    recorded = read_meta(str(folder)).get("base_fingerprint")
    if recorded is not None and recorded != weights_fingerprint(base):
        raise ModelLoadError(role, name, f"its base {base_name!r} now has other weights than the adapter was trained "
                             "on", "pass the base model it was trained on (as recorded in its rto_model.json)", "load")
    return PeftModel.from_pretrained(base, str(folder), is_trainable=False).merge_and_unload()


def _copy(module: nn.Module, children: dict) -> nn.Module:
    """A shallow copy of `module` with its own child modules `children`; parameters, buffers and settings shared."""
    view = object.__new__(type(module))
    view.__dict__.update(module.__dict__)
    view.__dict__["_modules"] = children
    return view


def _swapped(module: nn.Module, swap) -> nn.Module:
    """`module` with each submodule m for which swap(m) is not None replaced by swap(m): the modules above a
    replaced one are shallow copies (_copy), every other module is the original object."""
    new = swap(module)
    if new is not None:
        return new
    children = {name: None if child is None else _swapped(child, swap) for name, child in module._modules.items()}
    if all(children[name] is child for name, child in module._modules.items()):
        return module
    return _copy(module, children)


def _adapter_layers(module: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


def base_view(model: nn.Module) -> nn.Module:
    """The reference of a LoRA run: the base of the peft `model` with every adapter off, as a view (each adapter
    layer replaced by the base layer it wraps). Same class, module names and weights (the same tensors) as the base
    before the adapters were attached, so its forward and its weights_fingerprint are the base's own."""
    return _swapped(causal_lm_of(model), lambda m: m.get_base_layer() if _adapter_layers(m) else None)


def _one_adapter(layer: nn.Module, name: str) -> nn.Module:
    """A copy of an adapter layer that runs adapter `name` only (and holds no other adapter's weights); the base
    layer itself where `name` has no weights on this layer."""
    if name not in layer.lora_A:
        return layer.get_base_layer()
    children = dict(layer._modules)
    for attr in (*layer.adapter_layer_names, *layer.other_param_names):
        per_adapter = children.get(attr)
        if isinstance(per_adapter, (nn.ModuleDict, nn.ParameterDict)):
            kept = {name: per_adapter[name]} if name in per_adapter else {}
            children[attr] = type(per_adapter)(kept)
    view = _copy(layer, children)
    view.__dict__["_active_adapter"] = [name]
    view.__dict__["_disable_adapters"] = False
    return view


def adapter_view(model: nn.Module, name: str) -> nn.Module:
    """The base of the peft `model` running adapter `name` only (e.g. the DPO model of a LoRA run), as a view: its
    parameters are the base's and that adapter's, the same tensors as in `model`."""
    lm = causal_lm_of(model)
    names = {adapter for m in lm.modules() if _adapter_layers(m) for adapter in m.lora_A}
    if name not in names:
        raise KeyError(f"the model has no adapter {name!r} (it has {', '.join(sorted(names)) or 'none'})")
    return _swapped(lm, lambda m: _one_adapter(m, name) if _adapter_layers(m) else None)


def one_base_roles(policy: str, ref: str | None, dpo_model: str | None, dpo_record: dict, opts: LoraOptions,
                   train_layers: int | None, load, note) -> tuple[dict, dict]:
    """The policy, reference and DPO model of a LoRA run on one base: {"policy": the peft model (base + a new
    adapter), "ref": base_view, "dpo": adapter_view of the DPO adapter, or a separately loaded frozen model, or None}
    and the policy's adapter_record.

    `load(path, role)` loads a causal LM onto the run's device. The reference can only be the policy's base: a `ref`
    naming another model is refused (ValueError). `dpo_model` (with its rto_model.json record `dpo_record`) becomes a
    second adapter on the same base when it is an adapter trained on weights with the policy's fingerprint; anything
    else (a whole model, an adapter of another base) loads as its own model, with the reason passed to `note`."""
    if ref is not None and not same_model(ref, policy):
        raise ValueError(f"--lora true: the reference is the policy's base with its adapter off, so --ref must be null "
                         f"or the same as --policy ({policy!r}), got {ref!r}")
    base = load(policy, "policy")
    fingerprint = weights_fingerprint(base)
    model = attach_adapter(base, opts, train_layers)
    if opts.lora_dropout:
        note(f"lora: lora_dropout {opts.lora_dropout:g} is recorded but inactive: rto trains in eval mode")
    dpo = None
    if dpo_model is not None:
        if dpo_record.get("adapter") == "lora" and dpo_record.get("base_fingerprint") == fingerprint:
            load_second_adapter(model, dpo_model)
            dpo = adapter_view(model, DPO_ADAPTER)
        else:
            kind = "an adapter of other base weights" if dpo_record.get("adapter") else "a whole model"
            note(f"lora: the DPO model {dpo_model} is {kind}, so it loads as a model of its own")
            dpo = load(dpo_model, "DPO model").eval().requires_grad_(False)
    return {"policy": model, "ref": base_view(model), "dpo": dpo}, adapter_record(policy, fingerprint)


class _Checkpointed:
    """Mixed into the class of a decoder layer by enable_gradient_checkpointing: while gradients are on, the layer's
    forward runs under torch.utils.checkpoint (non-reentrant), so its activations are recomputed in the backward pass
    instead of kept; without gradients (generation, scoring) it runs as before."""

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return super().forward(*args, **kwargs)
        return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)


_CHECKPOINTED: dict[type, type] = {}


def recomputes_layers(model: nn.Module) -> bool:
    """Whether a forward of `model` with gradients on recomputes its decoder layers in the backward pass: rto's
    gradient checkpointing (enable_gradient_checkpointing) or transformers' own (on layers in train mode)."""
    return any(isinstance(layer, _Checkpointed) or (getattr(layer, "gradient_checkpointing", False) and layer.training)
               for layer in decoder_of(model).layers)


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Checkpoint every decoder layer of `model` (a causal LM, a peft model or a ValueModel) whenever gradients are on;
    returns the number of layers. transformers' own switch (gradient_checkpointing_enable) acts only on layers in
    train mode, and rto trains its models in eval mode (dropout off), hence this: each layer's class becomes a
    subclass whose forward is checkpointed (_Checkpointed); weights, names and results are unchanged."""
    layers = decoder_of(model).layers
    for layer in layers:
        cls = type(layer)
        if issubclass(cls, _Checkpointed):
            continue
        if cls not in _CHECKPOINTED:
            _CHECKPOINTED[cls] = type(f"Checkpointed{cls.__name__}", (_Checkpointed, cls), {"__module__": __name__})
        layer.__class__ = _CHECKPOINTED[cls]
    return len(layers)
