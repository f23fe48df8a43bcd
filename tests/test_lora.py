"""LoRA mode (rto.lora) on tiny random models: the reference view is the base exactly, a fresh adapter leaves the
policy equal to the base, a second adapter runs alone in its view, the views share the trunk, gradient
checkpointing gives the same gradients, and `rto dpo --lora true` then `rto ppo --lora true --reward rto` train
adapters on one base object whose weights never change, with the saved adapter loading in `rto eval`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import rto.stages.ppo as ppo
from rto.cli import main
from rto.config import ConfigError
from rto.lora import (DPO_ADAPTER, LoraOptions, adapter_view, attach_adapter, base_view, enable_gradient_checkpointing,
                      load_merged, load_second_adapter, one_base_roles)
from rto.models import ValueModel, decoder_of, load_causal_lm, load_tokenizer, set_trainable, weights_fingerprint
from rto.sequences import collate, probe_batch, token_logprobs
from rto.stages import dpo, eval as eval_stage
from rto.trunk import checked_trunk_layers, role_hidden, trunk_hidden

OPTS = LoraOptions(lora=True, lora_r=4, lora_alpha=8.0)


@pytest.fixture(scope="module")
def batch(tiny_model):
    """Two left-padded prompts with responses of different lengths."""
    tok = load_tokenizer(tiny_model)
    prompts = [tok("Write a short review of tea.").input_ids, tok("Hi").input_ids]
    responses = [tok(" It is warm and kind.").input_ids, tok(" Hello there, friend!").input_ids[:3]]
    return collate(prompts, responses, tok.pad_token_id)


def _randomize_adapter(model, name: str = "default", seed: int = 1) -> None:
    """Give adapter `name` non-zero B matrices, so that it changes what the model computes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if f"lora_B.{name}." in pname:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def _forward_logits(model, batch):
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 position_ids=batch.position_ids).logits


def test_reference_view_is_the_base_exactly(tiny_model, batch):
    plain = load_causal_lm(tiny_model).eval()
    policy = attach_adapter(load_causal_lm(tiny_model), OPTS, train_layers=2).eval()
    _randomize_adapter(policy)
    ref = base_view(policy)
    with torch.no_grad():
        assert torch.equal(_forward_logits(ref, batch), _forward_logits(plain, batch))  # the base's own forward
        assert torch.equal(token_logprobs(ref, batch), token_logprobs(plain, batch))
        # the view is no copy of a frozen state: the policy with its (non-zero) adapter computes something else
        assert not torch.allclose(token_logprobs(policy, batch), token_logprobs(plain, batch))
    assert list(ref.state_dict()) == list(plain.state_dict())  # the plain model's names, no adapter weights
    assert weights_fingerprint(ref) == weights_fingerprint(plain)
    # a view holds no weights of its own: every one of its tensors is the policy's
    policy_tensors = {id(p) for p in policy.parameters()}
    assert all(id(p) in policy_tensors for p in ref.parameters())


def test_fresh_adapter_leaves_the_policy_equal_to_the_base(tiny_model, batch):
    plain = load_causal_lm(tiny_model).eval()
    policy = attach_adapter(load_causal_lm(tiny_model), OPTS, train_layers=2).eval()
    with torch.no_grad():
        assert torch.equal(token_logprobs(policy, batch), token_logprobs(plain, batch))  # B = 0
    trainable = [name for name, p in policy.named_parameters() if p.requires_grad]
    n = set_trainable(policy, 2)  # a peft model keeps peft's choice: the adapter only
    assert n == sum(p.numel() for p in policy.parameters() if p.requires_grad) > 0
    assert trainable == [name for name, p in policy.named_parameters() if p.requires_grad]
    assert all("lora_" in name for name in trainable)
    assert {name.split("layers.")[1].split(".")[0] for name in trainable} == {"2", "3"}  # the top 2 of 4 layers
    # every linear layer of those decoder layers got an adapter, the LM head none
    assert {name.split(".")[-4] for name in trainable} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"}


def test_second_adapter_runs_alone_in_its_view(tiny_model, batch, tmp_path):
    trained = attach_adapter(load_causal_lm(tiny_model), OPTS, train_layers=2)
    _randomize_adapter(trained, seed=2)
    trained.save_pretrained(tmp_path / "adapter")
    policy = attach_adapter(load_causal_lm(tiny_model), OPTS, train_layers=2).eval()
    _randomize_adapter(policy, seed=3)
    before = token_logprobs(policy, batch).detach()
    load_second_adapter(policy, str(tmp_path / "adapter"))
    view = adapter_view(policy, DPO_ADAPTER)
    alone = trained.eval()
    with torch.no_grad():
        assert torch.equal(token_logprobs(view, batch), token_logprobs(alone, batch))
        assert torch.equal(token_logprobs(policy, batch), before)  # the policy's own adapter is still the active one
        merged = load_merged(str(tmp_path / "adapter"))  # what `rto eval` loads: the same model up to rounding
        assert (token_logprobs(merged, batch) - token_logprobs(alone, batch)).abs().max() < 1e-4
    names = [name for name, _ in view.named_parameters()]
    assert any(f"lora_A.{DPO_ADAPTER}." in name for name in names)
    assert not any(".default." in name for name in names)  # the view holds the DPO adapter only
    assert not any(p.requires_grad for name, p in policy.named_parameters() if f".{DPO_ADAPTER}." in name)
    with pytest.raises(KeyError, match="no adapter 'other'"):
        adapter_view(policy, "other")


