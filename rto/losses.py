"""Training losses: PPO policy and value losses (token level) and preference losses (sequence level).

Each loss returns (loss, stats): `loss` is a 0-d tensor to backpropagate, `stats` a dict of
detached 0-d tensors for logging. PPO losses are masked means over all response tokens of the
minibatch (dense [B, T] inputs, `mask` 1 on response tokens); whatever the inputs hold outside
the mask (even NaN) affects neither the loss nor its gradient. Preference losses take
per-sequence [B] log-probs summed over the response (see `sequence_logprob`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from rto.advantages import masked_mean, masked_sum, require_dense, require_same_shape

Stats = dict[str, Tensor]


def sequence_logprob(token_logp: Tensor, mask: Tensor) -> Tensor:
    """log pi(y|x) = sum over response tokens of log pi(y_t|s_t): [B, T] -> [B]."""
    require_dense(token_logp=token_logp, mask=mask)
    return masked_sum(token_logp, mask, dim=1)


def policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip: float = 0.2
) -> tuple[Tensor, Stats]:
    """PPO clipped surrogate (Schulman et al. 2017), ratio = pi(y_t) / pi_old(y_t):

        loss = masked_mean( max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - clip, 1 + clip)) )

    stats: clipfrac (fraction of response tokens where the clipped term is strictly larger, so
    the gradient is cut), approx_kl (masked mean of the k2 estimator 0.5 * (log pi - log pi_old)^2
    of KL(pi_old || pi)), ratio_mean (masked mean of the ratio).
    """
    require_dense(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask)
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    on = mask.bool()
    log_ratio = torch.where(on, logp - old_logp, torch.zeros_like(logp))  # zeroed first: no NaN grads
    advantages = torch.where(on, advantages, torch.zeros_like(advantages))
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), on)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(logp.dtype), on),
            "approx_kl": masked_mean(0.5 * log_ratio**2, on),
            "ratio_mean": masked_mean(ratio, on),
        }
    return loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float | None = 0.2
) -> tuple[Tensor, Stats]:
    """Clipped value loss, v_clipped = old_v + clip(v - old_v, -clip, +clip):

        loss = 0.5 * masked_mean( max((v - R)^2, (v_clipped - R)^2) )

    clip=None gives the plain 0.5 * masked MSE. stats: vf_clipfrac (fraction of response tokens
    where the clipped term is strictly larger).
    """
    require_dense(values=values, old_values=old_values, returns=returns, mask=mask)
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")
    on = mask.bool()
    zeros = torch.zeros_like(values)
    values, old_values, returns = (torch.where(on, x, zeros) for x in (values, old_values, returns))
    unclipped = (values - returns) ** 2
    if clip is None:
        clipped = unclipped
    else:
        values_clipped = old_values + (values - old_values).clamp(-clip, clip)
        clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), on)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((clipped > unclipped).to(values.dtype), on)}
    return loss, stats


def _preference_stats(reward_chosen: Tensor, reward_rejected: Tensor) -> Stats:
    """Logging stats shared by preference losses, from per-sequence implicit rewards [B]."""
    with torch.no_grad():
        return {
            "reward_chosen": reward_chosen.mean(),
            "reward_rejected": reward_rejected.mean(),
            "reward_margin": (reward_chosen - reward_rejected).mean(),
            "accuracy": (reward_chosen > reward_rejected).to(reward_chosen.dtype).mean(),
        }


def _require_per_sequence(**tensors: Tensor) -> None:
    require_same_shape(**tensors)
    for name, t in tensors.items():
        if t.dim() != 1:
            raise ValueError(f"{name} must be per-sequence [B], got shape {list(t.shape)}")


def dpo_loss(
    policy_chosen_logp: Tensor,
    policy_rejected_logp: Tensor,
    ref_chosen_logp: Tensor,
    ref_rejected_logp: Tensor,
    beta: float = 0.1,
) -> tuple[Tensor, Stats]:
    """Sigmoid DPO loss (Rafailov et al. 2023) on per-sequence summed log-probs [B]:

        r_chosen   = beta * (log pi(y_w|x) - log pi_ref(y_w|x))      (implicit rewards)
        r_rejected = beta * (log pi(y_l|x) - log pi_ref(y_l|x))
        loss       = mean( -log sigmoid(r_chosen - r_rejected) )

    stats: reward_chosen, reward_rejected, reward_margin (batch means), accuracy (fraction of
    pairs with r_chosen > r_rejected).
    """
    _require_per_sequence(
        policy_chosen_logp=policy_chosen_logp,
        policy_rejected_logp=policy_rejected_logp,
        ref_chosen_logp=ref_chosen_logp,
        ref_rejected_logp=ref_rejected_logp,
    )
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    reward_chosen = beta * (policy_chosen_logp - ref_chosen_logp)
    reward_rejected = beta * (policy_rejected_logp - ref_rejected_logp)
    loss = -F.logsigmoid(reward_chosen - reward_rejected).mean()
    return loss, _preference_stats(reward_chosen, reward_rejected)


# Offline preference losses by name. IPO, R-DPO, SimPO and TDPO go here as siblings of dpo_loss:
# same four per-sequence log-probs first, their own extra inputs (lengths, per-token KL) as keywords.
PREFERENCE_LOSSES: dict[str, Callable[..., tuple[Tensor, Stats]]] = {"dpo": dpo_loss}


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor) -> tuple[Tensor, Stats]:
    """Bradley-Terry reward-model loss on per-sequence scores [B]:

        loss = mean( -log sigmoid(r_chosen - r_rejected) )

    stats: accuracy (fraction with r_chosen > r_rejected), margin (mean of r_chosen - r_rejected).
    """
    _require_per_sequence(r_chosen=r_chosen, r_rejected=r_rejected)
    margin = r_chosen - r_rejected
    loss = -F.logsigmoid(margin).mean()
    with torch.no_grad():
        stats = {"accuracy": (margin > 0).to(margin.dtype).mean(), "margin": margin.mean()}
    return loss, stats
