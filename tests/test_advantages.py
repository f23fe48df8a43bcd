"""Tests for rto.advantages: every expected number is worked out by hand in the comments."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rto.advantages import (
    ADVANTAGE_ESTIMATORS,
    NEEDS_GROUPS,
    NORMALISED,
    USES_CRITIC,
    gae,
    group_sums,
    grpo,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    reinforce_plus_plus,
    reinforce_returns,
    response_scores,
    rloo,
)

NAN = float("nan")


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=1e-6, rtol=1e-6)


# ---- masked statistics -----------------------------------------------------------------------
X = torch.tensor([[1.0, 2.0, NAN], [4.0, 100.0, -50.0]])
M = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # masked entries: 1, 2, 4


def test_masked_sum_and_mean():
    close(masked_sum(X, M), 7.0)  # 1 + 2 + 4
    close(masked_mean(X, M), 7.0 / 3)
    close(masked_sum(X, M, dim=1), [3.0, 4.0])  # rows: 1 + 2 ; 4
    close(masked_mean(X, M, dim=1), [1.5, 4.0])  # 3 / 2 ; 4 / 1


def test_masked_mean_empty_slice_is_zero_and_empty_mask_raises():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    close(masked_mean(X, mask, dim=1), [1.5, 0.0])
    with pytest.raises(ValueError, match="empty"):
        masked_mean(X, torch.zeros_like(M))


def test_masked_var():
    # mean 7/3; deviations -4/3, -1/3, 5/3; squares 16/9 + 1/9 + 25/9 = 42/9 = 14/3
    close(masked_var(X, M, unbiased=False), 14 / 9)  # (14/3) / 3
    close(masked_var(X, M), 7 / 3)  # (14/3) / 2
    with pytest.raises(ValueError, match="at least 2 masked entries, got 1"):
        masked_var(X, torch.tensor([[1, 0, 0], [0, 0, 0]]))  # one entry, unbiased
    close(masked_var(X, torch.tensor([[1, 0, 0], [0, 0, 0]]), unbiased=False), 0.0)  # one entry is enough here


def test_masked_whiten():
    x = torch.tensor([[1.0, 3.0, 100.0], [5.0, 7.0, NAN]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    # entries 1, 3, 5, 7: mean 4, deviations -3, -1, 1, 3, population var (9 + 1 + 1 + 9) / 4 = 5
    s = math.sqrt(5.0)
    close(masked_whiten(x, mask, eps=0.0), [[-3 / s, -1 / s, 0.0], [1 / s, 3 / s, 0.0]])
    # shift_mean=False adds the mean 4 back on the masked entries
    unshifted = [[4 - 3 / s, 4 - 1 / s, 0.0], [4 + 1 / s, 4 + 3 / s, 0.0]]
    close(masked_whiten(x, mask, shift_mean=False, eps=0.0), unshifted)
    # eps enters as sqrt(var + eps): with eps = 4, divide by 3
    close(masked_whiten(x, mask, eps=4.0), [[-1.0, -1 / 3, 0.0], [1 / 3, 1.0, 0.0]])


# ---- GAE ---------------------------------------------------------------------------------------
REWARDS = torch.tensor([[1.0, 0.0, 2.0]])
VALUES = torch.tensor([[0.5, 1.0, 1.5]])
FULL = torch.ones(1, 3)


def test_gae_gamma_one():
    # lam = 0.5, gamma = 1, V after the last token = 0:
    # t=2: delta = 2 + 0 - 1.5 = 0.5            A = 0.5
    # t=1: delta = 0 + 1.5 - 1.0 = 0.5          A = 0.5 + 0.5 * 0.5 = 0.75
    # t=0: delta = 1 + 1.0 - 0.5 = 1.5          A = 1.5 + 0.5 * 0.75 = 1.875
    # returns = A + V = [2.375, 1.75, 2.0]
    advantages, returns = gae(REWARDS, VALUES, FULL, gamma=1.0, lam=0.5)
    close(advantages, [[1.875, 0.75, 0.5]])
    close(returns, [[2.375, 1.75, 2.0]])


def test_gae_discounted():
    # gamma = 0.9, lam = 0.5, gamma * lam = 0.45:
    # t=2: delta = 2 - 1.5 = 0.5                          A = 0.5
    # t=1: delta = 0 + 0.9 * 1.5 - 1.0 = 0.35             A = 0.35 + 0.45 * 0.5 = 0.575
    # t=0: delta = 1 + 0.9 * 1.0 - 0.5 = 1.4              A = 1.4 + 0.45 * 0.575 = 1.65875
    advantages, returns = gae(REWARDS, VALUES, FULL, gamma=0.9, lam=0.5)
    close(advantages, [[1.65875, 0.575, 0.5]])
    close(returns, [[2.15875, 1.575, 2.0]])  # + V


def test_gae_right_padding_ignores_garbage():
    # row 0 has 2 response tokens; padding holds garbage that must not leak in. gamma = lam = 1:
    # t=1: delta = 2 + 0 - 1.0 = 1.0   A = 1.0      (V after the last token is 0, not the garbage 99)
    # t=0: delta = 1 + 1.0 - 0.5 = 1.5 A = 1.5 + 1.0 = 2.5
    # returns = [3.0, 2.0, 0] (= return-to-go); row 1 is row 0 of test_gae_gamma_one with lam = 1:
    # t=2: 0.5 ; t=1: 0.5 + 0.5 = 1.0 ; t=0: 1.5 + 1.0 = 2.5 ; returns [3.0, 2.0, 2.0]
    rewards = torch.tensor([[1.0, 2.0, 99.0], [1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 1.0, NAN], [0.5, 1.0, 1.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(advantages, [[2.5, 1.0, 0.0], [2.5, 1.0, 0.5]])
    close(returns, [[3.0, 2.0, 0.0], [3.0, 2.0, 2.0]])


@pytest.mark.parametrize("kwargs, match", [(dict(gamma=1.5), "gamma"), (dict(lam=-0.1), "lam"),
                                           (dict(gamma=NAN), "gamma")])
def test_gae_rejects_bad_discounts(kwargs, match):
    with pytest.raises(ValueError, match=rf"{match} must be in \[0, 1\]"):
        gae(REWARDS, VALUES, FULL, **kwargs)


def test_gae_rejects_shape_mismatch():
    with pytest.raises(ValueError, match=r"values \[1, 2\]"):  # the message lists every shape
        gae(REWARDS, VALUES[:, :2], FULL)


def test_registry_gae_entry_computes_gae():
    # looked up by name, the estimator gives the numbers of test_gae_gamma_one (gamma 1, lam 0.5)
    advantages, returns = ADVANTAGE_ESTIMATORS["gae"](REWARDS, VALUES, FULL, gamma=1.0, lam=0.5)
    close(advantages, [[1.875, 0.75, 0.5]])
    close(returns, [[2.375, 1.75, 2.0]])


def test_whitened_gae_by_hand_and_raw_gae_is_left_alone():
    # GAE of test_gae_gamma_one: A = [15/8, 6/8, 4/8], mean 25/24, deviations [20/24, -7/24, -13/24]
    # population var = (400 + 49 + 169) / 576 / 3 = 103/288; whitened = deviation / sqrt(103/288)
    advantages, _ = gae(REWARDS, VALUES, FULL, gamma=1.0, lam=0.5)
    s = math.sqrt(103 / 288)
    close(masked_whiten(advantages, FULL, eps=0.0), [[20 / 24 / s, -7 / 24 / s, -13 / 24 / s]])
    close(advantages, [[1.875, 0.75, 0.5]])  # whitening returns a new tensor, the raw GAE is unchanged
    # with padding: row 0 has 2 tokens (A = [2.5, 1.0] from test_gae_right_padding_ignores_garbage),
    # row 1 has 3 (A = [2.5, 1.0, 0.5]); mean 7.5 / 5 = 1.5, deviations [1, -0.5 | 1, -0.5, -1],
    # population var (1 + 0.25 + 1 + 0.25 + 1) / 5 = 0.7
    rewards = torch.tensor([[1.0, 2.0, 99.0], [1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 1.0, NAN], [0.5, 1.0, 1.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    advantages, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    s = math.sqrt(0.7)
    close(masked_whiten(advantages, mask, eps=0.0), [[1 / s, -0.5 / s, 0.0], [1 / s, -0.5 / s, -1 / s]])


def test_reinforce_returns():
    # gamma = 0.5: G2 = 3 ; G1 = 2 + 0.5 * 3 = 3.5 ; G0 = 1 + 0.5 * 3.5 = 2.75 ; padding -> 0
    rewards = torch.tensor([[1.0, 2.0, 3.0, NAN]])
    close(reinforce_returns(rewards, torch.tensor([[1, 1, 1, 0]]), gamma=0.5), [[2.75, 3.5, 3.0, 0.0]])


# ---- critic-free estimators ------------------------------------------------------------------------
def test_reinforce_plus_plus_whitens_the_return_to_go():
    # gamma = 1: row 0 rewards [1, 0, 2] -> G = [3, 2, 2]; row 1 [0, 4] (+ padding) -> G = [4, 4]
    # G over the batch: 3, 2, 2, 4, 4: mean 3, deviations 0, -1, -1, 1, 1, population var 4 / 5 = 0.8
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.0, 4.0, NAN]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = reinforce_plus_plus(rewards, mask)
    s = math.sqrt(0.8)
    close(returns, [[3.0, 2.0, 2.0], [4.0, 4.0, 0.0]])
    close(advantages, [[0.0, -1 / s, -1 / s], [1 / s, 1 / s, 0.0]])
    # discounted, gamma = 0.5: row 0 G2 = 2, G1 = 0 + 0.5 * 2 = 1, G0 = 1 + 0.5 * 1 = 1.5 ; row 1 [0 + 0.5 * 4, 4]
    _, returns = reinforce_plus_plus(rewards, mask, gamma=0.5)
    close(returns, [[1.5, 1.0, 2.0], [2.0, 4.0, 0.0]])
    # each row alone (as in two processes), whitened with the moments of both rows: the same advantages;
    # without them, each row is whitened on its own and they differ
    both = lambda x, m: (torch.tensor(3.0), torch.tensor(0.8))  # noqa: E731 (mean and var of all five G above)
    for row in range(2):
        alone, _ = reinforce_plus_plus(rewards[row : row + 1], mask[row : row + 1], moments=both)
        close(alone, advantages[row : row + 1])
        assert not torch.allclose(reinforce_plus_plus(rewards[row : row + 1], mask[row : row + 1])[0],
                                  advantages[row : row + 1])


# Five responses in two groups with ids 5 and 9 (interleaved); scores R = summed token rewards:
#   row 0 (group 5): 0.5 + 0.5 = 1   row 1 (group 9): 0        row 2 (group 5): 1 + 1 + 1 = 3
#   row 3 (group 9): 4               row 4 (group 9): -1 + 3 = 2
# group 5: R = 1, 3: mean 2, sample std sqrt((1 + 1) / 1) = sqrt(2)
# group 9: R = 0, 4, 2: mean 2, sample std sqrt((4 + 4 + 0) / 2) = 2
E_REWARDS = torch.tensor([[0.5, 0.5, NAN], [0.0, 7.0, 7.0], [1.0, 1.0, 1.0], [4.0, NAN, NAN], [-1.0, 3.0, 0.0]])
E_MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]])
E_GROUPS = torch.tensor([5, 9, 5, 9, 9])
E_SCORES = [1.0, 0.0, 3.0, 4.0, 2.0]


def on_mask(per_response: list[float]) -> list[list[float]]:
    """Each response's number on its response tokens, 0 on padding."""
    return [[a if m else 0.0 for m in row] for a, row in zip(per_response, E_MASK.tolist())]


