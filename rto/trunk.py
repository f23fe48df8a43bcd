"""The shared trunk: with `train_layers=k` every role (policy, reference, DPO model, reward model, critic)
keeps the same frozen embeddings and bottom layers, so their hidden states are computed once per batch
(`trunk_hidden`) and each role runs only its own top layers on them (`role_hidden`).

Sharing is proven per run, not assumed (`checked_trunk_layers`): the roles' frozen parameters must be equal,
their configs the same, and a probe batch through the shared path must give the hidden states of a plain
forward; otherwise each role runs its full stack. The views of a decoder that run part of its layers carry a
config cut to those layers, so per-layer settings (sliding or full attention, local or global RoPE) follow
each layer.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from torch import nn

from rto.models import causal_lm_of, decoder_of


def frozen_layers(model: nn.Module, train_layers: int | None) -> int:
    """How many bottom decoder layers are frozen (0 when everything trains)."""
    n = len(decoder_of(model).layers)
    return 0 if train_layers is None or train_layers >= n else n - train_layers


# Config lists with one entry per decoder layer that a decoder's forward reads by the index of the layer in
# its loop (transformers 5): sliding or full attention (Qwen2/3, Gemma2, Gemma3, whose RoPE is also chosen by it:
# local or global), per-layer RoPE bases, block kinds of hybrid models.
PER_LAYER_FIELDS = ("layer_types", "layer_rope_theta", "layers_block_type")


def _layers_config(config, start: int, stop: int):
    """A shallow copy of `config` for a decoder that runs only layers[start:stop]: `num_hidden_layers` and every
    per-layer list (PER_LAYER_FIELDS) are cut to those layers, so the i-th layer run gets the settings of layer
    start + i. Attributes are set in the instance dict, past the config's validation of partial updates."""
    n = config.num_hidden_layers
    view = copy.copy(config)
    fields = vars(view)
    for name in PER_LAYER_FIELDS:
        value = fields.get(name)
        if isinstance(value, (list, tuple)) and len(value) == n:
            fields[name] = value[start:stop]
    if "num_hidden_layers" in fields:
        fields["num_hidden_layers"] = len(range(n)[start:stop])
    return view


def _view(decoder: nn.Module, start: int, stop: int | None, norm: nn.Module) -> nn.Module:
    """A shallow copy of a decoder that runs only layers[start:stop] then `norm`, sharing all weights; its
    config is cut to those layers (see _layers_config)."""
    view = object.__new__(type(decoder))
    view.__dict__.update(decoder.__dict__)
    view.__dict__["config"] = _layers_config(decoder.config, start, len(decoder.layers) if stop is None else stop)
    view._modules = dict(decoder._modules)
    view._modules["layers"] = nn.ModuleList(decoder.layers[start:stop])
    view._modules["norm"] = norm
    return view


def shares_trunk(models: list[nn.Module], n_frozen: int) -> bool:
    """True when every model has bitwise-identical embeddings and bottom `n_frozen` layers."""
    if n_frozen == 0 or len(models) < 2:
        return n_frozen > 0
    ref = decoder_of(models[0])
    ref_params = [*ref.embed_tokens.parameters(), *ref.layers[:n_frozen].parameters()]
    for m in models[1:]:
        d = decoder_of(m)
        params = [*d.embed_tokens.parameters(), *d.layers[:n_frozen].parameters()]
        if len(params) != len(ref_params) or any(not torch.equal(a, b) for a, b in zip(ref_params, params)):
            return False
    return True


def bottom_view(decoder: nn.Module, n_frozen: int) -> nn.Module:
    """The decoder's embeddings and bottom `n_frozen` layers, no final norm (a view sharing its weights)."""
    return _view(decoder, 0, n_frozen, nn.Identity())


def _trunk_modules(decoder: nn.Module, n_frozen: int) -> list[nn.Module]:
    return [*decoder.embed_tokens.modules(), *nn.ModuleList(decoder.layers[:n_frozen]).modules()]


@torch.no_grad()
def share_trunk_weights(models: list[nn.Module], n_frozen: int) -> int:
    """Point every model's frozen embeddings and bottom `n_frozen` layers at the first model's tensors, so the
    trunk is held once instead of once per role (an output layer tied to the embeddings follows them). Only for
    trunks `shares_trunk` proved bitwise equal; when a tensor of any trunk requires gradients (models loaded
    for inference only, say), nothing is shared. Returns the bytes no longer held twice."""
    trunks = [_trunk_modules(decoder_of(m), n_frozen) for m in models]
    if any(p.requires_grad for modules in trunks for module in modules for p in module.parameters(recurse=False)):
        return 0
    first = trunks[0]
    freed = 0
    for model in models[1:]:
        lm = causal_lm_of(model)
        head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
        mine = _trunk_modules(decoder_of(model), n_frozen)
        if len(mine) != len(first):
            raise ValueError("share_trunk_weights: the models' trunks are built differently")
        for module, source in zip(mine, first):
            for name, p in list(module._parameters.items()):
                q = source._parameters.get(name)
                if p is None or p is q:
                    continue
                if q is None or p.shape != q.shape:
                    raise ValueError(f"share_trunk_weights: {name} of a trunk layer differs between models")
                if head is not None and head.weight is p:
                    head.weight = q
                module._parameters[name] = q
                freed += p.numel() * p.element_size()
    return freed


