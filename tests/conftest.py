"""Shared fixtures: a tiny random Llama with the embedded model's tokenizer (fast, CPU-only)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

# the tests of DeepSpeed's engines (tests/test_distributed.py, tests/test_scale_recipes.py) need the optional extra
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (pip install -e "
                                     "'.[deepspeed]'; the README's test command installs it)")


def make_tiny_model(folder, layers: int = 4, hidden: int = 64, seed: int = 0):
    """A random 4-layer Llama saved with the SmolLM2 tokenizer and chat template (same vocabulary)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rto.models import DEFAULT_MODEL, load_tokenizer

    tokenizer = load_tokenizer(DEFAULT_MODEL)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory) -> str:
    """Six preference pairs (a cheerful answer over a sad one; every other rejected answer cut before EOS)."""
    import json

    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Describe item {i}.", "chosen": "A lovely, great thing.",
                                        "rejected": "A sad thing.", "chosen_ended": True,
                                        "rejected_ended": i % 2 == 0}) + "\n" for i in range(6)))
    return str(path)


def make_reward_model(tiny_model: str, folder, mean: float = 0.0, std: float = 1.0) -> str:
    """The tiny model with a seeded random scalar head (responses get different scores) and reward statistics
    (mean, std), saved in `folder`."""
    import torch

    from rto.models import ValueModel, load_tokenizer

    rm = ValueModel.from_pretrained(tiny_model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        rm.head.weight.copy_(torch.randn(rm.head.weight.shape, generator=gen) * 0.5)
    rm.meta = {"reward_mean": mean, "reward_std": std}
    rm.save_pretrained(folder)
    load_tokenizer(tiny_model).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def reward_model(tiny_model, tmp_path_factory) -> str:
    return make_reward_model(tiny_model, tmp_path_factory.mktemp("rm") / "model")
