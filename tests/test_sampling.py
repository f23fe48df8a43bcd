"""On-policy rollouts: the sampler draws from the distribution every log-prob is computed from.

transformers fills every generation field left None from the model's generation_config and then from its
own defaults (top_k=None meant top-k 50), so these tests pin the sampler down from the outside.
"""

import pytest
import torch

from rto.models import load_causal_lm, load_tokenizer
from rto.rollout import generate, off_policy_warning, score_sequences
from rto.sequences import collate, lm_logits, token_logprobs


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return load_causal_lm(tiny_model), load_tokenizer(tiny_model)


def _prompt(tokenizer):
    return tokenizer("Tell me about tea", add_special_tokens=False).input_ids


def test_samples_reach_beyond_the_top_50(tiny):
    model, tokenizer = tiny
    ids = _prompt(tokenizer)
    torch.manual_seed(0)
    rollout = generate(model, tokenizer, [ids] * 400, max_new_tokens=1, batch_size=400, progress=False)
    drawn = {r[0] for r in rollout.response_ids}
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    top50 = set(logits.topk(50).indices.tolist())
    assert len(drawn) > 50  # top-k 50 would allow at most 50 distinct tokens
    assert len(drawn - top50) > 0


def test_model_generation_config_does_not_change_the_sampler(tiny):
    model, tokenizer = tiny
    prompts = [_prompt(tokenizer)] * 6
    torch.manual_seed(1)
    plain = generate(model, tokenizer, prompts, max_new_tokens=8, temperature=0.8, progress=False)
    own = model.generation_config
    try:
        model.generation_config = own.__class__(**own.to_dict())
        model.generation_config.update(top_k=20, top_p=0.5, repetition_penalty=1.5, no_repeat_ngram_size=2,
                                       suppress_tokens=[int(plain.response_ids[0][0])])
        torch.manual_seed(1)
        configured = generate(model, tokenizer, prompts, max_new_tokens=8, temperature=0.8, progress=False)
        assert model.generation_config.top_k == 20  # the model's own config is given back untouched
    finally:
        model.generation_config = own
    assert configured.response_ids == plain.response_ids


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_stored_logprob_equals_the_scoring_pass(tiny, temperature):
    model, tokenizer = tiny
    prompts = [_prompt(tokenizer), tokenizer("Hi", add_special_tokens=False).input_ids] * 3
    torch.manual_seed(2)
    rollout = generate(model, tokenizer, prompts, max_new_tokens=7, temperature=temperature, progress=False,
                       return_logprobs=True)
    scored = token_logprobs(model, rollout.batch, temperature=temperature)
    mask = rollout.batch.response_mask.bool()
    assert torch.allclose(rollout.sampler_logp[mask], scored[mask], atol=1e-5)
    wrong_temperature = token_logprobs(model, rollout.batch, temperature=1.0 if temperature != 1.0 else 0.5)
    assert not torch.allclose(rollout.sampler_logp[mask], wrong_temperature[mask], atol=1e-3)


def test_truncated_sampling_is_said_to_be_off_policy():
    assert off_policy_warning(0, 1.0) is None
    assert "off-policy" in off_policy_warning(50, 1.0)
    assert "off-policy" in off_policy_warning(0, 0.9)


def test_dpo_term_scored_at_temperature_one(tiny, tiny_model):
    model, tokenizer = tiny
    dpo = load_causal_lm(tiny_model)
    with torch.no_grad():
        for p in dpo.model.layers[-1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = collate([_prompt(tokenizer)] * 2, [[10, 11, 12], [13, 14]], tokenizer.pad_token_id)
    scored = score_sequences(batch, ref=model, policy=model, dpo=dpo, temperature=0.5, entropy=True)
    assert torch.allclose(scored["logp_ref"], token_logprobs(model, batch, temperature=0.5))
    assert torch.allclose(scored["logp_ref_t1"], token_logprobs(model, batch, temperature=1.0))
    assert torch.allclose(scored["logp_dpo"], token_logprobs(dpo, batch, temperature=1.0))
    assert not torch.allclose(scored["logp_ref_t1"], scored["logp_ref"])
    # the entropy of the sampling distribution: at T=0.5 lower than the uniform bound, positive on the mask
    mask = batch.response_mask.bool()
    assert (scored["entropy"][mask] > 0).all() and (scored["entropy"][~mask] == 0).all()
    assert (scored["entropy"][mask] <= torch.log(torch.tensor(float(len(tokenizer))))).all()


def test_logits_and_values_stay_fp32_under_bf16_autocast(tiny):
    from rto.models import ValueModel

    model, _ = tiny
    hidden = torch.randn(2, 3, model.config.hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = lm_logits(model, hidden)
        values = ValueModel(model).values(hidden)
    assert logits.dtype == torch.float32 and values.dtype == torch.float32
    assert torch.equal(logits, hidden @ model.lm_head.weight.T)