def test_views_share_the_trunk(tiny_model, batch, tmp_path):
    trained = attach_adapter(load_causal_lm(tiny_model), OPTS, train_layers=2)
    _randomize_adapter(trained, seed=2)
    trained.save_pretrained(tmp_path / "adapter")
    policy = attach_adapter(load_causal_lm(tiny_model), OPTS, train_layers=2).eval()
    _randomize_adapter(policy)
    load_second_adapter(policy, str(tmp_path / "adapter"))
    roles = [policy, base_view(policy), adapter_view(policy, DPO_ADAPTER)]
    notes = []
    probe = probe_batch([batch.input_ids[0].tolist()[-6:], batch.input_ids[1].tolist()[-4:]], 0)
    assert checked_trunk_layers(roles, 2, probe, notes.append) == 2 and notes == []
    with torch.no_grad():
        trunk = trunk_hidden(roles[1], 2, batch.input_ids, batch.attention_mask, batch.position_ids)
        for model in roles:
            full = role_hidden(model, batch)[batch.attention_mask.bool()]
            shared = role_hidden(model, batch, trunk, 2)[batch.attention_mask.bool()]
            assert (full - shared).abs().max() < 1e-5


def test_one_base_roles_loads_a_whole_dpo_model_separately(tiny_model):
    notes = []
    load = lambda path, role: load_causal_lm(path, role=role)  # noqa: E731
    roles, record = one_base_roles(tiny_model, None, tiny_model, {}, OPTS, 2, load, notes.append)
    assert roles["dpo"] is not None and notes and "a whole model" in notes[0]
    assert decoder_of(roles["dpo"]).embed_tokens.weight is not decoder_of(roles["policy"]).embed_tokens.weight
    assert decoder_of(roles["ref"]).embed_tokens.weight is decoder_of(roles["policy"]).embed_tokens.weight
    assert record["adapter"] == "lora" and record["base_fingerprint"] == weights_fingerprint(roles["ref"])
    with pytest.raises(ValueError, match="--ref must be null or the same as --policy"):
        one_base_roles(tiny_model, "some/other-model", None, {}, OPTS, 2, load, notes.append)


def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(tiny_model, batch):
    def run(checkpointed: bool):
        torch.manual_seed(0)  # the same adapter A in both models
        model = attach_adapter(load_causal_lm(tiny_model), OPTS, train_layers=2).eval()  # eval: as rto trains
        _randomize_adapter(model)
        if checkpointed:
            assert enable_gradient_checkpointing(model) == 4
        calls = []
        decoder_of(model).layers[3].self_attn.register_forward_hook(lambda *_: calls.append(1))
        token_logprobs(model, batch).sum().backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():  # without gradients a checkpointed layer runs once, as before
            token_logprobs(model, batch)
        return grads, len(calls)

    plain, plain_calls = run(False)
    checkpointed, checkpointed_calls = run(True)
    assert plain_calls == 2 and checkpointed_calls == 3  # the backward pass ran the layer's attention again
    assert plain.keys() == checkpointed.keys()
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-6) for k in plain)


