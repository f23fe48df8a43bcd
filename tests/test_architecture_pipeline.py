"""The whole pipeline (pairs -> rm -> dpo -> ppo --reward rto -> eval) on tiny random decoders of every
architecture of tests/test_architectures.py, each saved with the embedded model's tokenizer and chat template,
with a shared trunk (2 of 4 layers trained) and sliding-window layers both in the frozen bottom and in the
trained top where the architecture has per-layer kinds; and PPO's scoring pass (rto.rollout.score_sequences)
against each model's own forward, with and without the shared trunk."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as tf
import yaml

from rto.cli import main
from rto.models import DEFAULT_MODEL, ValueModel, decoder_of, load_tokenizer
from rto.rollout import encode_prompts, encode_response, generate, score_sequences
from rto.runtime import read_metrics
from rto.sequences import collate, probe_batch
from rto.trunk import checked_trunk_layers, trunk_hidden
from tests.test_architectures import ARCHITECTURES

LAYERS, TRAIN_LAYERS, WINDOW = 4, 2, 4  # 2 frozen bottom layers shared, 2 trained; every sequence is longer than 4
FROZEN = LAYERS - TRAIN_LAYERS
MIXED = ["sliding_attention", "full_attention", "full_attention", "sliding_attention"]  # one of each kind per half

# architecture -> (config class, model class, its own settings); Gemma2 and Gemma3 alternate sliding and full
# layers from layer 0 by default, so each half of their 4 layers holds one of each
SPECS = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(use_sliding_window=True, sliding_window=WINDOW,
                                                         layer_types=MIXED)),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(head_dim=16, use_sliding_window=True, sliding_window=WINDOW,
                                                         layer_types=MIXED)),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(sliding_window=WINDOW)),  # every layer sliding
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, dict(sliding_window=WINDOW)),  # every layer sliding
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, dict(head_dim=16, sliding_window=WINDOW,
                                                            attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, dict(head_dim=16, sliding_window=WINDOW,
                                                                sliding_window_pattern=2)),
}
# fp32 tolerance of rto's scoring pass against the model's own forward (absolute, for all): log-probs and entropies in
# nats (up to about 17 here), values and reward scores on the head's scale (N(0, 1) weights: up to about 20 here).
# Measured on these models: at most 1.9e-6 for log-probs, 9.5e-7 for values, with and without the shared trunk.
ATOL = 1e-5


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DEFAULT_MODEL)


def make_model(arch: str, tokenizer, seed: int = 0, scale: float | None = None):
    """A tiny random `arch` causal LM (4 layers, hidden 64) on the tokenizer's vocabulary and special ids; with
    `scale`, every matrix drawn from N(0, scale^2) instead of the default initialisation, so each layer matters."""
    config_cls, model_cls, own = SPECS[arch]
    config = config_cls(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        **own)
    torch.manual_seed(seed)
    model = model_cls(config)
    if scale is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, scale)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def save_model(arch: str, tokenizer, folder) -> str:
    """`make_model(arch)` saved with the tokenizer and its chat template, as a user's checkpoint folder."""
    make_model(arch, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def sliding_layers(config) -> list[int]:
    """Indices of the layers that attend within the sliding window."""
    kinds = getattr(config, "layer_types", None)
    if kinds is None:  # Mistral, Phi3: one window for every layer
        return list(range(config.num_hidden_layers)) if getattr(config, "sliding_window", None) else []
    return [i for i, kind in enumerate(kinds) if kind == "sliding_attention"]


def test_the_same_architectures_as_the_trunk_tests(tokenizer):
    assert list(SPECS) == list(ARCHITECTURES)
    for arch in SPECS:
        config = make_model(arch, tokenizer).config
        slides = sliding_layers(config)
        if arch == "llama":
            assert slides == []
        else:  # a window in the frozen bottom and in the trained top
            assert config.sliding_window == WINDOW
            assert min(slides) < FROZEN <= max(slides), arch


def _recipe(tmp_path, model: str) -> tuple:
    run = tmp_path / "run"
    recipe = {
        "out": str(run),
        "defaults": {"seed": 0, "train_layers": TRAIN_LAYERS, "progress": False, "report_to": "none"},
        "stages": [
            {"stage": "pairs", "policy": model, "num_prompts": 8, "samples_per_prompt": 3, "max_new_tokens": 6},
            {"stage": "rm", "model": model, "pairs": "{run}/pairs/pairs.jsonl", "batch_size": 4},
            {"stage": "dpo", "model": model, "pairs": "{run}/pairs/pairs.jsonl", "batch_size": 4},
            {"name": "rto", "stage": "ppo", "reward": "rto", "policy": model, "dpo_model": "{run}/dpo/model",
             "reward_model": "{run}/rm/model", "beta_dpo": 0.5, "dpo_clip": 0.5, "iterations": 2, "rollout_size": 4,
             "minibatch_size": 2, "max_new_tokens": 6},
            {"stage": "eval", "ref": model, "num_prompts": 4, "max_new_tokens": 6, "heatmap_model": "rto",
             "models": [f"sft={model}", "rto={run}/rto/policy"], "reward_model": "{run}/rm/model",
             "dpo_model": "{run}/dpo/model"},
        ],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, run


@pytest.mark.parametrize("arch", SPECS)
def test_the_whole_pipeline_runs_on(arch, tokenizer, tmp_path):
    model = save_model(arch, tokenizer, tmp_path / "model")
    recipe, run = _recipe(tmp_path, model)
    assert main(["pipeline", str(recipe)]) == 0

    for stage in ("pairs", "rm", "dpo", "rto", "eval"):
        assert (run / stage / "DONE").exists() and (run / stage / "summary.json").exists(), stage
    pairs = [json.loads(line) for line in (run / "pairs" / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    assert json.loads((run / "rm" / "model" / "rto_model.json").read_text())["reward_std"] > 0
    assert (run / "rm" / "model" / "value_head.safetensors").exists()
    assert (run / "dpo" / "model" / "model.safetensors").exists()
    assert (run / "rto" / "policy" / "model.safetensors").exists()
    assert (run / "rto" / "critic" / "value_head.safetensors").exists()
    # the trained models keep the architecture and its per-layer settings
    saved = json.loads((run / "rto" / "policy" / "config.json").read_text())
    assert saved["architectures"] == [SPECS[arch][1].__name__]
    assert saved.get("layer_types") == json.loads((tmp_path / "model" / "config.json").read_text()).get("layer_types")

    rows = read_metrics(run / "rto")
    assert [r["iteration"] for r in rows] == [1, 2]
    assert all("reward_dpo" in r and "value_mean" in r for r in rows)
    # PPO scores on the trunk its five roles share: it says so, and says nothing about turning it off
    log = (run / "rto" / "log.txt").read_text()
    assert f"trunk sharing on: embeddings and bottom {FROZEN} layers computed once per batch" in log
    assert f"then the top {TRAIN_LAYERS} layers of each role (5 roles)" in log  # policy, ref, DPO model, RM, critic
    for stage in ("rm", "dpo", "rto", "eval"):
        assert "trunk sharing off" not in (run / stage / "log.txt").read_text(), stage

    ev = json.loads((run / "eval" / "eval.json").read_text())
    assert [r["model"] for r in ev["table"]] == ["sft", "rto"] and all(r["n"] == 4 for r in ev["table"])
    assert ev["heatmaps"] and len(ev["heatmaps"][0]["tokens"]) == len(ev["heatmaps"][0]["values"])


def _perturbed(model, seed: int, scale: float = 0.05):
    """A copy of `model` whose top TRAIN_LAYERS layers (and final norm) moved by N(0, scale^2): a trained role that
    shares the frozen bottom."""
    other = copy.deepcopy(model)
    decoder = decoder_of(other)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [*decoder.layers[FROZEN:].parameters(), *decoder.norm.parameters()]:
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return other


def _value_model(model, seed: int, pooling: str) -> ValueModel:
    vm = ValueModel(_perturbed(model, seed), meta={"pooling": pooling}).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        vm.head.weight.copy_(torch.randn(vm.head.weight.shape, generator=gen))
        vm.head.bias.copy_(torch.randn(vm.head.bias.shape, generator=gen))
    return vm


def _chat_batch(tokenizer):
    """Three chat prompts of different lengths with responses of three lengths (the second one ended), and the
    prompts' ids."""
    prompts = encode_prompts(tokenizer, [[{"role": "user", "content": text}] for text in (
        "Write a short review of a quiet café.", "Hi!", "Describe a rainy morning at the harbour in two lines.")], "")
    responses = [encode_response(tokenizer, text, ended) for text, ended in (
        ("The coffee was warm and the room calm", False), ("Hello", True),
        ("Grey water, gulls, and the smell of rope and diesel", False))]
    return collate(prompts, responses, tokenizer.pad_token_id), prompts


def _own_logits(model, b) -> torch.Tensor:
    """Logits predicting each response token from the model's own forward (soft-cap included), [B, T, V]."""
    return model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                 position_ids=b.position_ids).logits[:, b.prompt_width - 1 : -1].float()


def _own_logprobs(model, b, temperature: float = 1.0) -> torch.Tensor:
    logp = torch.log_softmax(_own_logits(model, b) / temperature, -1)
    return logp.gather(-1, b.response_ids.unsqueeze(-1)).squeeze(-1) * b.response_mask


def _own_entropy(model, b, temperature: float) -> torch.Tensor:
    logp = torch.log_softmax(_own_logits(model, b) / temperature, -1)
    return -(logp.exp() * logp).sum(-1) * b.response_mask


def _own_values(vm: ValueModel, b) -> torch.Tensor:
    """The head on the decoder's own final hidden states at every position, [B, P+T]."""
    return vm(b.input_ids, b.attention_mask, b.position_ids)


@pytest.mark.parametrize("arch", SPECS)
def test_ppo_scoring_equals_the_models_own_forward_on(arch, tokenizer):
    ref = make_model(arch, tokenizer, scale=0.15)
    policy, dpo = _perturbed(ref, 1), _perturbed(ref, 2)
    critic, rm_last, rm_mean = _value_model(ref, 3, "last"), _value_model(ref, 4, "last"), _value_model(ref, 5, "mean")
    b, prompt_ids = _chat_batch(tokenizer)
    assert b.input_ids.shape[1] > 4 * WINDOW and len(set(b.response_lengths.tolist())) == 3

    temperature, P, lengths = 0.7, b.prompt_width, b.response_lengths
    with torch.no_grad():
        own_critic, own_last, own_mean = (_own_values(m, b) for m in (critic, rm_last, rm_mean))
        want = {
            "logp": _own_logprobs(policy, b, temperature), "logp_ref": _own_logprobs(ref, b, temperature),
            "logp_ref_t1": _own_logprobs(ref, b), "logp_dpo": _own_logprobs(dpo, b),
            "entropy": _own_entropy(policy, b, temperature),
            "values": own_critic[:, P - 1 : -1] * b.response_mask,  # V(s_t) read where y_t is predicted
            "rm_last": own_last[torch.arange(len(b)), P + lengths - 1],  # on the last response token
            "rm_mean": torch.stack([own_mean[i, P : P + n].mean() for i, n in enumerate(lengths.tolist())]),
        }
    roles = [policy, ref, dpo, critic, rm_last, rm_mean]
    notes = []
    n_shared = checked_trunk_layers(roles, TRAIN_LAYERS, probe_batch(prompt_ids, tokenizer.pad_token_id), notes.append)
    assert (n_shared, notes) == (FROZEN, [])
    for n in (n_shared, 0):
        got = {}
        for rm, pooling in ((rm_last, "last"), (rm_mean, "mean")):
            scored = score_sequences(b, ref=ref, policy=policy, dpo=dpo, critic=critic, rm=rm, n_shared=n,
                                     temperature=temperature, chunk=2, entropy=True)
            got.update({k: v for k, v in scored.items() if k != "rm_raw"}, **{f"rm_{pooling}": scored["rm_raw"]})
        assert set(got) == set(want)
        for key, value in want.items():
            assert got[key].shape == value.shape, key
            # relative to the figures' size (at least 1): without a shared trunk the prompt prefix that every row
            # shares runs once (rto.sequences.prefix_once_hidden), which rounds otherwise than a full forward
            err = float((got[key] - value).abs().max()) / max(1.0, float(value.abs().max()))
            assert err <= ATOL, f"{arch}, {n} layers shared, {key}: off by {err:.2g} (relative)"
    assert (want["logp"] - want["logp_ref"]).abs().max() > 1e-3  # the roles differ, so a swap of two would show
    assert (want["logp_dpo"] - want["logp_ref_t1"]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", SPECS)
def test_the_sampler_keeps_the_trunk_the_scoring_pass_computes_on(arch, tokenizer, monkeypatch):
    """The decode loop samples from the model's own distribution (its log-probs are a full forward's, also with
    sliding windows shorter than the sequence: a shared-prefix prefill would put pads inside the window), and
    generate(..., trunk_layers=FROZEN) keeps every token's hidden states after the frozen bottom as the decode
    loop computed them (Rollout.trunk): they equal the trunk pass over the sampled batch, rows that ended early
    and a repeated prompt included; scoring on them gives what scoring on its own trunk pass gives; and keeping
    them changes no token and no log-prob."""
    import rto.rollout

    model = make_model(arch, tokenizer, scale=0.15)
    _, prompt_ids = _chat_batch(tokenizer)
    prompts = prompt_ids + prompt_ids[1:2]
    every_ninth = set(range(0, len(tokenizer), 9))  # about one token in nine ends a row
    monkeypatch.setattr(rto.rollout, "eos_ids", lambda m, t: every_ninth)
    kw = dict(max_new_tokens=12, return_logprobs=True, progress=False, seeds=[31, 32, 33, 34])
    kept = generate(model, tokenizer, prompts, trunk_layers=FROZEN, **kw)
    plain = generate(model, tokenizer, prompts, **kw)
    assert plain.trunk is None and kept.response_ids == plain.response_ids
    # (a row that ended rides one more step: other batch shapes, so equal up to float rounding)
    assert torch.allclose(kept.sampler_logp, plain.sampler_logp, rtol=0, atol=ATOL)
    b = kept.batch
    assert kept.ended.any() and len(set(b.response_lengths.tolist())) > 1
    with torch.no_grad():
        err = float((kept.sampler_logp - _own_logprobs(model, b)).abs().max())
    assert err <= ATOL, f"{arch}: the sampler's log-probs are off by {err:.2g}"
    real = b.attention_mask.bool()
    want = trunk_hidden(model, FROZEN, b.input_ids, b.attention_mask, b.position_ids)
    # hidden states of up to ~12 here, summed in another order by the decode step's products (rto.decoding.
    # PackedProducts): within a few ulps of their size (measured: at most 1.0e-5 at 10.5, llama)
    torch.testing.assert_close(kept.trunk[real], want[real], rtol=1e-5, atol=ATOL,
                               msg=lambda m: f"{arch}: the sampler's trunk is off: {m}")
    assert not kept.trunk[~real].any()  # padding is 0
    roles = dict(ref=model, dpo=_perturbed(model, 2), critic=_value_model(model, 3, "last"),
                 rm=_value_model(model, 4, "last"))
    got = score_sequences(b, **roles, n_shared=FROZEN, chunk=2, trunk=kept.trunk)
    own = score_sequences(b, **roles, n_shared=FROZEN, chunk=2)
    assert set(got) == set(own)
    for key in got:  # (the trunks differ by rounding, which 2 more layers and the heads' N(0, 1) weights scale up)
        err = float((got[key] - own[key]).abs().max())
        assert err <= 10 * ATOL, f"{arch}, {key}: off by {err:.2g}"
