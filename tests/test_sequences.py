"""Batch layout, log-probs and the shared frozen trunk, on a tiny random Llama."""

import math

import pytest
import torch

from rto.lora import enable_gradient_checkpointing
from rto.models import ValueModel, decoder_of, load_causal_lm, set_trainable
from rto.trunk import shares_trunk, trunk_hidden
from rto.sequences import (collate, critic_values, cut_at_eos, entropy_from_logits, lm_logits, logprobs_from_logits,
                           nll_loss, picked_logprobs, picked_logprobs_, response_logits, sequence_scores,
                           shared_prefix_width, token_logprobs, token_values, without_prefix)


def test_collate_layout_by_hand():
    b = collate([[5, 6], [7]], [[1, 2, 3], [4]], pad_id=0)
    assert b.prompt_width == 2
    assert b.input_ids.tolist() == [[5, 6, 1, 2, 3], [0, 7, 4, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 0, 0]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 0, 1, 1, 1]]
    assert b.response_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b.response_lengths.tolist() == [3, 1]


def test_masks_do_not_depend_on_pad_equal_to_eos():
    eos = 9  # pad == eos, as for SmolLM2: a response that ends with EOS keeps it in the mask
    b = collate([[5]], [[1, eos]], pad_id=eos)
    assert b.response_mask.tolist() == [[1, 1]]


def test_shared_prefix_and_the_batch_without_it_by_hand():
    b = collate([[5, 6, 7, 8], [5, 6, 9], [5, 6, 7]], [[1, 2], [3], [4, 4]], pad_id=0)
    assert shared_prefix_width(b) == 2  # [5, 6]; row 3 could give up only two of its three tokens anyway
    assert shared_prefix_width(collate([[5, 6, 7]] * 2, [[1], [2]], pad_id=0)) == 2  # each keeps one token
    assert shared_prefix_width(collate([[5, 6], [7, 6]], [[1], [2]], pad_id=0)) == 0
    assert shared_prefix_width(collate([[5, 6, 7]], [[1]], pad_id=0)) == 0  # one row: nothing to share
    rest = without_prefix(b, 2)
    assert rest.prompt_width == 2
    assert rest.input_ids.tolist() == [[7, 8, 1, 2], [0, 9, 3, 0], [0, 7, 4, 4]]
    assert rest.attention_mask.tolist() == [[1, 1, 1, 1], [0, 1, 1, 0], [0, 1, 1, 1]]
    assert rest.position_ids.tolist() == [[2, 3, 4, 5], [0, 2, 3, 3], [0, 2, 3, 4]]
    assert rest.response_mask.tolist() == b.response_mask.tolist()


def test_tight_drops_the_columns_padding_in_every_row_by_hand():
    b = collate([[5, 6, 7], [8], [9, 10]], [[1], [2, 3, 4], [5, 6]], pad_id=0)  # P = 3, T = 3
    t, keep = b.select(torch.tensor([2, 0])).tight()  # prompts of 2 and 3 tokens, responses of 2 and 1
    assert keep == slice(0, 5) and t.prompt_width == 3
    t, keep = b.select(torch.tensor([1, 2])).tight()  # prompts of 1 and 2 tokens, responses of 3 and 2
    assert keep == slice(1, 6) and t.prompt_width == 2
    assert t.input_ids.tolist() == [[0, 8, 2, 3, 4], [9, 10, 5, 6, 0]]
    assert t.attention_mask.tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert t.position_ids.tolist() == [[0, 0, 1, 2, 3], [0, 1, 2, 3, 3]]
    assert t.response_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    whole, keep = b.tight()
    assert keep == slice(0, 6) and torch.equal(whole.input_ids, b.input_ids)


def test_scoring_chunks_rows_of_like_length_without_their_common_padding(tiny_model):
    """score_sequences takes the rows in order of length, chunk by chunk, each chunk without the columns that are
    padding in all its rows, and gives the results of whole rows back in the batch's order."""
    from rto.rollout import score_sequences

    policy = load_causal_lm(tiny_model).eval()
    critic = ValueModel.from_pretrained(tiny_model).eval()
    torch.nn.init.normal_(critic.head.weight)
    prompts = [[5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15, 16], [17, 18]]
    b = collate(prompts, [[1], [2, 3, 4, 5], [6, 7], [8, 9, 10]], pad_id=0)  # P = 6, T = 4
    with torch.no_grad():
        got, seen = _embedded_shapes(policy, lambda: score_sequences(b, ref=policy, critic=critic, chunk=2))
        assert seen == [(2, 2 + 4), (2, 6 + 2)]  # rows 2 and 4 (5 tokens each), then rows 1 and 3 (7 each)
        assert torch.allclose(got["logp_ref"], _plain_logprobs(policy, b), atol=1e-5)
        own = critic(b.input_ids, b.attention_mask, b.position_ids)[:, b.prompt_width - 1 : -1] * b.response_mask
        assert torch.allclose(got["values"], own, atol=1e-5)
        assert got["values"].shape == b.response_mask.shape and (got["values"][b.response_mask == 0] == 0).all()