def test_lora_fields_are_checked_and_documented(tiny_model, capsys):
    with pytest.raises(ConfigError, match="lora_r must be an integer >= 1, got 0"):
        dpo.DPOConfig(lora_r=0)
    with pytest.raises(ConfigError, match=r"lora_dropout must be a number in \[0, 1\)"):
        ppo.PPOConfig(lora_dropout=1.0)
    with pytest.raises(ConfigError, match="with lora the reference is `model`"):
        dpo.DPOConfig(lora=True, model=tiny_model, ref="another/model")
    for command in ("dpo", "ppo"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        for flag in ("--lora ", "--lora_r", "--lora_alpha", "--lora_dropout", "--lora_targets",
                     "--gradient_checkpointing"):
            assert flag in text
        assert "Rank r of the adapter" in text and "torch.utils.checkpoint" in text


@pytest.fixture(scope="module")
def reward_model(tiny_model, tmp_path_factory) -> str:
    rm = ValueModel.from_pretrained(tiny_model)
    with torch.no_grad():
        rm.head.weight.copy_(torch.randn(rm.head.weight.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    rm.meta = {"reward_mean": 0.1, "reward_std": 2.0}
    folder = tmp_path_factory.mktemp("rm") / "model"
    rm.save_pretrained(folder)
    load_tokenizer(tiny_model).save_pretrained(folder)
    return str(folder)


def test_dpo_then_ppo_on_one_base(tmp_path, tiny_model, pairs_file, reward_model, monkeypatch):
    base_weights = load_file(f"{tiny_model}/model.safetensors")
    base_fingerprint = weights_fingerprint(load_causal_lm(tiny_model))

    # rto dpo --lora true: an adapter on the tiny model, the reference that model with the adapter off
    dpo.run(dpo.DPOConfig(out=str(tmp_path / "dpo"), model=tiny_model, pairs=pairs_file, lora=True, batch_size=2,
                          lr=1e-2, warmup_ratio=0.0, eval_fraction=0.2, train_layers=2, progress=False,
                          precision="fp32", gradient_checkpointing=True))
    folder = tmp_path / "dpo" / "model"
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    assert not (folder / "model.safetensors").exists() and (folder / "README.md").is_file()
    record = json.loads((folder / "rto_model.json").read_text())
    assert record["adapter"] == "lora" and record["base_model"] == tiny_model and record["stage"] == "dpo"
    assert record["base_fingerprint"] == record["reference_fingerprint"] == base_fingerprint
    dpo_adapter = load_file(str(folder / "adapter_model.safetensors"))
    assert dpo_adapter and all("lora_" in k for k in dpo_adapter)
    assert any(v.abs().max() > 0 for k, v in dpo_adapter.items() if "lora_B" in k)  # it trained (B started at 0)

    # rto ppo --lora true --reward rto --dpo_model <adapter>: policy, reference and DPO model on one base
    seen = {}
    real_roles = ppo.one_base_roles

    def spy(*args, **kwargs):
        roles, meta = real_roles(*args, **kwargs)
        seen["roles"] = roles
        seen["start"] = {name: p.detach().clone() for name, p in roles["policy"].named_parameters()}
        return roles, meta

    monkeypatch.setattr(ppo, "one_base_roles", spy)
    shared = []
    real_shared = ppo.shared_trunk_layers
    monkeypatch.setattr(ppo, "shared_trunk_layers", lambda *a, **k: shared.append(real_shared(*a, **k)) or shared[-1])
    out = tmp_path / "ppo"
    ppo.run(ppo.PPOConfig(out=str(out), reward="rto", policy=tiny_model, reward_model=reward_model,
                          dpo_model=str(folder), lora=True, iterations=2, rollout_size=4, minibatch_size=2,
                          max_new_tokens=6, train_layers=2, progress=False, precision="fp32", actor_lr=1e-2,
                          critic_lr=1e-3, beta_dpo=0.5, gradient_checkpointing=True))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(math.isfinite(m["reward_dpo"]) for m in metrics)
    assert shared == [2]  # the bottom 2 of 4 layers computed once for every role

    policy, ref, dpo_view = seen["roles"]["policy"], seen["roles"]["ref"], seen["roles"]["dpo"]
    # one base object: the three roles hold the very same base tensors
    embeds = [decoder_of(m).embed_tokens.weight for m in (policy, ref, dpo_view)]
    assert embeds[0] is embeds[1] is embeds[2]
    q = [decoder_of(m).layers[3].self_attn.q_proj for m in (policy, ref, dpo_view)]
    assert q[0].base_layer.weight is q[1].weight is q[2].base_layer.weight
    # the base weights are unchanged, bitwise; only the policy's adapter changed
    now = ref.state_dict()
    assert all(torch.equal(now[k], v) for k, v in base_weights.items())
    changed = [name for name, p in policy.named_parameters() if not torch.equal(p, seen["start"][name])]
    assert changed and all("lora_" in name and ".default." in name for name in changed)

    # the saved policy is its adapter (no DPO adapter, no base weights) with rto's record and card
    saved = out / "policy"
    assert (saved / "adapter_model.safetensors").is_file() and not (saved / "model.safetensors").exists()
    assert not (saved / DPO_ADAPTER).exists() and (saved / "README.md").is_file()
    assert all(".default" not in k and "lora_" in k for k in load_file(str(saved / "adapter_model.safetensors")))
    meta = json.loads((saved / "rto_model.json").read_text())
    assert meta["stage"] == "ppo" and meta["adapter"] == "lora" and meta["base_model"] == tiny_model
    assert meta["base_fingerprint"] == base_fingerprint
    assert (out / "critic" / "model.safetensors").is_file()  # the critic stays a model of its own

    # the saved adapter loads (base + adapter, merged) as the policy trained it, and in rto eval
    tok = load_tokenizer(tiny_model)
    b = collate([tok("Describe item 1.").input_ids], [tok(" A lovely thing.").input_ids], tok.pad_token_id)
    with torch.no_grad():
        gap = (token_logprobs(load_causal_lm(str(saved)), b) - token_logprobs(policy.eval(), b)).abs().max()
    assert gap < 1e-4
    report = eval_stage.run(eval_stage.EvalConfig(out=str(tmp_path / "eval"), models=[f"rto={saved}"],
                                                  ref=tiny_model, dpo_model=str(folder), num_prompts=4,
                                                  max_new_tokens=4, heatmaps=1, progress=False, precision="fp32"))
    row = report["table"][0]
    assert row["model"] == "rto" and row["n"] == 4 and math.isfinite(row["kl"])
