"""Turning per-token rewards into advantages and returns.

Rewards are built in `rto.rewards` (the RTO reward, paper eq. 4.7, or classic sparse PPO);
this module only turns a dense reward tensor [B, T] into advantages and returns. Estimators
are small pure functions chosen by name from `ADVANTAGE_ESTIMATORS`: `gae` (with a critic's values)
and the critic-free `reinforce_plus_plus`, `grpo` and `rloo`, all on the same token rewards.

Conventions: "dense" tensors are [B, T] over response tokens, right-padded, with `mask` 1 on
response tokens (EOS included) and 0 on padding. Whatever sits outside the mask (even NaN) is
ignored and every output is 0 there. The masked_* helpers are shared with `rto.losses`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def require_same_shape(**tensors: Tensor) -> None:
    """Raise ValueError naming every tensor's shape unless all shapes are equal."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {list(shape)}" for name, shape in shapes.items())
        raise ValueError(f"shape mismatch: {listed}")


def require_dense(**tensors: Tensor) -> None:
    """Raise ValueError unless the tensors share one [B, T] shape."""
    require_same_shape(**tensors)
    for name, t in tensors.items():
        if t.dim() != 2:
            raise ValueError(f"{name} must be dense [B, T], got shape {list(t.shape)}")


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum(x * mask) over `dim` (all entries if None); entries outside the mask never count."""
    kept = torch.where(mask.bool(), x, torch.zeros_like(x))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum(x * mask) / sum(mask) over `dim` (all entries if None).

    An all-zero mask raises ValueError; with `dim`, a slice with no masked entries gives 0.
    """
    on = mask.bool()
    if not on.any():
        raise ValueError("masked_mean over an empty mask")
    count = on.sum() if dim is None else on.sum(dim).clamp(min=1)
    return masked_sum(x, on, dim) / count.to(x.dtype)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance over all masked entries: sum(mask * (x - mean)^2) / (n - 1 if unbiased else n)."""
    n = int(mask.bool().sum())
    if n < (2 if unbiased else 1):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} masked entries, got {n}")
    centered = x - masked_mean(x, mask)
    return masked_sum(centered**2, mask) / (n - 1 if unbiased else n)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  moments: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """(x - mean) / sqrt(var + eps) over all masked entries of the batch; 0 outside the mask.

    mean and var are taken over every masked entry (var is the population variance, so the
    result has masked mean 0 and masked variance ~1), or given as `moments` = (mean, var) (e.g. over the
    batches of several processes, rto.distributed.masked_moments). With shift_mean=False the mean is
    added back: x is only rescaled.
    """
    mean, var = moments if moments is not None else (masked_mean(x, mask), masked_var(x, mask, unbiased=False))
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """How much of the returns' spread the critic predicts, over all masked entries:

        EV = 1 - Var(returns - values) / Var(returns)

    (population variances). 1: perfect; 0: no better than a constant; < 0: worse. NaN when the
    returns do not vary.
    """
    require_dense(values=values, returns=returns, mask=mask)
    var_returns = masked_var(returns, mask, unbiased=False)
    if var_returns == 0:
        return torch.tensor(float("nan"), dtype=returns.dtype)
    return 1 - masked_var(returns - values, mask, unbiased=False) / var_returns


def _require_discount(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016) over response tokens.

        delta_t = r_t + gamma * V_{t+1} - V_t,      V after the last response token = 0
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                          (the critic's target)

    Positions outside the mask are skipped (their rewards and values are ignored), so t+1 means
    the next response token. Returns (advantages, returns), both [B, T] and 0 outside the mask.
    No whitening here: see `masked_whiten`.
    """
    require_dense(rewards=rewards, values=values, mask=mask)
    _require_discount("gamma", gamma)
    _require_discount("lam", lam)
    on = mask.bool()
    zero = torch.zeros_like(rewards[:, 0])
    next_value, next_advantage = zero, zero
    advantages = []
    for t in reversed(range(rewards.shape[1])):
        on_t = on[:, t]
        value_t = torch.where(on_t, values[:, t], zero)
        delta = torch.where(on_t, rewards[:, t], zero) + gamma * next_value - value_t
        advantage_t = torch.where(on_t, delta + gamma * lam * next_advantage, zero)
        next_value = torch.where(on_t, value_t, next_value)
        next_advantage = torch.where(on_t, advantage_t, next_advantage)
        advantages.append(advantage_t)
    advantages_bt = torch.stack(advantages[::-1], dim=1)
    returns = torch.where(on, advantages_bt + values, torch.zeros_like(advantages_bt))
    return advantages_bt, returns