def _plain_logprobs(model, b) -> torch.Tensor:
    """log pi(y_t) from the model's own forward over whole rows, 0 off the response mask."""
    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
    logp = torch.log_softmax(logits[:, b.prompt_width - 1 : -1].float(), -1)
    return logp.gather(-1, b.response_ids[..., None]).squeeze(-1) * b.response_mask


def _prefixed_batch():
    b = collate([[5, 6, 7, 8, 9], [5, 6, 7, 10], [5, 6, 7, 11, 12, 13]], [[1, 2, 3], [4], [2, 2]], pad_id=0)
    assert shared_prefix_width(b) == 3
    return b


def _embedded_shapes(model, run) -> list[tuple]:
    seen = []
    hook = decoder_of(model).embed_tokens.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    try:
        return run(), seen
    finally:
        hook.remove()


def test_the_shared_prefix_runs_once_and_scores_what_whole_rows_score(tiny_model):
    """The prompt prefix every row shares goes through the model once, at batch 1; the log-probs and values equal
    those of the model's own forward over whole rows up to float rounding."""
    policy = load_causal_lm(tiny_model).eval()
    critic = ValueModel.from_pretrained(tiny_model).eval()
    torch.nn.init.normal_(critic.head.weight)
    b = _prefixed_batch()
    with torch.no_grad():
        logp, seen = _embedded_shapes(policy, lambda: token_logprobs(policy, b))
        assert seen == [(1, 3), (3, b.input_ids.shape[1] - 3)]  # the prefix at batch 1, then every row's rest
        assert torch.allclose(logp, _plain_logprobs(policy, b), atol=1e-5)
        assert (logp[b.response_mask == 0] == 0).all()
        own = critic(b.input_ids, b.attention_mask, b.position_ids)[:, b.prompt_width - 1 :]
        assert torch.allclose(token_values(critic, b), own, atol=1e-5)


def test_training_through_the_shared_prefix_gives_the_gradient_of_whole_rows(tiny_model):
    """With gradients on, the prefix runs once too, and the gradient it passes back gathers every row's share:
    the parameters' gradients equal those of the loss over whole rows."""
    b = _prefixed_batch()
    weights = torch.linspace(0.5, 2.0, b.response_mask.numel()).view_as(b.response_mask)
    grads = []
    for run in (lambda m: token_logprobs(m, b), lambda m: _plain_logprobs(m, b)):
        model = load_causal_lm(tiny_model).eval()
        logp, seen = _embedded_shapes(model, lambda: run(model))
        (logp * weights).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert seen == [(3, b.input_ids.shape[1])]  # (the second run: whole rows)
    for name, grad in grads[1].items():
        assert torch.allclose(grads[0][name], grad, atol=1e-5, rtol=1e-4), name


def test_with_gradient_checkpointing_whole_rows_run(tiny_model):
    """Checkpointed layers recompute their forward in the backward pass and would write the prefix's cache
    twice: with gradients on they run whole rows; without, the prefix still runs once."""
    model = load_causal_lm(tiny_model).eval()
    enable_gradient_checkpointing(model)
    b = _prefixed_batch()
    logp, seen = _embedded_shapes(model, lambda: token_logprobs(model, b))
    assert seen == [(3, b.input_ids.shape[1])]
    logp.sum().backward()
    with torch.no_grad():
        assert _embedded_shapes(model, lambda: token_logprobs(model, b))[1][0] == (1, 3)


def test_cut_at_eos_keeps_the_first_eos():
    assert cut_at_eos([1, 2, 9, 3, 9], {9}) == ([1, 2, 9], True)
    assert cut_at_eos([1, 2, 3], {9}) == ([1, 2, 3], False)


def _batch():
    return collate([[11, 12, 13], [14]], [[21, 22, 23, 24], [25, 26]], pad_id=0)