def test_response_scores_and_group_sums():
    close(response_scores(E_REWARDS, E_MASK), E_SCORES)
    sums, sizes = group_sums(torch.tensor(E_SCORES), E_GROUPS)
    close(sums, [4.0, 6.0, 4.0, 6.0, 6.0])  # group 5: 1 + 3 ; group 9: 0 + 4 + 2
    close(sizes, [2.0, 3.0, 2.0, 3.0, 3.0])


def test_grpo_normalises_within_each_group():
    # (R - mean) / std: group 5: (1 - 2) / sqrt(2), (3 - 2) / sqrt(2) ; group 9: (0 - 2) / 2, (4 - 2) / 2, 0
    r = 1 / math.sqrt(2)
    advantages, returns = grpo(E_REWARDS, E_MASK, E_GROUPS, eps=0.0)
    close(advantages, on_mask([-r, -1.0, r, 1.0, 0.0]))
    close(returns, on_mask(E_SCORES))
    # eps enters as std + eps: group 9 with eps = 2 divides by 4
    advantages, _ = grpo(E_REWARDS, E_MASK, E_GROUPS, eps=2.0)
    close(advantages[[1, 3, 4], 0], [-0.5, 0.5, 0.0])


def test_rloo_subtracts_the_mean_of_the_others():
    # group 5: 1 - 3 = -2, 3 - 1 = 2 ; group 9: 0 - (4 + 2) / 2 = -3, 4 - (0 + 2) / 2 = 3, 2 - (0 + 4) / 2 = 0
    advantages, returns = rloo(E_REWARDS, E_MASK, E_GROUPS)
    close(advantages, on_mask([-2.0, -3.0, 2.0, 3.0, 0.0]))
    close(returns, on_mask(E_SCORES))


