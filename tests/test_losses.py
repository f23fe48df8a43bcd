"""Tests for rto.losses: every expected number is worked out by hand in the comments."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rto.losses import (
    PREFERENCE_LOSSES,
    PairScores,
    bradley_terry_loss,
    dpo_loss,
    ipo_loss,
    policy_loss,
    rdpo_loss,
    sequence_logprob,
    sequential_kl,
    simpo_loss,
    tdpo1_loss,
    tdpo2_loss,
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
    entry = PREFERENCE_LOSSES["dpo"]
    scores = PairScores(policy_chosen_logp=torch.tensor([-5.0]), policy_rejected_logp=torch.tensor([-4.0]),
                        chosen_length=torch.tensor([3.0]), rejected_length=torch.tensor([2.0]),
                        ref_chosen_logp=torch.tensor([-5.0]), ref_rejected_logp=torch.tensor([-6.0]))
    loss, stats = entry(scores, **entry.hyperparameters(beta=0.5))
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


# ---- the DPO family: IPO, R-DPO, SimPO, TDPO1/2 and the sequential KL ------------------------------
# Two pairs shared by the tests below (as in test_dpo_loss_values_and_stats):
#   log-ratios to the reference: chosen -10 - -12 = 2 and -5 - -5 = 0 ; rejected -11 - -10 = -1 and -4 - -6 = 2
#   so h = (chosen - rejected) = 3 and -2
PC, PR = torch.tensor([-10.0, -5.0]), torch.tensor([-11.0, -4.0])
RC, RR = torch.tensor([-12.0, -5.0]), torch.tensor([-10.0, -6.0])


def test_ipo_loss_values_and_stats():
    # beta 0.5: target 1 / (2 * 0.5) = 1 ; (3 - 1)^2 = 4 ; (-2 - 1)^2 = 9 ; loss (4 + 9) / 2 = 6.5
    loss, stats = ipo_loss(PC, PR, RC, RR, beta=0.5)
    close(loss, 6.5)
    # rewards beta * log-ratio, as dpo_loss: chosen (1.0 + 0.0) / 2, rejected (-0.5 + 1.0) / 2
    close(stats["reward_chosen"], 0.5)
    close(stats["reward_rejected"], 0.25)
    close(stats["reward_margin"], 0.25)
    close(stats["accuracy"], 0.5)


def test_ipo_loss_gradient_and_minimum():
    # d/d chosen of mean((h - 1)^2) = 2 * (h - 1) / 2 = h - 1 = 2 and -3 ; the rejected side gets the opposite
    pc, pr = PC.clone().requires_grad_(True), PR.clone().requires_grad_(True)
    ipo_loss(pc, pr, RC, RR, beta=0.5)[0].backward()
    close(pc.grad, [2.0, -3.0])
    close(pr.grad, [-2.0, 3.0])
    # h is summed over the response, not divided by its length: h = 2 = 1 / (2 * 0.25) is the minimum, loss 0
    close(ipo_loss(torch.tensor([-8.0]), torch.tensor([-10.0]), torch.tensor([-9.0]), torch.tensor([-9.0]),
                   beta=0.25)[0], 0.0)
    # at the reference (h = 0), beta 0.1: (0 - 5)^2 = 25
    zero = torch.zeros(1)
    close(ipo_loss(zero, zero, zero, zero, beta=0.1)[0], 25.0)


def test_rdpo_loss_values_and_stats():
    # beta 0.5, alpha 0.1 ; lengths chosen 10, 3 ; rejected 4, 8
    # pair 0: r_chosen 0.5 * 2 - 0.1 * 10 = 0.0 ; r_rejected 0.5 * -1 - 0.1 * 4 = -0.9 ; logit 0.9
    #         (= DPO logit 1.5 - 0.1 * (10 - 4)) ; -log sigmoid(0.9) = log(1 + e^-0.9) = 0.3411539
    # pair 1: r_chosen 0 - 0.3 = -0.3 ; r_rejected 0.5 * 2 - 0.8 = 0.2 ; logit -0.5
    #         (= -1.0 - 0.1 * (3 - 8)) ; -log sigmoid(-0.5) = log(1 + e^0.5) = 0.9740770
    # loss (0.3411539 + 0.9740770) / 2 = 0.6576154
    loss, stats = rdpo_loss(PC, PR, RC, RR, torch.tensor([10.0, 3.0]), torch.tensor([4.0, 8.0]), beta=0.5, alpha=0.1)
    close(loss, 0.6576154)
    close(stats["reward_chosen"], -0.15)  # (0.0 - 0.3) / 2
    close(stats["reward_rejected"], -0.35)  # (-0.9 + 0.2) / 2
    close(stats["reward_margin"], 0.2)  # (0.9 - 0.5) / 2
    close(stats["accuracy"], 0.5)


def test_rdpo_loss_without_length_term_is_dpo_and_penalises_length():
    lengths_w, lengths_l = torch.tensor([10.0, 3.0]), torch.tensor([4.0, 8.0])
    close(rdpo_loss(PC, PR, RC, RR, lengths_w, lengths_l, beta=0.5, alpha=0.0)[0],
          dpo_loss(PC, PR, RC, RR, beta=0.5)[0])
    # a longer chosen response (all else equal) lowers the logit, so raises the loss
    shorter = rdpo_loss(PC, PR, RC, RR, lengths_w, lengths_l)[0]
    longer = rdpo_loss(PC, PR, RC, RR, lengths_w + 50, lengths_l)[0]
    assert longer > shorter
    with pytest.raises(ValueError, match="alpha"):
        rdpo_loss(PC, PR, RC, RR, lengths_w, lengths_l, alpha=-0.1)


def test_simpo_loss_values_and_stats():
    # beta 2, gamma 0.5, no reference:
    # pair 0: r_chosen 2 / 5 * -10 = -4 ; r_rejected 2 / 4 * -12 = -6 ; logit -4 + 6 - 0.5 = 1.5
    #         -log sigmoid(1.5) = log(1 + e^-1.5) = 0.2014133
    # pair 1: r_chosen 2 / 3 * -6 = -4 ; r_rejected 2 / 2 * -3 = -3 ; logit -1 - 0.5 = -1.5
    #         -log sigmoid(-1.5) = log(1 + e^1.5) = 1.7014133
    # loss (0.2014133 + 1.7014133) / 2 = 0.9514133
    loss, stats = simpo_loss(torch.tensor([-10.0, -6.0]), torch.tensor([-12.0, -3.0]), torch.tensor([5.0, 3.0]),
                             torch.tensor([4.0, 2.0]), beta=2.0, gamma=0.5)
    close(loss, 0.9514133)
    close(stats["reward_chosen"], -4.0)  # (-4 - 4) / 2
    close(stats["reward_rejected"], -4.5)  # (-6 - 3) / 2
    close(stats["reward_margin"], 0.5)  # (2 - 1) / 2: gamma is not part of it
    close(stats["accuracy"], 0.5)


def test_simpo_loss_gradient_and_checks():
    # beta 1, gamma 0: r_chosen 1 / 2 * -2 = -1 = r_rejected 1 / 3 * -3 ; logit 0 ; loss log 2
    # d/d log pi(y_w) = -(beta / |y_w|) * sigmoid(0) = -0.25 ; d/d log pi(y_l) = +(1 / 3) * 0.5 = 1/6
    pc, pr = torch.tensor([-2.0], requires_grad=True), torch.tensor([-3.0], requires_grad=True)
    loss, _ = simpo_loss(pc, pr, torch.tensor([2.0]), torch.tensor([3.0]), beta=1.0, gamma=0.0)
    close(loss, LN(2))
    loss.backward()
    close(pc.grad, [-0.25])
    close(pr.grad, [1 / 6])
    one = torch.ones(1)
    with pytest.raises(ValueError, match="gamma"):
        simpo_loss(one, one, one, one, gamma=NAN)
    with pytest.raises(ValueError, match="at least one token"):
        simpo_loss(one, one, torch.zeros(1), one)


KL_W, KL_L = torch.tensor([0.2, 0.5]), torch.tensor([1.2, 0.5])


def test_tdpo1_loss_values_and_stats():
    # beta 0.5 ; sequential KL chosen 0.2, 0.5 ; rejected 1.2, 0.5 ; delta/beta = rejected - chosen = 1.0, 0.0
    # pair 0: 0.5 * (3 - 1.0) = 1.0 ; pair 1: 0.5 * (-2 - 0.0) = -1.0
    # loss (log(1 + e^-1) + log(1 + e)) / 2 = (0.3132617 + 1.3132617) / 2 = 0.8132617
    loss, stats = tdpo1_loss(PC, PR, RC, RR, KL_W, KL_L, beta=0.5)
    close(loss, 0.8132617)
    # rewards beta * (log-ratio + KL): chosen 0.5 * (2 + 0.2) = 1.1 and 0.5 * (0 + 0.5) = 0.25 ;
    # rejected 0.5 * (-1 + 1.2) = 0.1 and 0.5 * (2 + 0.5) = 1.25 ; their differences are the logits 1.0, -1.0
    close(stats["reward_chosen"], 0.675)
    close(stats["reward_rejected"], 0.675)
    close(stats["reward_margin"], 0.0)
    close(stats["accuracy"], 0.5)
    close(stats["seq_kl_chosen"], 0.35)
    close(stats["seq_kl_rejected"], 0.85)
    # no sequential KL at all: TDPO1 is DPO
    zero = torch.zeros(2)
    close(tdpo1_loss(PC, PR, RC, RR, zero, zero, beta=0.5)[0], dpo_loss(PC, PR, RC, RR, beta=0.5)[0])


def test_tdpo2_loss_values_and_stats():
    # beta 0.5, alpha 0.5: pair 0: 0.5 * (3 - 0.5 * 1.0) = 1.25 ; pair 1: 0.5 * (-2 - 0) = -1.0
    # loss (log(1 + e^-1.25) + log(1 + e)) / 2 = (0.2519291 + 1.3132617) / 2 = 0.7825954
    loss, stats = tdpo2_loss(PC, PR, RC, RR, KL_W, KL_L, beta=0.5, alpha=0.5)
    close(loss, 0.7825954)
    # rewards beta * (log-ratio + alpha * KL): chosen 0.5 * (2 + 0.1) = 1.05 and 0.5 * (0 + 0.25) = 0.125
    # rejected 0.5 * (-1 + 0.6) = -0.2 and 0.5 * (2 + 0.25) = 1.125
    close(stats["reward_chosen"], 0.5875)
    close(stats["reward_rejected"], 0.4625)
    close(stats["reward_margin"], 0.125)  # (1.25 - 1.0) / 2
    close(stats["accuracy"], 0.5)


def test_tdpo_gradients_and_stop_gradient_on_the_chosen_kl():
    # at logit 0 (B = 1, beta 0.1): d/dz of -log sigmoid(z) = -sigmoid(0) = -0.5
    # TDPO1: z = beta * (... - (KL_l - KL_w)): dKL_w -> -0.5 * 0.1 = -0.05 ; dKL_l -> +0.05 ; d log pi(y_w) -> -0.05
    def grads(fn, **kw):
        pc, kw_, kl_ = (torch.zeros(1, requires_grad=True) for _ in range(3))
        zero = torch.zeros(1)
        fn(pc, zero, zero, zero, kw_, kl_, beta=0.1, **kw)[0].backward()
        return pc.grad, kw_.grad, kl_.grad

    pc, kl_w, kl_l = grads(tdpo1_loss)
    close(pc, [-0.05])
    close(kl_w, [-0.05])
    close(kl_l, [0.05])
    # TDPO2, alpha 0.2: no gradient through the chosen KL ; rejected KL -> 0.5 * 0.1 * 0.2 = 0.01
    pc, kl_w, kl_l = grads(tdpo2_loss, alpha=0.2)
    close(pc, [-0.05])
    assert kl_w is None or torch.all(kl_w == 0)
    close(kl_l, [0.01])


def test_sequential_kl_by_hand_on_a_three_token_vocabulary():
    # row 0, position 0: pi_ref (1/2, 1/4, 1/4), pi (1/4, 1/2, 1/4):
    #   1/2 * ln 2 + 1/4 * ln(1/2) + 1/4 * 0 = 1/4 * ln 2 = 0.1732868
    # row 0, position 1: pi_ref uniform, pi (1/2, 1/4, 1/4) given by logits shifted by +3 (softmax ignores it):
    #   1/3 * (ln(2/3) + 2 * ln(4/3)) = 1/3 * ln(32/27) = 0.0566330
    # row 0, position 2: off the mask (NaN logits) ; row 0 total 0.2299198
    # row 1, position 0: same logits for both: 0 ; position 1: pi_ref (1, 0, 0) (logits 0, -inf, -inf), pi (1/2, 1/4,
    #   1/4): 1 * (ln 1 - ln 1/2) = ln 2 = 0.6931472, the zero-probability entries contribute 0 ; position 2 off
    q = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    inf = float("inf")
    logits_ref = torch.stack([
        torch.stack([q, torch.zeros(3), torch.full((3,), NAN)]),
        torch.stack([torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, -inf, -inf]), torch.tensor([5.0, 0.0, 1.0])]),
    ])
    logits_pol = torch.stack([
        torch.stack([q[[1, 0, 2]], q + 3.0, torch.full((3,), NAN)]),
        torch.stack([torch.tensor([1.0, 2.0, 3.0]), q, torch.tensor([0.0, 9.0, 1.0])]),
    ]).requires_grad_(True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    kl = sequential_kl(logits_ref, logits_pol, mask)
    close(kl, [0.25 * LN(2) + LN(32 / 27) / 3, LN(2)])
    # d KL(p_ref || softmax(l)) / d l_v = softmax(l)_v - p_ref(v): row 0, position 1: (1/2 - 1/3, 1/4 - 1/3, 1/4 - 1/3)
    kl.sum().backward()
    close(logits_pol.grad[0, 1], [1 / 6, -1 / 12, -1 / 12])
    close(logits_pol.grad[1, 1], [-0.5, 0.25, 0.25])  # (1/2 - 1, 1/4 - 0, 1/4 - 0)
    assert torch.isfinite(logits_pol.grad).all() and torch.all(logits_pol.grad[:, 2] == 0)  # nothing off the mask


def test_sequential_kl_matches_categorical_kl_position_by_position():
    # an independent formulation: torch.distributions' KL(Categorical(pi_ref) || Categorical(pi)),
    # one position at a time
    gen = torch.Generator().manual_seed(0)
    logits_ref = 3 * torch.randn(3, 5, 7, generator=gen, dtype=torch.float64)
    logits_pol = 3 * torch.randn(3, 5, 7, generator=gen, dtype=torch.float64)
    lengths = [5, 2, 1]
    mask = (torch.arange(5) < torch.tensor(lengths).unsqueeze(1)).to(torch.float64)
    expected = torch.zeros(3, dtype=torch.float64)
    for b in range(3):
        for t in range(lengths[b]):
            expected[b] += torch.distributions.kl_divergence(
                torch.distributions.Categorical(logits=logits_ref[b, t]),
                torch.distributions.Categorical(logits=logits_pol[b, t]))
    torch.testing.assert_close(sequential_kl(logits_ref, logits_pol, mask), expected)
    with pytest.raises(ValueError, match="sequential_kl"):
        sequential_kl(logits_ref, logits_pol[:, :, :6], mask)


def _scores_at_reference(requires_grad: bool = True) -> PairScores:
    """Two pairs with the policy equal to the reference, no sequential KL, lengths 3/5 and 4/2."""
    logp = lambda *v: torch.tensor(v, requires_grad=requires_grad)  # noqa: E731
    return PairScores(policy_chosen_logp=logp(-6.0, -4.0), policy_rejected_logp=logp(-10.0, -2.0),
                      chosen_length=torch.tensor([3.0, 4.0]), rejected_length=torch.tensor([5.0, 2.0]),
                      ref_chosen_logp=torch.tensor([-6.0, -4.0]), ref_rejected_logp=torch.tensor([-10.0, -2.0]),
                      chosen_seq_kl=torch.zeros(2), rejected_seq_kl=torch.zeros(2))


@pytest.mark.parametrize("name", list(PREFERENCE_LOSSES))
def test_every_preference_loss_favours_the_chosen_response(name):
    # where the policy is still the reference, raising log pi(y_w) lowers the loss and raising log pi(y_l) raises it
    entry = PREFERENCE_LOSSES[name]
    scores = _scores_at_reference()
    loss, stats = entry(scores, **entry.hyperparameters())
    assert torch.isfinite(loss) and {"accuracy", "reward_margin", "reward_chosen", "reward_rejected"} <= set(stats)
    loss.backward()
    assert torch.all(scores.policy_chosen_logp.grad < 0) and torch.all(scores.policy_rejected_logp.grad > 0)
    # and a small step along that direction does lower it
    with torch.no_grad():
        moved = _scores_at_reference(False)
        moved.policy_chosen_logp += 0.1
        moved.policy_rejected_logp -= 0.1
        assert entry(moved, **entry.hyperparameters())[0] < loss


def test_preference_registry_defaults_inputs_and_refusals():
    defaults = {name: entry.hyperparameters() for name, entry in PREFERENCE_LOSSES.items()}
    assert defaults == {"dpo": {"beta": 0.1}, "ipo": {"beta": 0.1}, "rdpo": {"beta": 0.1, "alpha": 0.001},
                        "simpo": {"beta": 2.5, "gamma": 0.5}, "tdpo1": {"beta": 0.1},
                        "tdpo2": {"beta": 0.1, "alpha": 0.2}}
    assert PREFERENCE_LOSSES["simpo"].hyperparameters(beta=2.0, alpha=None) == {"beta": 2.0, "gamma": 0.5}
    assert [n for n, e in PREFERENCE_LOSSES.items() if not e.needs_reference] == ["simpo"]
    assert [n for n, e in PREFERENCE_LOSSES.items() if e.needs_seq_kl] == ["tdpo1", "tdpo2"]
    with pytest.raises(ValueError, match="the dpo loss takes no alpha"):
        PREFERENCE_LOSSES["dpo"].hyperparameters(alpha=0.5)
    # SimPO reads no reference; DPO refuses a record without one
    scores = _scores_at_reference()
    scores.ref_chosen_logp = scores.ref_rejected_logp = None
    PREFERENCE_LOSSES["simpo"](scores, beta=2.5, gamma=0.5)
    with pytest.raises(ValueError, match="needs ref_chosen_logp, ref_rejected_logp"):
        PREFERENCE_LOSSES["dpo"](scores, beta=0.1)


def test_pair_scores_cat_keeps_missing_fields_missing():
    a, b = _scores_at_reference(False), _scores_at_reference(False)
    a.chosen_seq_kl = a.rejected_seq_kl = b.chosen_seq_kl = b.rejected_seq_kl = None
    both = PairScores.cat([a, b])
    close(both.policy_chosen_logp, [-6.0, -4.0, -6.0, -4.0])
    assert both.chosen_seq_kl is None and both.rejected_length.shape == (4,)


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