def test_picked_logprobs_and_their_gradient_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, float("-inf")]], requires_grad=True)
    out = picked_logprobs(logits, torch.tensor([2, 0]))
    lse = math.log(math.e + math.e ** 2 + math.e ** 3)  # 3.40761
    torch.testing.assert_close(out, torch.tensor([3.0 - lse, -math.log(2.0)]))
    out.backward(torch.tensor([1.0, 2.0]))
    # d/dz_v = g * (1[v = y] - softmax(z)_v)
    soft = [math.exp(v - lse) for v in (1.0, 2.0, 3.0)]
    torch.testing.assert_close(logits.grad, torch.tensor([[-soft[0], -soft[1], 1.0 - soft[2]], [1.0, -1.0, 0.0]]))
    z = torch.randn(2, 3, 7, dtype=torch.double, requires_grad=True)
    y = torch.randint(0, 7, (2, 3))
    assert torch.autograd.gradcheck(picked_logprobs, (z, y))
    torch.testing.assert_close(picked_logprobs(z, y), torch.log_softmax(z, -1).gather(-1, y[..., None])[..., 0])


def test_picked_logprobs_in_the_logits_memory_by_hand():
    """picked_logprobs_ overwrites the logits it is given (their last use: no vocabulary-sized temporary) and
    gives picked_logprobs' numbers, bit for bit."""
    logits = torch.tensor([[0.0, math.log(3.0), float("-inf")], [float("-inf")] * 3])
    out = picked_logprobs_(logits, torch.tensor([1, 0]))
    # pi = (1/4, 3/4, 0): log pi_1 = log 3/4; a row of -inf gives -inf - (-inf) = nan, as torch.log_softmax
    torch.testing.assert_close(out[0], torch.tensor(math.log(0.75)))
    assert out[1].isnan() and torch.log_softmax(torch.full((3,), float("-inf")), -1)[0].isnan()
    assert logits[0, 1] != math.log(3.0)  # overwritten
    torch.manual_seed(0)
    z, y = torch.randn(2, 5, 49152) * 4, torch.randint(0, 49152, (2, 5))
    assert torch.equal(picked_logprobs_(z.clone(), y), picked_logprobs(z, y))
    b = collate([[1], [1]], [[2] * 5, [2] * 3], pad_id=0)
    b.response_ids[:] = y
    for temperature in (1.0, 0.7):
        want = logprobs_from_logits(z, b, temperature)
        assert torch.equal(logprobs_from_logits(z.clone(), b, temperature, consume=True), want)
    # logits that need a gradient are left alone: the autograd path runs
    w = z.clone().requires_grad_()
    got = logprobs_from_logits(w, b, 0.7, consume=True)
    got.sum().backward()
    assert torch.equal(w.detach(), z) and w.grad is not None and torch.equal(got.detach(), want)


def test_entropy_by_hand_and_against_float64():
    b = collate([[1]], [[2, 3]], pad_id=0)
    logits = torch.tensor([[[0.0, math.log(3.0), float("-inf")], [5.0, 5.0, 5.0]]])
    # pi = (1/4, 3/4, 0): H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.562335; uniform over 3: ln 3; a -inf logit adds 0
    torch.testing.assert_close(entropy_from_logits(logits, b), torch.tensor([[0.5623351, math.log(3.0)]]))
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 49152) * 4 + torch.randn(2, 5, 1) * 10  # a real vocabulary, peaked and flat rows
    b = collate([[1], [1]], [[2] * 5, [2] * 3], pad_id=0)
    for temperature in (1.0, 0.7):
        z = logits.double() / temperature
        exact = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1) * b.response_mask
        got = entropy_from_logits(logits, b, temperature)
        # measured 6e-7 (T = 1) and 4e-7 (T = 0.7); the former exp(log_softmax) * log_softmax formula: 2e-5, 1e-5
        assert float((got.double() - exact).abs().max()) < 2e-6, temperature
        assert (got[1, 3:] == 0).all()


def test_lm_logits_of_a_slice_are_the_heads_output_row_by_row(tiny_model):
    """The response positions are a slice of the hidden states (not contiguous): one 2-D product gives each row
    what the head gives it alone."""
    model = load_causal_lm(tiny_model).eval()
    hidden = torch.randn(3, 9, model.config.hidden_size)
    part = hidden[:, 2:-1]
    assert not part.is_contiguous()
    logits = lm_logits(model, part)
    assert logits.shape == (3, 6, model.config.vocab_size)
    for row in range(3):
        for t in range(6):
            torch.testing.assert_close(logits[row, t], model.lm_head(part[row, t]), rtol=0, atol=1e-5)


