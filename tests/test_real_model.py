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
    # policy = reference = DPO model at the start: the dense term is exactly 0 on iteration 1, and so is the KL
    # up to fp32 rounding (the policy's log-probs are the sampler's, from the KV-cached decode; the reference's
    # come from a full forward)
    assert first["reward_dpo"] == 0.0 and abs(first["kl_per_token"]) < 1e-4
    assert abs(rows[1]["kl_per_token"]) > 10 * abs(first["kl_per_token"])  # the policy moved after one update
    policy = load_causal_lm(str(tmp_path / "rto" / "policy"))
    base = load_causal_lm(DEFAULT_MODEL)
    assert torch.equal(policy.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(policy.model.layers[-1].mlp.up_proj.weight, base.model.layers[-1].mlp.up_proj.weight)


def test_lora_rto_end_to_end_on_the_real_model(tmp_path):
    """dpo --lora, then RTO with --lora on the DPO adapter (policy, reference and DPO model on one base), then eval
    of the saved policy adapter: on the embedded model, at the smallest sizes."""
    from rto.models import ValueModel
    from rto.stages import dpo, eval as evaluate

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Write one sentence about day {i}.",
                                         "chosen": "What a wonderful, happy day it was!",
                                         "rejected": "It was a dull, sad day.", "chosen_ended": True,
                                         "rejected_ended": True}) + "\n" for i in range(8)))
    dpo.run(dpo.DPOConfig(out=str(tmp_path / "dpo"), pairs=str(pairs), lora=True, batch_size=4, lr=1e-3,
                          eval_fraction=0.0, train_layers=2, progress=False))
    adapter = tmp_path / "dpo" / "model"
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "model.safetensors").exists()

    rm = ValueModel.from_pretrained(DEFAULT_MODEL)  # a random head: scores that differ between responses
    torch.manual_seed(0)
    torch.nn.init.normal_(rm.head.weight, std=0.05)
    rm.meta = {"reward_mean": 0.0, "reward_std": 1.0}
    rm.save_pretrained(tmp_path / "rm")
    run(PPOConfig(out=str(tmp_path / "rto"), reward="rto", dpo_model=str(adapter), reward_model=str(tmp_path / "rm"),
                  lora=True, iterations=2, rollout_size=4, minibatch_size=2, max_new_tokens=12, actor_lr=1e-3,
                  beta_dpo=0.5, train_layers=2, progress=False))
    rows = [json.loads(line) for line in (tmp_path / "rto" / "metrics.jsonl").read_text().splitlines()]
    # the DPO adapter moved pi_dpo away from the base (the reference): the dense term is paid from iteration 1,
    # while the fresh policy adapter is still the base (KL 0 up to fp32 rounding of the sampler's log-probs)
    assert rows[0]["reward_dpo"] != 0.0 and abs(rows[0]["kl_per_token"]) < 1e-4
    assert abs(rows[1]["kl_per_token"]) > 10 * abs(rows[0]["kl_per_token"])
    policy = tmp_path / "rto" / "policy"
    assert (policy / "adapter_model.safetensors").is_file() and not (policy / "model.safetensors").exists()

    evaluate.run(evaluate.EvalConfig(out=str(tmp_path / "eval"), models=[f"sft={DEFAULT_MODEL}", f"rto={policy}"],
                                     num_prompts=4, max_new_tokens=8, progress=False))
    table = {r["model"]: r for r in json.loads((tmp_path / "eval" / "eval.json").read_text())["table"]}
    assert table["sft"]["kl"] == 0.0 and table["rto"]["kl"] != 0.0  # eval ran the adapter, not the bare base