def reinforce_returns(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Discounted return-to-go G_t = r_t + gamma * G_{t+1}, G after the last response token = 0.

    Positions outside the mask are skipped; the result is [B, T] and 0 outside the mask.
    """
    require_dense(rewards=rewards, mask=mask)
    _require_discount("gamma", gamma)
    on = mask.bool()
    zero = torch.zeros_like(rewards[:, 0])
    next_return = zero
    returns = []
    for t in reversed(range(rewards.shape[1])):
        on_t = on[:, t]
        return_t = torch.where(on_t, rewards[:, t] + gamma * next_return, zero)
        next_return = torch.where(on_t, return_t, next_return)
        returns.append(return_t)
    return torch.stack(returns[::-1], dim=1)


def reinforce_plus_plus(
    rewards: Tensor, mask: Tensor, groups: Tensor | None = None, gamma: float = 1.0,
    moments: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (Hu 2025): return-to-go whitened over the batch, no critic.

        G_t = sum_{k >= t} gamma^(k - t) r_k          (reinforce_returns)
        A_t = (G_t - mean(G)) / sqrt(var(G) + eps)    mean and population var over every masked token of the batch

    `moments(x, mask)` -> (mean, var) takes them over a batch larger than this one (e.g. every process's:
    rto.distributed.masked_moments); None: over this batch. `groups` is accepted for the registry's common
    signature and not used. Returns (advantages, G), both [B, T] and 0 outside the mask.
    """
    returns = reinforce_returns(rewards, mask, gamma)
    return masked_whiten(returns, mask, moments=moments(returns, mask) if moments else None), returns


def response_scores(rewards: Tensor, mask: Tensor) -> Tensor:
    """R_i = sum_t r_{i,t} over the response tokens of response i -> [B] (undiscounted)."""
    require_dense(rewards=rewards, mask=mask)
    return masked_sum(rewards, mask, dim=1)


def group_sums(x: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]:
    """For each response i: (sum of x over the responses of its group, size of its group), both [B].

    `groups` [B] holds any integer ids; responses with the same id form a group (the same prompt sampled
    several times). Every group must hold at least 2 responses.
    """
    if x.dim() != 1 or groups.shape != x.shape:
        raise ValueError(f"scores and groups must both be [B], got {list(x.shape)} and {list(groups.shape)}")
    _, member = torch.unique(groups, return_inverse=True)
    sums = torch.zeros(int(member.max()) + 1, dtype=x.dtype, device=x.device).scatter_add(0, member, x)
    sizes = torch.bincount(member)
    if (sizes < 2).any():
        raise ValueError(f"every group needs at least 2 responses, got group sizes {sizes.tolist()}")
    return sums[member], sizes[member].to(x.dtype)


def _broadcast(score: Tensor, mask: Tensor) -> Tensor:
    """[B] -> [B, T]: score[i] on every response token of row i, 0 outside the mask."""
    dense = score[:, None].expand(mask.shape)
    return torch.where(mask.bool(), dense, torch.zeros_like(dense))


def _require_undiscounted(name: str, gamma: float) -> None:
    if gamma != 1.0:
        raise ValueError(f"{name} scores each response by its undiscounted summed reward: gamma must be 1, got {gamma}")


def grpo(
    rewards: Tensor, mask: Tensor, groups: Tensor, gamma: float = 1.0, eps: float = 1e-6, moments=None
) -> tuple[Tensor, Tensor]:
    """GRPO (Shao et al. 2024), outcome advantages normalised within each group of responses to one prompt:

        R_i     = sum_t r_{i,t}                                  (response_scores)
        A_i     = (R_i - mean_g(R)) / (std_g(R) + eps)           g = the group of i; std_g with n_g - 1
        A_{i,t} = A_i on every response token of i

    `groups` [B] gives each response's group id (see group_sums); every group needs 2 or more responses.
    gamma must be 1 and `moments` is not used (both are taken only for the registry's common signature: a group
    is never split between processes). Returns (advantages, returns)
    with returns_{i,t} = R_i, both [B, T] and 0 outside the mask. No critic.
    """
    _require_undiscounted("grpo", gamma)
    scores = response_scores(rewards, mask)
    total, n = group_sums(scores, groups)
    mean = total / n
    squares, _ = group_sums((scores - mean) ** 2, groups)
    std = torch.sqrt(squares / (n - 1))
    return _broadcast((scores - mean) / (std + eps), mask), _broadcast(scores, mask)


def rloo(rewards: Tensor, mask: Tensor, groups: Tensor, gamma: float = 1.0, moments=None) -> tuple[Tensor, Tensor]:
    """RLOO (Ahmadian et al. 2024), REINFORCE with the leave-one-out mean of the group as baseline:

        R_i     = sum_t r_{i,t}                                  (response_scores)
        A_i     = R_i - (sum_{j in g, j != i} R_j) / (n_g - 1)   g = the group of i, n_g its size
        A_{i,t} = A_i on every response token of i

    `groups` [B] gives each response's group id (see group_sums); every group needs 2 or more responses.
    gamma must be 1 and `moments` is not used (both are taken only for the registry's common signature: a group
    is never split between processes). Returns (advantages, returns)
    with returns_{i,t} = R_i, both [B, T] and 0 outside the mask. No critic.
    """
    _require_undiscounted("rloo", gamma)
    scores = response_scores(rewards, mask)
    total, n = group_sums(scores, groups)
    return _broadcast(scores - (total - scores) / (n - 1), mask), _broadcast(scores, mask)


# name -> estimator. gae is called as gae(rewards, values, mask, gamma, lam); the critic-free ones as
# f(rewards, mask, groups=..., gamma=..., moments=...). All return (advantages, returns), [B, T].
ADVANTAGE_ESTIMATORS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "gae": gae, "reinforce++": reinforce_plus_plus, "grpo": grpo, "rloo": rloo}
USES_CRITIC = frozenset({"gae"})  # the others need no values: PPO then loads no critic
NEEDS_GROUPS = frozenset({"grpo", "rloo"})  # compare the responses to one prompt: group_size >= 2
NORMALISED = frozenset({"reinforce++", "grpo"})  # their advantages come out normalised: not whitened again