def test_token_logprobs_match_a_plain_forward(tiny_model):
    model = load_causal_lm(tiny_model).eval()
    b = _batch()
    lp = token_logprobs(model, b, temperature=0.7)
    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
    P = b.prompt_width
    for row, length in enumerate(b.response_lengths.tolist()):
        for t in range(length):
            want = torch.log_softmax(logits[row, P + t - 1] / 0.7, -1)[b.input_ids[row, P + t]]
            assert torch.allclose(lp[row, t], want, atol=1e-5)
        assert (lp[row, length:] == 0).all()


def test_shared_trunk_gives_the_same_logprobs_and_values(tiny_model):
    policy = load_causal_lm(tiny_model).eval()
    critic = ValueModel.from_pretrained(tiny_model).eval()
    torch.nn.init.normal_(critic.head.weight)
    for m in (policy, critic):
        set_trainable(m, 2)
    assert shares_trunk([policy, critic], 2)
    b = _batch()
    trunk = trunk_hidden(policy, 2, b.input_ids, b.attention_mask, b.position_ids)
    assert torch.allclose(token_logprobs(policy, b, trunk, 2), token_logprobs(policy, b), atol=1e-5)
    assert torch.allclose(token_values(critic, b, trunk, 2), token_values(critic, b), atol=1e-5)


def test_trunk_differs_after_the_bottom_layers_change(tiny_model):
    a, b = load_causal_lm(tiny_model), load_causal_lm(tiny_model)
    with torch.no_grad():
        b.model.layers[0].mlp.up_proj.weight.add_(1e-3)
    assert not shares_trunk([a, b], 2)


def test_value_columns_and_scores():
    b = _batch()
    values = torch.arange(10.0).view(2, 5)  # [B, T+1]
    assert critic_values(values, b).tolist() == [[0, 1, 2, 3], [5, 6, 0, 0]]
    assert sequence_scores(values, b).tolist() == [4.0, 7.0]  # column = response length
    # mean pooling: row 0 averages columns 1..4 = (1+2+3+4)/4; row 1 columns 6, 7 = 6.5
    assert sequence_scores(values, b, "mean").tolist() == [2.5, 6.5]


def test_partial_training_freezes_the_bottom(tiny_model):
    model = load_causal_lm(tiny_model)
    set_trainable(model, 1)
    b = _batch()
    nll_loss(model, b).backward()
    assert model.model.layers[0].mlp.up_proj.weight.grad is None
    assert model.model.embed_tokens.weight.grad is None
    assert model.model.layers[-1].mlp.up_proj.weight.grad is not None


def test_critic_head_normalised_to_the_reward_statistics(tiny_model):
    rm = ValueModel(load_causal_lm(tiny_model), meta={"reward_mean": 0.5, "reward_std": 2.0, "pooling": "mean"})
    with torch.no_grad():
        rm.head.weight.normal_()
        rm.head.bias.fill_(1.5)
    hidden = torch.randn(3, 64)
    raw = rm.values(hidden)
    rm.normalize_head()
    assert torch.allclose(rm.values(hidden), (raw - 0.5) / 2.0, atol=1e-6)
    assert rm.reward_stats() is None and rm.meta["pooling"] == "mean"
    rm.normalize_head()  # no statistics left: a second call changes nothing
    assert torch.allclose(rm.values(hidden), (raw - 0.5) / 2.0, atol=1e-6)