@pytest.mark.parametrize("estimator", [grpo, rloo])
def test_group_estimators_fail_loudly(estimator):
    with pytest.raises(ValueError, match=r"at least 2 responses, got group sizes \[2, 1\]"):
        estimator(E_REWARDS[:3], E_MASK[:3], E_GROUPS[:3])  # group 9 holds one response
    with pytest.raises(ValueError, match="gamma must be 1"):
        estimator(E_REWARDS, E_MASK, E_GROUPS, gamma=0.9)
    with pytest.raises(ValueError, match="must both be"):
        estimator(E_REWARDS, E_MASK, E_GROUPS[:4])


def test_registry_names_every_estimator():
    assert list(ADVANTAGE_ESTIMATORS) == ["gae", "reinforce++", "grpo", "rloo"]
    assert ADVANTAGE_ESTIMATORS["reinforce++"] is reinforce_plus_plus
    assert ADVANTAGE_ESTIMATORS["grpo"] is grpo and ADVANTAGE_ESTIMATORS["rloo"] is rloo
    assert USES_CRITIC == {"gae"} and NEEDS_GROUPS == {"grpo", "rloo"} and NORMALISED == {"reinforce++", "grpo"}
    # the critic-free ones share one call: f(rewards, mask, groups=..., gamma=...)
    for name in ("reinforce++", "grpo", "rloo"):
        advantages, returns = ADVANTAGE_ESTIMATORS[name](E_REWARDS, E_MASK, groups=E_GROUPS, gamma=1.0)
        assert advantages.shape == returns.shape == E_MASK.shape
        assert (advantages[E_MASK == 0] == 0).all() and (returns[E_MASK == 0] == 0).all()


