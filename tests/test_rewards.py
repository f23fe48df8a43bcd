"""Tests for rto.rewards: every expected number is worked out by hand in the comments."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rto.rewards import (
    GRANULARITIES,
    KL_ESTIMATORS,
    delayed_rewards,
    dpo_token_reward,
    kl_penalty,
    last_token_index,
    place_dpo_reward,
    place_on_last_token,
    sentence_ends,
    sentence_rewards,
    sequence_kl,
    shaping_rewards,
    token_rewards,
)

NAN = float("nan")


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=1e-6, rtol=1e-6)


# ---- KL estimators ---------------------------------------------------------------------------
# logp = [-1.0, -2.0], logp_ref = [-1.5, -1.0]  ->  logp - logp_ref = [0.5, -1.0]
LOGP = torch.tensor([-1.0, -2.0])
LOGP_REF = torch.tensor([-1.5, -1.0])


def test_kl_k1_is_log_ratio():
    close(kl_penalty(LOGP, LOGP_REF, "k1"), [0.5, -1.0])


def test_kl_k2_is_half_squared_log_ratio():
    # 0.5 * 0.5^2 = 0.125 ; 0.5 * (-1)^2 = 0.5
    close(kl_penalty(LOGP, LOGP_REF, "k2"), [0.125, 0.5])


def test_kl_k3():
    # d = logp_ref - logp = [-0.5, 1.0]
    # exp(-0.5) - 1 + 0.5 = 0.6065307 - 0.5 = 0.1065307 ; exp(1) - 1 - 1 = 2.7182818 - 2 = 0.7182818
    close(kl_penalty(LOGP, LOGP_REF, "k3"), [0.1065307, 0.7182818])


@pytest.mark.parametrize("name, expected", [
    ("k1", [0.5, -1.0]),  # log-ratio
    ("k2", [0.125, 0.5]),  # 0.5 * log-ratio^2
    ("k3", [0.1065307, 0.7182818]),  # exp(d) - 1 - d, d = logp_ref - logp = [-0.5, 1.0]
])
def test_kl_registry_entries_compute_their_estimator(name, expected):
    close(KL_ESTIMATORS[name](LOGP, LOGP_REF), expected)


def test_kl_default_is_k1():
    close(kl_penalty(LOGP, LOGP_REF), [0.5, -1.0])
    close(token_rewards(LOGP[None], LOGP_REF[None], torch.ones(1, 2), beta_kl=1.0), [[-0.5, 1.0]])


def test_kl_unknown_estimator_lists_valid_names():
    with pytest.raises(ValueError, match="k1.*k2.*k3"):
        kl_penalty(LOGP, LOGP_REF, "k4")


# ---- DPO token reward ------------------------------------------------------------------------
def test_dpo_token_reward_scaled_and_clipped():
    logp_dpo = torch.tensor([-1.0, -3.0, -2.0])
    logp_ref = torch.tensor([-2.0, -2.0, -2.0])
    # beta * (dpo - ref) = 0.1 * [1, -1, 0] = [0.1, -0.1, 0.0]
    close(dpo_token_reward(logp_dpo, logp_ref, beta_dpo=0.1), [0.1, -0.1, 0.0])
    # clipped to +-0.05
    close(dpo_token_reward(logp_dpo, logp_ref, beta_dpo=0.1, clip=0.05), [0.05, -0.05, 0.0])


def test_dpo_token_reward_rejects_nonpositive_clip():
    with pytest.raises(ValueError, match="None"):
        dpo_token_reward(LOGP, LOGP_REF, beta_dpo=0.1, clip=0.0)


# ---- last token ------------------------------------------------------------------------------
def test_last_token_index_float_and_bool_masks():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    # last 1 of each row: positions 2, 0, 3
    assert last_token_index(mask).tolist() == [2, 0, 3]
    assert last_token_index(mask.bool()).tolist() == [2, 0, 3]


def test_last_token_index_empty_row_raises():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match=r"\[1\]"):
        last_token_index(mask)


def test_place_on_last_token():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    close(place_on_last_token(torch.tensor([2.0, -1.0]), mask), [[0.0, 2.0, 0.0], [0.0, 0.0, -1.0]])


# ---- token_rewards (eq. 4.7) -----------------------------------------------------------------
# Row 0 has two response tokens (position 2 is padding, filled with garbage); row 1 has three.
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
POLICY = torch.tensor([[-1.0, -2.0, NAN], [-0.5, -1.0, -1.5]])
REF = torch.tensor([[-1.5, -1.0, 7.0], [-0.5, -2.0, -1.0]])
DPO = torch.tensor([[-0.5, -1.5, NAN], [-1.5, -1.0, -0.5]])
RM = torch.tensor([1.0, -3.0])
# Per token, with beta_dpo = 0.1, beta_kl = 0.1, beta_rm = 0.5:
#   dpo - ref  = [[1.0, -0.5], [-1.0, 1.0, 0.5]]  -> beta_dpo * . = [[0.1, -0.05], [-0.1, 0.1, 0.05]]
#   policy-ref = [[0.5, -1.0], [ 0.0, 1.0, -0.5]] -> -beta_kl * . = [[-0.05, 0.1], [0.0, -0.1, 0.05]]
#   last token: row 0 at t=1, row 1 at t=2
KW = dict(logp_dpo=DPO, rm_score=RM, beta_dpo=0.1, beta_kl=0.1, beta_rm=0.5)


def test_token_rewards_full_rto_with_clips():
    # dpo_clip 0.08 -> [[0.08, -0.05], [-0.08, 0.08, 0.05]]; rm_clip 2 -> rm = 0.5 * [1, -2] = [0.5, -1.0]
    # row 0: 0.08 - 0.05 = 0.03 ; -0.05 + 0.1 + 0.5 = 0.55 ; pad 0
    # row 1: -0.08 + 0 = -0.08 ; 0.08 - 0.1 = -0.02 ; 0.05 + 0.05 - 1.0 = -0.9
    rewards = token_rewards(POLICY, REF, MASK, **KW, dpo_clip=0.08, rm_clip=2.0)
    close(rewards, [[0.03, 0.55, 0.0], [-0.08, -0.02, -0.9]])


def test_token_rewards_without_clips():
    # row 0: 0.1 - 0.05 = 0.05 ; -0.05 + 0.1 + 0.5 * 1 = 0.55
    # row 1: -0.1 + 0 = -0.1 ; 0.1 - 0.1 = 0.0 ; 0.05 + 0.05 + 0.5 * (-3) = -1.4
    rewards = token_rewards(POLICY, REF, MASK, **KW, dpo_clip=None, rm_clip=None)
    close(rewards, [[0.05, 0.55, 0.0], [-0.1, 0.0, -1.4]])


def test_token_rewards_classic_sparse_ppo_without_dpo_model():
    # KL term + RM on the last token only: row 0: -0.05 ; 0.1 + 0.5 = 0.6
    # row 1: 0.0 ; -0.1 ; 0.05 + 0.5 * clip(-3, +-2) = 0.05 - 1.0 = -0.95
    rewards = token_rewards(POLICY, REF, MASK, rm_score=RM, beta_kl=0.1, beta_rm=0.5, rm_clip=2.0)
    close(rewards, [[-0.05, 0.6, 0.0], [0.0, -0.1, -0.95]])


def test_token_rewards_kl_only():
    # no DPO model, no RM: -0.1 * (policy - ref)
    close(token_rewards(POLICY, REF, MASK, beta_kl=0.1), [[-0.05, 0.1, 0.0], [0.0, -0.1, 0.05]])


def test_beta_zero_switches_a_term_off_and_never_means_unscaled():
    no_dpo = token_rewards(POLICY, REF, MASK, rm_score=RM, beta_kl=0.1, beta_rm=0.5, dpo_clip=None)
    close(token_rewards(POLICY, REF, MASK, **{**KW, "beta_dpo": 0.0}, dpo_clip=None), no_dpo)
    # beta_kl = 0, beta_rm = 0: only the (unclipped) DPO term is left: [[0.1, -0.05], [-0.1, 0.1, 0.05]]
    only_dpo = token_rewards(POLICY, REF, MASK, **{**KW, "beta_kl": 0.0, "beta_rm": 0.0}, dpo_clip=None)
    close(only_dpo, [[0.1, -0.05, 0.0], [-0.1, 0.1, 0.05]])


@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_token_rewards_refuse_biased_kl_estimators(estimator):
    # as a reward only k1 gives the gradient of -beta_kl * KL; k2 and k3 are refused, naming the estimator
    with pytest.raises(ValueError, match=f"k1 estimator, got '{estimator}'"):
        token_rewards(POLICY, REF, MASK, beta_kl=0.1, kl_estimator=estimator)


def test_token_rewards_dpo_term_uses_the_temperature_one_reference():
    # logp_ref_t1 = REF - 0.5 on the response tokens: every DPO log-ratio grows by 0.5, so with beta_dpo 0.1
    # and no clips each response token gains 0.05 over test_token_rewards_without_clips; the KL term still
    # uses REF (the sampling-temperature reference): [[0.05, 0.55], [-0.1, 0.0, -1.4]] + 0.05
    ref_t1 = torch.where(MASK.bool(), REF - 0.5, torch.full_like(REF, NAN))
    rewards = token_rewards(POLICY, REF, MASK, **KW, logp_ref_t1=ref_t1, dpo_clip=None, rm_clip=None)
    close(rewards, [[0.1, 0.6, 0.0], [-0.05, 0.05, -1.35]])
    # given as logp_ref itself, it changes nothing
    close(token_rewards(POLICY, REF, MASK, **KW, logp_ref_t1=REF, dpo_clip=None, rm_clip=None),
          token_rewards(POLICY, REF, MASK, **KW, dpo_clip=None, rm_clip=None))


def test_token_rewards_bool_mask_same_as_float():
    close(token_rewards(POLICY, REF, MASK.bool(), **KW), token_rewards(POLICY, REF, MASK, **KW))


def test_token_rewards_paper_defaults():
    # beta_dpo 0.05, dpo_clip 0.05, beta_kl 0.01, beta_rm 1, rm_clip 10; one token, log-ratio 2 nats:
    # 0.05 * 2 = 0.1 -> clip 0.05 ; KL: -0.01 * (-1.0 - -1.5) = -0.005 ; rm clip(12) = 10
    # total = 0.05 - 0.005 + 10 = 10.045
    rewards = token_rewards(
        torch.tensor([[-1.0]]), torch.tensor([[-1.5]]), torch.tensor([[1]]),
        logp_dpo=torch.tensor([[0.5]]), rm_score=torch.tensor([12.0]),
    )
    close(rewards, [[10.045]])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        # shape errors list every tensor's shape: match the offending one with its shape
        (dict(logp_ref=REF[:, :2]), r"logp_ref \[2, 2\]"),
        (dict(mask=MASK[:1]), r"mask \[1, 3\]"),
        (dict(logp_dpo=DPO[:, :2]), r"logp_dpo \[2, 2\]"),
        (dict(rm_score=torch.ones(3)), "per-sequence"),
        (dict(rm_score=torch.ones(2, 1)), "per-sequence"),
        (dict(beta_dpo=NAN), "beta_dpo"),
        (dict(beta_kl=math.inf), "beta_kl"),
        (dict(beta_rm=-math.inf), "beta_rm"),
        (dict(kl_estimator="kl"), "k1"),
        (dict(logp_dpo=DPO, dpo_clip=-0.05), "clip"),
    ],
)
def test_token_rewards_fails_loudly(kwargs, match):
    args = {"logp_ref": REF, "mask": MASK, **kwargs}
    with pytest.raises(ValueError, match=match):
        token_rewards(POLICY, args.pop("logp_ref"), args.pop("mask"), **args)


# ---- granularity of the DPO term ---------------------------------------------------------------
# Row 0 has 4 response tokens, row 1 has 3; the padding holds garbage (and a sentence end that must not count).
G_MASK = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
G_DENSE = torch.tensor([[0.5, 0.25, -1.0, 2.0, NAN], [1.0, -0.5, 0.75, 9.0, NAN]])
G_ENDS = torch.tensor([[0, 1, 0, 0, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)


def test_sentence_rewards_sum_each_sentence_onto_its_last_token():
    # row 0: sentences end at t=1 (marked) and t=3 (the last token): 0.5 + 0.25 = 0.75 ; -1.0 + 2.0 = 1.0
    # row 1: ends at t=0 (marked) and t=2 (last): 1.0 ; -0.5 + 0.75 = 0.25
    close(sentence_rewards(G_DENSE, G_MASK, G_ENDS), [[0.0, 0.75, 0.0, 1.0, 0.0], [1.0, 0.0, 0.25, 0.0, 0.0]])
    # no marked end: one sentence, the whole response (= delayed): 1.75 at t=3 ; 1.25 at t=2
    no_ends = torch.zeros_like(G_ENDS)
    close(sentence_rewards(G_DENSE, G_MASK, no_ends), [[0.0, 0.0, 0.0, 1.75, 0.0], [0.0, 0.0, 1.25, 0.0, 0.0]])
    # every token an end: each token its own sentence (= token granularity, masked)
    close(sentence_rewards(G_DENSE, G_MASK, torch.ones_like(G_ENDS)),
          [[0.5, 0.25, -1.0, 2.0, 0.0], [1.0, -0.5, 0.75, 0.0, 0.0]])


def test_delayed_rewards_put_the_whole_sum_on_the_last_token():
    # row 0: 0.5 + 0.25 - 1.0 + 2.0 = 1.75 at t=3 ; row 1: 1.0 - 0.5 + 0.75 = 1.25 at t=2
    close(delayed_rewards(G_DENSE, G_MASK), [[0.0, 0.0, 0.0, 1.75, 0.0], [0.0, 0.0, 1.25, 0.0, 0.0]])


def test_shaping_rewards_take_the_sum_off_at_the_last_token():
    # row 0: last token 2.0 - 1.75 = 0.25 ; row 1: 0.75 - 1.25 = -0.5 ; each row then sums to 0
    shaped = shaping_rewards(G_DENSE, G_MASK)
    close(shaped, [[0.5, 0.25, -1.0, 0.25, 0.0], [1.0, -0.5, -0.5, 0.0, 0.0]])
    close(shaped.sum(1), [0.0, 0.0])


def test_place_dpo_reward_dispatches_by_name():
    masked = torch.where(G_MASK.bool(), G_DENSE, torch.zeros_like(G_DENSE))
    close(place_dpo_reward(masked, G_MASK, "token"), masked)
    close(place_dpo_reward(G_DENSE, G_MASK, "sentence", G_ENDS), sentence_rewards(G_DENSE, G_MASK, G_ENDS))
    close(place_dpo_reward(G_DENSE, G_MASK, "delayed"), delayed_rewards(G_DENSE, G_MASK))
    close(place_dpo_reward(G_DENSE, G_MASK, "shaping"), shaping_rewards(G_DENSE, G_MASK))
    with pytest.raises(ValueError, match="sentence ends"):
        place_dpo_reward(G_DENSE, G_MASK, "sentence")
    with pytest.raises(ValueError, match="token, sentence, delayed, shaping"):
        place_dpo_reward(G_DENSE, G_MASK, "paragraph")


def test_sentence_ends_from_decoded_pieces():
    pieces = [["Good", " day", ".", " Is", " it", "?"], ["Yes", "\n", "3.5", "!"], ["Hm"]]
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]])
    # '.', '?', a newline, '!' end a sentence; so does the '.' of "3.5" (a rule on text only); the last token
    # is not marked here (sentence_rewards always ends a sentence there)
    expected = [[0, 0, 1, 0, 0, 1], [0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]]
    assert sentence_ends(pieces, mask).tolist() == [[bool(x) for x in row] for row in expected]
    with pytest.raises(ValueError, match="do not fit"):
        sentence_ends(pieces[:2], mask)


# token_rewards with each granularity, on POLICY / REF / DPO / MASK / RM with KW and no clips:
#   DPO term = [[0.1, -0.05], [-0.1, 0.1, 0.05]], KL term = [[-0.05, 0.1], [0.0, -0.1, 0.05]],
#   RM term  = 0.5 * [1, -3] on the last tokens = [[0, 0.5], [0, 0, -1.5]]
@pytest.mark.parametrize("granularity, ends, dpo, total", [
    ("token", None, [[0.1, -0.05, 0.0], [-0.1, 0.1, 0.05]], [[0.05, 0.55, 0.0], [-0.1, 0.0, -1.4]]),
    # row 0: t=0 is marked, t=1 is the last token: the same as token; row 1: one sentence, sum 0.05 at t=2
    ("sentence", [[1, 0, 0], [0, 0, 0]], [[0.1, -0.05, 0.0], [0.0, 0.0, 0.05]],
     [[0.05, 0.55, 0.0], [0.0, -0.1, -1.4]]),
    # sums 0.05 (row 0, at t=1) and 0.05 (row 1, at t=2)
    ("delayed", None, [[0.0, 0.05, 0.0], [0.0, 0.0, 0.05]], [[-0.05, 0.65, 0.0], [0.0, -0.1, -1.4]]),
    # last tokens: -0.05 - 0.05 = -0.1 ; 0.05 - 0.05 = 0; totals sum to RM - KL per row: 0.55 and -1.55
    ("shaping", None, [[0.1, -0.1, 0.0], [-0.1, 0.1, 0.0]], [[0.05, 0.5, 0.0], [-0.1, 0.0, -1.45]]),
])
def test_token_rewards_per_granularity(granularity, ends, dpo, total):
    ends = None if ends is None else torch.tensor(ends, dtype=torch.bool)
    kw = dict(**KW, dpo_clip=None, rm_clip=None, granularity=granularity, sentence_ends=ends)
    rewards = token_rewards(POLICY, REF, MASK, **kw)
    close(rewards, total)
    terms = token_rewards(POLICY, REF, MASK, **kw, per_term=True)
    assert terms.shape == (3, 2, 3)
    close(terms[0], dpo)
    close(terms[1], [[-0.05, 0.1, 0.0], [0.0, -0.1, 0.05]])  # -beta_kl * (log pi - log pi_ref)
    close(terms[2], [[0.0, 0.5, 0.0], [0.0, 0.0, -1.5]])  # beta_rm * rm on the last token
    assert torch.equal(terms[0] + terms[1] + terms[2], rewards)


def test_token_rewards_refuse_an_unknown_granularity_and_sentences_without_ends():
    with pytest.raises(ValueError, match="valid: token, sentence, delayed, shaping"):
        token_rewards(POLICY, REF, MASK, **KW, granularity="word")
    with pytest.raises(ValueError, match="sentence ends"):
        token_rewards(POLICY, REF, MASK, **KW, granularity="sentence")


def test_sequence_kl():
    # row 0: 0.5 + (-1.0) = -0.5 (padding garbage ignored) ; row 1: 0.0 + 1.0 - 0.5 = 0.5
    close(sequence_kl(POLICY, REF, MASK), [-0.5, 0.5])


# ---- properties ------------------------------------------------------------------------------
@st.composite
def rollouts(draw):
    """Random dense log-probs [B, T] with right-padded masks and NaN/huge garbage in the padding."""
    batch = draw(st.integers(1, 4))
    length = draw(st.integers(1, 8))
    lengths = draw(st.lists(st.integers(1, length), min_size=batch, max_size=batch))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mask = torch.arange(length) < torch.tensor(lengths).unsqueeze(1)
    garbage = draw(st.sampled_from([NAN, 1e30, -7.0]))

    def logps() -> torch.Tensor:
        x = -torch.rand(batch, length, generator=gen, dtype=torch.float64) * 5
        return torch.where(mask, x, torch.full_like(x, garbage))

    rm_score = torch.randn(batch, generator=gen, dtype=torch.float64) * 3
    return logps(), logps(), logps(), rm_score, mask


@settings(max_examples=60, deadline=None)
@given(rollouts())
def test_rewards_are_zero_outside_mask(rollout):
    logp, logp_ref, logp_dpo, rm_score, mask = rollout
    rewards = token_rewards(logp, logp_ref, mask, logp_dpo=logp_dpo, rm_score=rm_score)
    assert torch.isfinite(rewards).all()
    assert (rewards[~mask] == 0).all()


@settings(max_examples=60, deadline=None)
@given(rollouts(), st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.floats(0.0, 2.0))
def test_unclipped_rewards_sum_to_sentence_level_terms(rollout, beta_dpo, beta_kl, beta_rm):
    # Telescoping: sum_t r_t = beta_dpo * log(pi_dpo/pi_ref)(y) - beta_kl * log(pi/pi_ref)(y) + beta_rm * rm
    logp, logp_ref, logp_dpo, rm_score, mask = rollout
    rewards = token_rewards(
        logp, logp_ref, mask, logp_dpo=logp_dpo, rm_score=rm_score,
        beta_dpo=beta_dpo, beta_kl=beta_kl, beta_rm=beta_rm, dpo_clip=None, rm_clip=None,
    )
    zero = torch.zeros_like(logp)
    dpo_sum = torch.where(mask, logp_dpo - logp_ref, zero).sum(1)
    kl_sum = torch.where(mask, logp - logp_ref, zero).sum(1)
    expected = beta_dpo * dpo_sum - beta_kl * kl_sum + beta_rm * rm_score
    torch.testing.assert_close(rewards.sum(1), expected)


@settings(max_examples=60, deadline=None)
@given(rollouts(), st.sampled_from(GRANULARITIES), st.integers(0, 2**31 - 1))
def test_granularity_keeps_each_response_total_except_shaping(rollout, granularity, seed):
    # token, sentence and delayed move the DPO term within a response and keep its sum; shaping makes it 0
    logp, logp_ref, logp_dpo, rm_score, mask = rollout
    ends = torch.rand(mask.shape, generator=torch.Generator().manual_seed(seed)) < 0.3
    kw = dict(logp_dpo=logp_dpo, rm_score=rm_score, dpo_clip=None, sentence_ends=ends, per_term=True)
    dense = token_rewards(logp, logp_ref, mask, **kw)[0]
    placed = token_rewards(logp, logp_ref, mask, **kw, granularity=granularity)[0]
    assert torch.isfinite(placed).all() and (placed[~mask] == 0).all()
    expected = torch.zeros(mask.shape[0], dtype=placed.dtype) if granularity == "shaping" else dense.sum(1)
    torch.testing.assert_close(placed.sum(1), expected)


@settings(max_examples=40, deadline=None)
@given(rollouts())
def test_k2_and_k3_are_nonnegative(rollout):
    logp, logp_ref, _, _, mask = rollout
    for estimator in ("k2", "k3"):
        assert (kl_penalty(logp[mask], logp_ref[mask], estimator) >= 0).all()


def test_adaptive_kl_coef_by_hand():
    from rto.rewards import adaptive_kl_coef

    # KL twice the target: error clipped to +0.2; 0.1 * (1 + 0.2 * 100 / 1000) = 0.102
    assert adaptive_kl_coef(0.1, 12.0, 6.0, 1000, 100) == pytest.approx(0.102)
    # KL at half the target: error -0.5 clipped to -0.2 -> 0.1 * (1 - 0.02) = 0.098
    assert adaptive_kl_coef(0.1, 3.0, 6.0, 1000, 100) == pytest.approx(0.098)
    # within the band: 6.6 / 6 - 1 = 0.1 -> 0.1 * (1 + 0.1 * 0.5) = 0.105
    assert adaptive_kl_coef(0.1, 6.6, 6.0, 200, 100) == pytest.approx(0.105)
    with pytest.raises(ValueError, match="target_kl and horizon must be > 0"):
        adaptive_kl_coef(0.1, 1.0, 0.0, 10, 1)
    with pytest.raises(ValueError, match="target_kl and horizon must be > 0"):
        adaptive_kl_coef(0.1, 1.0, 6.0, 0, 1)