# ---- generation keeps the input order ------------------------------------------------------------
def _varied_model(tiny_model):
    """The tiny model with larger random decoder weights: its greedy continuation depends on the prompt
    (at the default init it just repeats the prompt's last token)."""
    model = load_causal_lm(tiny_model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            for p in layer.parameters():
                if p.dim() == 2:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def test_generate_returns_results_in_input_order(tiny_model):
    from rto.models import load_tokenizer
    from rto.rollout import encode_prompts, generate

    tokenizer = load_tokenizer(tiny_model)
    model = _varied_model(tiny_model)
    texts = ["Write one sentence about a very old, slow and quiet train.", "Hi.", "Tell me about cats and dogs.",
             "Describe a rainy day.", "Ok"]
    prompts = encode_prompts(tokenizer, [[{"role": "user", "content": t}] for t in texts], "")
    lengths = [len(p) for p in prompts]
    assert len(set(lengths)) == len(prompts) and lengths != sorted(lengths)  # generate must reorder them

    def alone(p):
        r = generate(model, tokenizer, [p], max_new_tokens=6, greedy=True, progress=False)
        return r.response_ids[0], bool(r.ended[0])

    # make one prompt stop early: a token from the middle of its greedy answer becomes an extra EOS
    first = [alone(p)[0] for p in prompts]
    stop = first[3][2]
    assert all(stop not in r for i, r in enumerate(first) if i != 3)
    assert len({tuple(r) for r in first}) == len(prompts)  # every prompt has its own answer
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]
    expected = [alone(p) for p in prompts]
    assert expected[3] == (first[3][:3], True)
    assert not any(ended for i, (_, ended) in enumerate(expected) if i != 3)

    for order in ([0, 1, 2, 3, 4], [4, 2, 0, 3, 1], [3, 1, 4, 0, 2]):
        for batch_size in (1, 2, 5):
            ids = [prompts[i] for i in order]
            rollout = generate(model, tokenizer, ids, max_new_tokens=6, greedy=True, batch_size=batch_size,
                               progress=False)
            assert rollout.prompt_ids == ids
            assert rollout.response_ids == [expected[i][0] for i in order], (order, batch_size)
            assert rollout.ended.tolist() == [expected[i][1] for i in order]
            # the collated batch holds each prompt with its own response, in the same order
            b = rollout.batch
            for row, i in enumerate(order):
                n = len(expected[i][0])
                assert b.input_ids[row, b.prompt_width - len(prompts[i]) : b.prompt_width].tolist() == prompts[i]
                assert b.response_ids[row, :n].tolist() == expected[i][0]
                assert b.response_lengths[row] == n


@pytest.mark.parametrize("with_policy", [False, True])
def test_scoring_reads_each_logits_tensor_before_its_log_probs_overwrite_it(tiny_model, monkeypatch, with_policy):
    """The scoring pass computes the log-probs at T last, in the logits' own memory; the entropy and the reference's
    log-probs at temperature 1 (the DPO term's scale) are read from the logits before that."""
    import rto.rollout as rollout
    import rto.sequences as sequences

    consumed, real = [], sequences.picked_logprobs_

    def counted(logits, index):
        consumed.append(logits.shape)
        return real(logits, index)

    monkeypatch.setattr(sequences, "picked_logprobs_", counted)
    torch.manual_seed(0)
    policy, ref, dpo = (load_causal_lm(tiny_model).eval() for _ in range(3))
    with torch.no_grad():
        for p in dpo.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    b = collate([[5, 6, 7], [8]], [[9, 10, 11], [12, 13]], pad_id=0)
    t = 0.7
    got = rollout.score_sequences(b, ref=ref, policy=policy if with_policy else None, dpo=dpo, chunk=2,
                                  entropy=True, temperature=t)
    assert len(consumed) == 2 + with_policy  # (policy,) reference and DPO model: each consumed once
    with torch.no_grad():
        sampler = policy if with_policy else ref
        want = {"logp": token_logprobs(sampler, b, temperature=t), "logp_ref": token_logprobs(ref, b, temperature=t),
                "logp_ref_t1": token_logprobs(ref, b), "logp_dpo": token_logprobs(dpo, b),
                "entropy": entropy_from_logits(response_logits(sampler, b), b, t)}
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-5, msg=key)


def test_scoring_holds_one_vocabulary_sized_logits_tensor_at_a_time(tiny_model, monkeypatch):
    """score_sequences frees the policy's logits before it computes the reference's (each is B x T x V fp32, 126 MB
    for a chunk of 16 x 40 tokens over a 49k vocabulary)."""
    import weakref

    import rto.rollout as rollout

    live, real = [], rollout.response_logits

    def tracked(*args, **kwargs):
        alive = sum(ref() is not None for ref in live)
        out = real(*args, **kwargs)
        counts.append(alive)
        live.append(weakref.ref(out))
        return out

    counts = []
    monkeypatch.setattr(rollout, "response_logits", tracked)
    policy, ref = (load_causal_lm(tiny_model).eval() for _ in range(2))
    b = collate([[5, 6, 7], [8]], [[9, 10, 11], [12, 13]], pad_id=0)
    rollout.score_sequences(b, ref=ref, policy=policy, dpo=None, chunk=2, entropy=True, temperature=0.7)
    assert counts == [0, 0]  # policy, then reference: none of the earlier logits alive when the next is made