# ---- properties ------------------------------------------------------------------------------
@st.composite
def rollouts(draw):
    """Random dense rewards and values [B, T] with right-padded masks and garbage in the padding."""
    batch = draw(st.integers(1, 4))
    length = draw(st.integers(1, 10))
    lengths = draw(st.lists(st.integers(1, length), min_size=batch, max_size=batch))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mask = torch.arange(length) < torch.tensor(lengths).unsqueeze(1)
    rewards = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    values = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    garbage = torch.randn(batch, length, generator=gen, dtype=torch.float64) * 1e6
    return rewards, values, mask, garbage


def with_garbage(x: torch.Tensor, mask: torch.Tensor, garbage: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, garbage)


@settings(max_examples=60, deadline=None)
@given(rollouts())
def test_gae_with_gamma_lam_one_is_return_to_go_minus_value(rollout):
    rewards, values, mask, _ = rollout
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    zero = torch.zeros_like(rewards)
    # return-to-go via a reversed cumulative sum of the masked rewards
    to_go = torch.where(mask, rewards, zero).flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(advantages, torch.where(mask, to_go - values, zero))
    torch.testing.assert_close(returns, torch.where(mask, to_go, zero))
    torch.testing.assert_close(reinforce_returns(rewards, mask), torch.where(mask, to_go, zero))


