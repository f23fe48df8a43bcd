"""Tests for rto.losses: every expected number is worked out by hand in the comments."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rto.losses import (
    PREFERENCE_LOSSES,
    bradley_terry_loss,
    dpo_loss,
    policy_loss,
    sequence_logprob,
    value_loss,
)

NAN = float("nan")
LN = math.log


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=1e-6, rtol=1e-6)


# ---- PPO policy loss ---------------------------------------------------------------------------
# Five response tokens (clip = 0.2, so ratios are clipped to [0.8, 1.2]) and one padding slot:
#   token  ratio  A    -A*ratio   -A*clip(ratio)   max    clipped branch active?
#   a      1.5    +1   -1.5       -1.2             -1.2   yes
#   b      0.5    +1   -0.5       -0.8             -0.5   no
#   e      1.1    +1   -1.1       -1.1             -1.1   no (tie)
#   c      1.5    -2   +3.0       +2.4             +3.0   no
#   d      0.5    -2   +1.0       +1.6             +1.6   yes
# loss = (-1.2 - 0.5 - 1.1 + 3.0 + 1.6) / 5 = 1.8 / 5 = 0.36 ; clipfrac = 2 / 5 = 0.4
# ratio_mean = (1.5 + 0.5 + 1.1 + 1.5 + 0.5) / 5 = 5.1 / 5 = 1.02
OLD_LOGP = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, NAN]])
LOG_RATIO = torch.tensor([[LN(1.5), LN(0.5), LN(1.1)], [LN(1.5), LN(0.5), 0.0]])
ADV = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, NAN]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def ppo_inputs():
    logp = (OLD_LOGP.nan_to_num(0.0) + LOG_RATIO).clone()
    logp[1, 2] = NAN  # garbage in the padding slot
    return logp.requires_grad_(True)


def test_policy_loss_values_and_stats():
    loss, stats = policy_loss(ppo_inputs(), OLD_LOGP, ADV, MASK, clip=0.2)
    close(loss, 0.36)
    close(stats["clipfrac"], 0.4)
    close(stats["ratio_mean"], 1.02)
    # approx_kl = mean of 0.5 * log_ratio^2 over the five tokens
    approx_kl = 0.5 * (2 * LN(1.5) ** 2 + 2 * LN(0.5) ** 2 + LN(1.1) ** 2) / 5
    close(stats["approx_kl"], approx_kl)


def test_policy_loss_gradient():
    # d(-A * ratio)/d logp = -A * ratio on unclipped tokens, 0 where the clipped branch wins; / 5 tokens
    # a: 0 ; b: -1 * 0.5 / 5 = -0.1 ; e: -1 * 1.1 / 5 = -0.22 ; c: 2 * 1.5 / 5 = 0.6 ; d: 0 ; padding: 0
    logp = ppo_inputs()
    loss, _ = policy_loss(logp, OLD_LOGP, ADV, MASK, clip=0.2)
    loss.backward()
    close(logp.grad, [[0.0, -0.1, -0.22], [0.6, 0.0, 0.0]])


def test_policy_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="clip"):
        policy_loss(ppo_inputs(), OLD_LOGP, ADV, MASK, clip=0.0)
    with pytest.raises(ValueError, match=r"advantages \[2, 2\]"):  # the message lists every shape
        policy_loss(ppo_inputs(), OLD_LOGP, ADV[:, :2], MASK)


# ---- value loss --------------------------------------------------------------------------------
# clip 0.2:
#   v    old  R     (v-R)^2   v_clipped = old + clip(v-old)   (v_clipped-R)^2   max    clipped active?
#   1.0  0.5  2.0   1.0       0.5 + 0.2 = 0.7                 1.69              1.69   yes
#   2.0  2.0  1.0   1.0       2.0 + 0.0 = 2.0                 1.0               1.0    no (tie)
#   0.0  0.3  0.0   0.0       0.3 - 0.2 = 0.1                 0.01              0.01   yes
# loss = 0.5 * (1.69 + 1.0 + 0.01) / 3 = 0.5 * 0.9 = 0.45 ; vf_clipfrac = 2 / 3
VALUES = torch.tensor([[1.0, 2.0, 0.0, NAN]])
OLD_VALUES = torch.tensor([[0.5, 2.0, 0.3, 5.0]])
RETURNS = torch.tensor([[2.0, 1.0, 0.0, -3.0]])
VMASK = torch.tensor([[1.0, 1.0, 1.0, 0.0]])


def test_value_loss_clipped():
    values = VALUES.clone().requires_grad_(True)
    loss, stats = value_loss(values, OLD_VALUES, RETURNS, VMASK, clip=0.2)
    close(loss, 0.45)
    close(stats["vf_clipfrac"], 2 / 3)
    # gradient: 0.5 / 3 * d(max)/dv ; clipped branch wins on tokens 0 and 2 and is flat in v there
    # token 1 (tie, both branches equal 2 * (v - R) = 2): 0.5 / 3 * 2 = 1/3 ; padding 0
    loss.backward()
    close(values.grad, [[0.0, 1 / 3, 0.0, 0.0]])


def test_value_loss_unclipped():
    # clip=None: 0.5 * masked MSE = 0.5 * ((1 - 2)^2 + (2 - 1)^2 + (0 - 0)^2) / 3 = 1/3 (the clipped loss is 0.45)
    values = VALUES.clone().requires_grad_(True)
    loss, stats = value_loss(values, OLD_VALUES, RETURNS, VMASK, clip=None)
    close(loss, 1 / 3)
    close(stats["vf_clipfrac"], 0.0)
    # gradient of 0.5 * mean((v - R)^2) is (v - R) / 3 on every response token, also where clipping would cut it
    loss.backward()
    close(values.grad, [[-1 / 3, 1 / 3, 0.0, 0.0]])
    # the old values play no part without a clip
    far_old = OLD_VALUES + torch.tensor([[100.0, -100.0, 50.0, NAN]])
    close(value_loss(VALUES, far_old, RETURNS, VMASK, clip=None)[0], 1 / 3)


# ---- DPO and Bradley-Terry -----------------------------------------------------------------------
def test_dpo_loss_values_and_stats():
    # beta = 0.5.
    # pair 0: chosen 0.5 * (-10 - -12) = 1.0 ; rejected 0.5 * (-11 - -10) = -0.5 ; logit 1.5
    #         -log sigmoid(1.5) = log(1 + e^-1.5) = log(1.2231302) = 0.2014133
    # pair 1: chosen 0.5 * (-5 - -5) = 0.0 ; rejected 0.5 * (-4 - -6) = 1.0 ; logit -1.0
    #         -log sigmoid(-1) = log(1 + e) = log(3.7182818) = 1.3132617
    # loss = (0.2014133 + 1.3132617) / 2 = 0.7573375
    loss, stats = dpo_loss(
        torch.tensor([-10.0, -5.0]), torch.tensor([-11.0, -4.0]),
        torch.tensor([-12.0, -5.0]), torch.tensor([-10.0, -6.0]), beta=0.5,
    )
    close(loss, 0.7573375)
    close(stats["reward_chosen"], 0.5)  # (1.0 + 0.0) / 2
    close(stats["reward_rejected"], 0.25)  # (-0.5 + 1.0) / 2
    close(stats["reward_margin"], 0.25)  # (1.5 - 1.0) / 2
    close(stats["accuracy"], 0.5)


def test_dpo_loss_at_reference_is_log_two():
    # policy == reference: logit 0, -log sigmoid(0) = log 2 = 0.6931472
    logp = torch.tensor([-3.0, -7.0])
    loss, stats = dpo_loss(logp, logp, logp, logp)
    close(loss, 0.6931472)
    close(stats["accuracy"], 0.0)


def test_dpo_loss_is_stable_for_huge_logits():
    # logit = 0.1 * (1000 - -1000) = 200: loss = log(1 + e^-200) ~ 0 ; logit -200: loss ~ 200
    zero = torch.zeros(1)
    close(dpo_loss(torch.tensor([1000.0]), torch.tensor([-1000.0]), zero, zero)[0], 0.0)
    close(dpo_loss(torch.tensor([-1000.0]), torch.tensor([1000.0]), zero, zero)[0], 200.0)


def test_dpo_loss_gradient():
    # d/d pc of -log sigmoid(z), z = beta * (pc - rc - pr + rr): -beta * sigmoid(-z)
    # z = 0 -> -0.1 * 0.5 = -0.05 ; the rejected log-prob gets +0.05
    pc = torch.zeros(1, requires_grad=True)
    pr = torch.zeros(1, requires_grad=True)
    dpo_loss(pc, pr, torch.zeros(1), torch.zeros(1), beta=0.1)[0].backward()
    close(pc.grad, [-0.05])
    close(pr.grad, [0.05])


@pytest.mark.parametrize("beta", [0.0, -0.1, NAN])
def test_dpo_loss_rejects_nonpositive_beta(beta):
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, beta=beta)


def test_dpo_loss_rejects_dense_or_mismatched_inputs():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="per-sequence"):
        dpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"ref_rejected_logp \[3\]"):  # the message lists every shape
        dpo_loss(x, x, x, torch.zeros(3))


def test_preference_registry_dpo_entry_computes_dpo():
    # looked up by name, "dpo" is the sigmoid DPO loss: pair 1 of test_dpo_loss_values_and_stats alone,
    # beta 0.5: chosen 0.5 * (-5 - -5) = 0 ; rejected 0.5 * (-4 - -6) = 1 ; -log sigmoid(-1) = 1.3132617
    loss, stats = PREFERENCE_LOSSES["dpo"](
        torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-5.0]), torch.tensor([-6.0]), beta=0.5
    )
    close(loss, 1.3132617)
    close(stats["reward_margin"], -1.0)
    close(stats["accuracy"], 0.0)


def test_bradley_terry_loss():
    # margins 2 - 1 = 1 and 0 - 1 = -1: (log(1 + e^-1) + log(1 + e)) / 2 = (0.3132617 + 1.3132617) / 2
    loss, stats = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    close(loss, 0.8132617)
    close(stats["accuracy"], 0.5)
    close(stats["margin"], 0.0)


def test_sequence_logprob():
    # row 0: -1 + -2 (padding garbage ignored) = -3 ; row 1: 3 * -0.5 = -1.5
    token_logp = torch.tensor([[-1.0, -2.0, NAN], [-0.5, -0.5, -0.5]])
    close(sequence_logprob(token_logp, torch.tensor([[1, 1, 0], [1, 1, 1]])), [-3.0, -1.5])


# ---- properties ------------------------------------------------------------------------------
@st.composite
def dense_batches(draw):
    batch = draw(st.integers(1, 4))
    length = draw(st.integers(1, 8))
    lengths = draw(st.lists(st.integers(1, length), min_size=batch, max_size=batch))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mask = torch.arange(length) < torch.tensor(lengths).unsqueeze(1)
    a, b, c = (torch.randn(batch, length, generator=gen, dtype=torch.float64) for _ in range(3))
    return a, b, c, mask


@settings(max_examples=50, deadline=None)
@given(dense_batches(), st.floats(0.05, 0.5))
def test_policy_loss_on_policy_is_minus_mean_advantage(batch, clip):
    # ratio = 1 everywhere: loss = -mean(A), nothing clipped, no KL
    logp, advantages, _, mask = batch
    loss, stats = policy_loss(logp, logp, advantages, mask, clip=clip)
    zero = torch.zeros_like(advantages)
    torch.testing.assert_close(loss, -torch.where(mask, advantages, zero).sum() / mask.sum())
    assert stats["clipfrac"] == 0 and stats["approx_kl"] == 0
    torch.testing.assert_close(stats["ratio_mean"], torch.tensor(1.0, dtype=logp.dtype))


@settings(max_examples=50, deadline=None)
@given(dense_batches())
def test_value_loss_with_huge_clip_equals_unclipped(batch):
    values, old_values, returns, mask = batch
    clipped, _ = value_loss(values, old_values, returns, mask, clip=1e9)
    unclipped, _ = value_loss(values, old_values, returns, mask, clip=None)
    torch.testing.assert_close(clipped, unclipped)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-50, 50), min_size=1, max_size=6), st.floats(0.01, 2.0))
def test_dpo_swapping_chosen_and_rejected(log_ratio_diffs, beta):
    # -log sigmoid(-z) - (-log sigmoid(z)) = z, so loss(swapped) - loss = mean(z), z = beta * diff
    diff = torch.tensor(log_ratio_diffs, dtype=torch.float64)
    zero = torch.zeros_like(diff)
    loss, _ = dpo_loss(diff, zero, zero, zero, beta=beta)
    swapped, _ = dpo_loss(zero, diff, zero, zero, beta=beta)
    torch.testing.assert_close(swapped - loss, beta * diff.mean())