@torch.no_grad()
def trunk_hidden(model: nn.Module, n_frozen: int, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """Hidden states after the frozen embeddings and bottom `n_frozen` layers (shared by all roles)."""
    bottom = bottom_view(decoder_of(model), n_frozen)
    return bottom(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state


def role_hidden(model: nn.Module, batch, trunk: torch.Tensor | None = None, n_frozen: int = 0) -> torch.Tensor:
    """Final hidden states [B, L, H] of one role: its top layers on a shared trunk, or the full stack."""
    decoder = decoder_of(model)
    kwargs = dict(attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False)
    if trunk is None:
        return decoder(input_ids=batch.input_ids, **kwargs).last_hidden_state
    top = _view(decoder, n_frozen, None, decoder.norm)
    return top(inputs_embeds=trunk, **kwargs).last_hidden_state


# Config fields that name, store or describe a model, or steer its outputs and decoding, but never change what its
# bottom layers compute (special token ids are skipped too).
UNSHAPING_CONFIG_FIELDS = frozenset({
    "_name_or_path", "name_or_path", "_commit_hash", "transformers_version", "architectures", "dtype", "torch_dtype",
    "id2label", "label2id", "problem_type", "use_cache", "return_dict", "output_hidden_states", "output_attentions",
    "tie_word_embeddings", "initializer_range",
})
TRUNK_TOLERANCE = 1e-4  # largest |difference| of fp32 hidden states, relative to their largest |value| (at least 1)


def _architecture(model: nn.Module) -> str:
    """The class name of the causal LM of a role (the backbone of a ValueModel, the base of a peft model)."""
    return type(causal_lm_of(model)).__name__


def _shaping_config(model: nn.Module) -> dict:
    """The model's `config.to_dict()` without UNSHAPING_CONFIG_FIELDS and special token ids."""
    return {k: v for k, v in model.config.to_dict().items()
            if k not in UNSHAPING_CONFIG_FIELDS and not k.endswith(("_token_id", "_token_ids"))}


def config_difference(models: list[nn.Module]) -> str | None:
    """The first config field in which a model differs from models[0], as "field (a vs b)"; None when all agree."""
    ref = _shaping_config(models[0])
    for m in models[1:]:
        other = _shaping_config(m)
        for key in sorted(set(ref) | set(other)):
            if ref.get(key) != other.get(key):
                return f"{key} ({ref.get(key)!r} vs {other.get(key)!r})"
    return None


@contextmanager
def _eval_mode(models: list[nn.Module]):
    """Every module of `models` in eval mode (no dropout) for the block; each one's mode comes back afterwards."""
    modes = [(module, module.training) for m in models for module in m.modules()]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for module, training in modes:
            module.training = training


@torch.no_grad()
def trunk_mismatch(models: list[nn.Module], n_frozen: int, probe) -> float:
    """Largest |difference| between a role's final hidden states from its top layers on the trunk of models[0]
    and from its own full stack, on the real tokens of `probe` (a SeqBatch), in fp32 without dropout, relative to
    the largest |hidden state| (at least 1). One role per decoder class is run: with equal configs and frozen
    weights, roles of one class compute their views alike."""
    device = next(models[0].parameters()).device
    probe = probe.to(device)
    real = probe.attention_mask.bool()
    checked = list({type(decoder_of(m)): m for m in reversed(models)}.values())  # the first role of each class
    worst = 0.0
    with _eval_mode(checked), torch.autocast(device.type, enabled=False):
        trunk = trunk_hidden(models[0], n_frozen, probe.input_ids, probe.attention_mask, probe.position_ids)
        for m in checked:
            full = role_hidden(m, probe)[real].float()
            shared = role_hidden(m, probe, trunk, n_frozen)[real].float()
            scale = max(1.0, float(full.abs().max()))
            worst = max(worst, float((shared - full).abs().max()) / scale)
    return worst


def checked_trunk_layers(models: list[nn.Module], train_layers: int | None, probe, note) -> int:
    """How many frozen bottom layers the roles `models` can share for this run (their trunk is then computed once
    per batch, see trunk_hidden / role_hidden), or 0, where each role runs its full stack (always correct).

    0 when nothing is frozen (train_layers None or >= the layer count), and, with `note(reason)` called with a
    one-line reason, when the roles differ in their frozen parameters (shares_trunk), when their configs differ
    in a field that can shape those layers (every field of `config.to_dict()` but names, paths, dtype, token ids
    and output switches: see UNSHAPING_CONFIG_FIELDS), or when running `probe` (a SeqBatch of a few real rows, see
    rto.sequences.probe_batch) through the shared trunk and each role's top layers does not give the role's own
    full forward within TRUNK_TOLERANCE: an architecture whose decoder the layer views do not reproduce.
    """
    n = frozen_layers(models[0], train_layers)
    if n == 0:
        return 0
    arch = _architecture(models[0])
    refusal = "trunk sharing off ({}): {}; each role runs its full stack"
    if not shares_trunk(models, n):
        note(refusal.format(arch, f"the roles differ in their embeddings or bottom {n} layers"))
        return 0
    differ = config_difference(models)
    if differ is not None:
        note(refusal.format(arch, f"the roles' configs differ in {differ}"))
        return 0
    err = trunk_mismatch(models, n, probe)
    if err > TRUNK_TOLERANCE:
        note(refusal.format(arch, f"its top {len(decoder_of(models[0]).layers) - n} layers on the shared "
                                  f"{n}-layer trunk differ from its own forward by up to {err:.2g} (relative) in "
                                  "the final hidden states"))
        return 0
    return n
