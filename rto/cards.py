"""Model cards: the README.md of every model folder rto saves, in the Hugging Face hub's format (YAML front
matter with library_name, base_model and tags, then text).

A card is built from what the folder and its run folder already hold: the model's training record
(rto_model.json), the run's config.yaml (when the model lies in an rto run folder) and, once the stage has
finished, its summary (runtime.Run.finish writes the cards again with it). Nothing in a card is read back by rto.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import yaml

CARD_FILE = "README.md"
# embedded models -> the hub id of the weights they were made from (for base_model in the front matter)
HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
STAGES = {  # first word of the stage -> what it trains
    "sft": "supervised fine-tuning on the chosen responses of preference pairs",
    "rm": "a Bradley-Terry reward model (causal-LM backbone with a scalar head on every token)",
    "dpo": "offline preference optimisation (the DPO family) against a frozen reference",
    "ppo": "PPO with token-level rewards (RTO's dense DPO reward, or classic PPO's sparse reward-model score)",
}
# fields of the run config that say how the run went, not what it trained (runtime.RUNTIME_FIELDS and output)
NOT_HYPERPARAMETERS = {"out", "progress", "threads", "resume", "overwrite", "checkpoint_every", "keep_checkpoints",
                       "report_to"}
OBJECTIVE_KEYS = ("loss", "beta", "alpha", "gamma", "reward", "sources", "beta_dpo", "dpo_clip", "beta_kl", "beta_rm",
                  "estimator", "granularity", "group_size", "pooling")


def _base_model(config: dict, role: str) -> str | None:
    """The model the role started from: `critic` (or the reward model) for a critic, `policy` for a policy,
    else `model`."""
    if role == "critic":
        return config.get("critic") or config.get("reward_model")
    return config.get("policy") if role == "policy" else config.get("model")


def _hub_id(name: str | None) -> str | None:
    """`name` as a hub id ("owner/name") for the front matter: an embedded model's source, or a name that is no
    local path; None otherwise (a local folder is named in the text only)."""
    if not name:
        return None
    if name in HUB_IDS:
        return HUB_IDS[name]
    parts = name.split("/")
    return name if len(parts) == 2 and all(parts) and not Path(name).exists() and ".." not in name else None


def _data(config: dict) -> str | None:
    for key in ("pairs", "data", "prompts"):
        if config.get(key):
            return f"`{config[key]}`"
    return f"the embedded task `{config['task']}`" if config.get("task") else None


def _table(rows: dict, head: tuple[str, str]) -> list[str]:
    cell = lambda v: json.dumps(v) if isinstance(v, (dict, list, tuple)) else str(v)  # noqa: E731
    return [f"| {head[0]} | {head[1]} |", "|---|---|",
            *(f"| {k} | {cell(v).replace('|', '/')} |" for k, v in rows.items())]


def model_card(meta: dict, config: dict | None = None, metrics: dict | None = None, stage: str | None = None,
               role: str = "model") -> str:
    """The card text: front matter (library_name transformers, base_model when it is a hub id, tags rto, rlhf,
    the stage and its loss or reward), then base model, stage, objective, data, headline metrics, hyperparameters
    (the run config without runtime fields) and the training record `meta`, each when known."""
    config, metrics = config or {}, metrics or {}
    stage = stage or meta.get("stage")
    kind = (stage or "").split()[0] if stage else None
    value_model = kind == "rm" or role == "critic"
    adapter = meta.get("adapter") == "lora"  # a peft adapter folder (rto.lora): its base is not in the folder
    base = meta.get("base_model") if adapter else _base_model(config, role)
    tags = ["rto", "rlhf", *([kind] if kind else []), *(["reward-model"] if value_model else []),
            *([str(meta["loss"])] if meta.get("loss") and meta.get("loss") != kind else []),
            *([f"reward-{meta['reward']}"] if meta.get("reward") else [])]
    tags += ["lora"] if adapter else []
    front = {"library_name": "peft" if adapter else "transformers", **({"base_model": _hub_id(base)} if _hub_id(base) else {}), "tags": tags}
    title = f"{role} of `rto {stage}`" if stage else "a model saved by rto"
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {title}", ""]
    what = STAGES.get(kind or "", "a causal language model saved by rto")
    lines += [f"Trained with rto (Reinforced Token Optimization for RLHF, \"DPO Meets PPO\"): {what}.", ""]
    facts = {"Base model": f"`{base}`" if base else None, "Stage": f"`rto {stage}`" if stage else None,
             "Objective": ", ".join(f"{k} {meta[k]}" for k in OBJECTIVE_KEYS if meta.get(k) is not None) or None,
             "Data": _data(config) or (f"`{meta['trained_on']}`" if meta.get("trained_on") else None)}
    lines += [f"- **{k}:** {v}" for k, v in facts.items() if v] + [""]
    if metrics:
        lines += ["## Results", "", "The stage's summary (summary.json of its run folder).", "",
                  *_table(metrics, ("metric", "value")), ""]
    hyper = {k: v for k, v in config.items() if k not in NOT_HYPERPARAMETERS}
    if hyper:
        lines += ["## Hyperparameters", "", "The run's config (config.yaml of its run folder).", "",
                  *_table(hyper, ("field", "value")), ""]
    if meta:
        lines += ["## Training record", "", "rto_model.json beside the weights.", "", *_table(meta, ("key", "value")), ""]
    load = ("from rto.models import ValueModel\nmodel = ValueModel.from_pretrained(folder)  # the scalar head is in "
            "value_head.safetensors" if value_model else
            "from peft import AutoPeftModelForCausalLM  # the base model named in adapter_config.json, then this "
            "adapter\nmodel = AutoPeftModelForCausalLM.from_pretrained(folder)\n# or, in rto: rto eval --models "
            "label=folder (the adapter merged into its base)" if adapter else
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "model = AutoModelForCausalLM.from_pretrained(folder)\ntokenizer = AutoTokenizer.from_pretrained(folder)")
    lines += ["## Use", "", "```python", load, "```", ""]
    return "\n".join(lines)


def run_config(folder: str | Path) -> dict | None:
    """The config.yaml of the rto run folder that holds the model folder `folder`, or None (not in a run folder,
    or unreadable)."""
    run_dir = Path(folder).parent
    if not (run_dir / ".rto-run").is_file() or not (run_dir / "config.yaml").is_file():
        return None
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
    except yaml.YAMLError:
        return None
    return config if isinstance(config, dict) else None


def write_card(folder: str | Path, stage: str | None = None, metrics: dict | None = None,
               role: str | None = None) -> Path:
    """Write `folder`/README.md (model_card) from the folder's rto_model.json and its run folder's config.yaml;
    `role` defaults to the folder's name (model, policy, critic). The file is replaced, never written through a
    symbolic link."""
    folder = Path(folder)
    meta_file = folder / "rto_model.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    role = role or folder.name
    role = role if role in ("policy", "critic") else "model"
    text = model_card(meta, run_config(folder), metrics, stage, role)
    fd, tmp = tempfile.mkstemp(prefix=".card-", dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, folder / CARD_FILE)
    return folder / CARD_FILE