@settings(max_examples=60, deadline=None)
@given(rollouts(), st.floats(0.0, 1.0))
def test_gae_with_lam_zero_is_one_step_td_error(rollout, gamma):
    rewards, values, mask, _ = rollout
    advantages, _ = gae(rewards, values, mask, gamma=gamma, lam=0.0)
    zero = torch.zeros_like(values)
    next_values = torch.cat([torch.where(mask, values, zero)[:, 1:], zero[:, :1]], dim=1)
    torch.testing.assert_close(advantages, torch.where(mask, rewards + gamma * next_values - values, zero))


@settings(max_examples=60, deadline=None)
@given(rollouts(), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_gae_ignores_padding_content(rollout, gamma, lam):
    rewards, values, mask, garbage = rollout
    clean = gae(rewards, values, mask, gamma=gamma, lam=lam)
    dirty = gae(with_garbage(rewards, mask, garbage), with_garbage(values, mask, -garbage), mask, gamma, lam)
    for a, b in zip(clean, dirty):
        torch.testing.assert_close(a, b)
        assert (a[~mask] == 0).all()


@settings(max_examples=60, deadline=None)
@given(rollouts(), st.booleans())
def test_whitening_ignores_padding_and_standardises(rollout, shift_mean):
    x, _, mask, garbage = rollout
    if mask.sum() < 2:
        return
    clean = masked_whiten(x, mask, shift_mean=shift_mean)
    torch.testing.assert_close(clean, masked_whiten(with_garbage(x, mask, garbage), mask, shift_mean=shift_mean))
    assert (clean[~mask] == 0).all()
    if shift_mean:
        torch.testing.assert_close(masked_mean(clean, mask), torch.tensor(0.0, dtype=x.dtype), atol=1e-9, rtol=0)
        if masked_var(x, mask, unbiased=False) > 1e-3:
            torch.testing.assert_close(
                masked_var(clean, mask, unbiased=False), torch.tensor(1.0, dtype=x.dtype), atol=1e-5, rtol=0
            )


@settings(max_examples=60, deadline=None)
@given(rollouts(), st.integers(2, 4))
def test_group_advantages_balance_within_each_group(rollout, group_size):
    # RLOO: sum_i A_i = S - sum_i (S - R_i) / (n - 1) = 0 per group; GRPO: group mean 0, sample std ~1
    rewards, _, mask, garbage = rollout
    n = rewards.shape[0] * group_size  # every response of the rollout repeated, with its own noise
    rewards = rewards.repeat(group_size, 1) + torch.randn(n, rewards.shape[1], dtype=rewards.dtype,
                                                          generator=torch.Generator().manual_seed(n))
    mask = mask.repeat(group_size, 1)
    groups = torch.arange(n) % (n // group_size)
    scores = response_scores(rewards, mask)
    for estimator in (rloo, grpo):
        advantages, _ = estimator(with_garbage(rewards, mask, garbage.repeat(group_size, 1)), mask, groups)
        per_response = advantages[:, 0]  # the same on every token of a response
        assert torch.equal(advantages, torch.where(mask, per_response[:, None].expand_as(advantages), 0.0))
        for g in groups.unique():
            a = per_response[groups == g]
            torch.testing.assert_close(a.sum(), torch.tensor(0.0, dtype=a.dtype), atol=1e-9, rtol=0)
            if estimator is grpo and scores[groups == g].std() > 0.1:  # std / (std + 1e-6) is then ~1
                torch.testing.assert_close(a.std(), torch.tensor(1.0, dtype=a.dtype), atol=1e-4, rtol=0)
