"""A few steps on the real embedded model (SmolLM2-135M-Instruct): loading, generation, RTO updates."""

import json

import pytest
import torch

from rto.models import DEFAULT_MODEL, load_causal_lm, load_tokenizer
from rto.rollout import decode_responses, encode_prompts, generate
from rto.stages.ppo import PPOConfig, run

pytestmark = pytest.mark.slow


def test_embedded_model_generates_text_that_ends():
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    model = load_causal_lm(DEFAULT_MODEL)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # why masks must come from lengths
    ids = encode_prompts(tokenizer, [[{"role": "user", "content": "Say hello in three words."}]], "")
    torch.manual_seed(0)
    rollout = generate(model, tokenizer, ids, max_new_tokens=24, greedy=True, progress=False)
    text = decode_responses(tokenizer, rollout.response_ids)[0]
    assert text.strip() and bool(rollout.ended[0])
    assert rollout.response_ids[0][-1] == tokenizer.eos_token_id


def test_two_rto_iterations_on_the_real_model(tmp_path):
    from rto.models import ValueModel

    rm = ValueModel.from_pretrained(DEFAULT_MODEL)  # a random head: scores that differ between responses
    torch.manual_seed(0)
    torch.nn.init.normal_(rm.head.weight, std=0.05)
    rm.meta = {"reward_mean": 0.0, "reward_std": 1.0}
    rm.save_pretrained(tmp_path / "rm")
    cfg = PPOConfig(out=str(tmp_path / "rto"), reward="rto", dpo_model=DEFAULT_MODEL, reward_model=str(tmp_path / "rm"),
                    iterations=2, rollout_size=4, minibatch_size=2, max_new_tokens=12, actor_lr=1e-4,
                    train_layers=2, progress=False)
    summary = run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "rto" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and summary["iterations"] == 2
    first = rows[0]
    # policy = reference = DPO model at the start: the dense term and the KL are exactly 0 on iteration 1
    assert first["reward_dpo"] == 0.0 and first["kl"] == 0.0
    assert rows[1]["kl"] != 0.0  # the policy moved after one update
    policy = load_causal_lm(str(tmp_path / "rto" / "policy"))
    base = load_causal_lm(DEFAULT_MODEL)
    assert torch.equal(policy.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(policy.model.layers[-1].mlp.up_proj.weight, base.model.layers[-1].mlp.up_proj.weight)
