"""Per-token rewards for PPO: the RTO reward (paper eq. 4.7) and its parts.

Building rewards is one step; turning them into advantages is the next (`rto.advantages`).
Dense tensors are [B, T] over response tokens (right-padded; `mask` 1 on response tokens,
EOS included, 0 on padding); per-sequence tensors are [B]. Log-probs are those of the sampled
tokens. Rewards are rollout data: compute them under `torch.no_grad()`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from rto.advantages import masked_sum, require_dense, require_same_shape


def kl_k1(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """k1 = log pi - log pi_ref (unbiased estimate of KL(pi || pi_ref), can be negative)."""
    return logp - logp_ref


def kl_k2(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """k2 = 0.5 * (log pi - log pi_ref)^2 (biased, low variance, >= 0)."""
    return 0.5 * (logp - logp_ref) ** 2


def kl_k3(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """k3 = exp(log pi_ref - log pi) - 1 - (log pi_ref - log pi) (unbiased, >= 0)."""
    log_ratio = logp_ref - logp
    return torch.exp(log_ratio) - 1 - log_ratio


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_penalty(logp: Tensor, logp_ref: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled-token log-probs (see KL_ESTIMATORS)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logp, logp_ref)


def clip_symmetric(x: Tensor, bound: float | None) -> Tensor:
    """clip(x, -bound, +bound); bound None means no clip. A bound <= 0 (or NaN) raises."""
    if bound is None:
        return x
    if not bound > 0:
        raise ValueError(f"clip bound must be > 0 (use None for no clip), got {bound}")
    return x.clamp(-bound, bound)


def dpo_token_reward(
    logp_dpo: Tensor, logp_ref: Tensor, beta_dpo: float, clip: float | None = None
) -> Tensor:
    """Dense DPO token reward: clip(beta_dpo * (log pi_dpo - log pi_ref), -clip, +clip).

    The first term of paper eq. 4.7. Unclipped and summed over a response it telescopes to
    beta_dpo * log(pi_dpo(y|x) / pi_ref(y|x)), i.e. (beta_dpo / beta) times the DPO model's
    implicit sentence reward when pi_dpo was trained with DPO temperature beta.
    """
    return clip_symmetric(beta_dpo * (logp_dpo - logp_ref), clip)


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last 1 in each row of a [B, T] mask (the EOS / final response token) -> [B]."""
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {list(mask.shape)}")
    on = mask.bool()
    empty = (~on.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"mask rows {empty} have no response tokens")
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return (positions * on).argmax(dim=1)


def place_on_last_token(score: Tensor, mask: Tensor) -> Tensor:
    """Sparse [B, T] tensor holding the per-sequence score[b] at last_token_index(mask)[b], 0 elsewhere."""
    if score.shape != mask.shape[:1]:
        raise ValueError(f"score must be per-sequence [{mask.shape[0]}], got shape {list(score.shape)}")
    sparse = torch.zeros(mask.shape, dtype=score.dtype, device=score.device)
    return sparse.scatter(1, last_token_index(mask).unsqueeze(1), score.unsqueeze(1))


def _require_finite(**betas: float) -> None:
    for name, beta in betas.items():
        if not math.isfinite(beta):
            raise ValueError(f"{name} must be finite, got {beta}")


def token_rewards(
    logp: Tensor,
    logp_ref: Tensor,
    mask: Tensor,
    *,
    logp_dpo: Tensor | None = None,
    logp_ref_t1: Tensor | None = None,
    rm_score: Tensor | None = None,
    beta_dpo: float = 0.05,
    beta_kl: float = 0.01,
    beta_rm: float = 1.0,
    dpo_clip: float | None = 0.05,
    rm_clip: float | None = 10.0,
    kl_estimator: str = "k1",
) -> Tensor:
    """The RTO reward, paper eq. 4.7, per response token t = 1..H (H = last masked token):

        r_t = clip(beta_dpo * (log pi_dpo(y_t) - log pi_ref(y_t)), +-dpo_clip)  # dense: DPO token reward
            - beta_kl * KL_t(log pi(y_t), log pi_ref(y_t))                     # dense: KL penalty (k1)
            + [t == H] * beta_rm * clip(rm_score, +-rm_clip)                   # sparse: RM score

    pi is the policy being trained and pi_ref the SFT model. pi_ref is both the KL reference and
    the model pi_dpo was trained against with DPO (there is no separate "DPO reference").
    The paper writes beta1, beta2, beta3 for beta_dpo, beta_kl, beta_rm (defaults 0.05, 0.01, 1).

    - Temperatures: logp and logp_ref are taken at the sampling temperature T (the KL penalty is about
      the distribution that samples); the DPO term compares pi_dpo and pi_ref at temperature 1, the scale
      DPO trained them on, so pass logp_ref_t1 (log pi_ref at T=1) when T != 1 (None: logp_ref is used).
    - KL_t is k1 = log pi(y_t) - log pi_ref(y_t), the only estimator allowed here. As a reward the
      penalty reaches the policy through the score-function gradient E[grad log pi * return], which
      ignores the penalty's own dependence on pi. For k1 that missing term is E_pi[grad log pi] = 0,
      so the gradient is exactly that of -beta_kl * KL(pi || pi_ref). For k3 = rho - 1 - log rho
      (rho = pi_ref / pi) it is E_pi[(1 - rho) grad log pi] = -sum_y pi_ref(y) grad log pi(y) != 0, so
      the gradient is biased; k2 and k3 belong in a loss term that is differentiated directly.
    - logp_dpo=None drops the DPO term (classic sparse PPO); rm_score=None drops the sentence term.
    - rm_score is per-sequence [B], already normalised by the caller ((r - mu) / sigma).
    - dpo_clip caps the scaled DPO term per token (0.05 as in the authors' public script, which
      caps the raw log-ratio at +-1 nat; the paper does not mention it); rm_clip caps the score.
      None means no clip. A beta of 0 switches its term off; it never means "unscaled".
    - Everything outside the mask is 0 (whatever the inputs hold there).

    Returns dense rewards [B, T].
    """
    require_dense(logp=logp, logp_ref=logp_ref, mask=mask)
    if logp_dpo is not None:
        require_same_shape(logp=logp, logp_dpo=logp_dpo)
    _require_finite(beta_dpo=beta_dpo, beta_kl=beta_kl, beta_rm=beta_rm)
    zeros = torch.zeros_like(logp)

    if kl_estimator != "k1":
        raise ValueError(f"the KL penalty in the reward must use the k1 estimator, got {kl_estimator!r}: as a "
                         "reward, k2 and k3 give a biased policy gradient (see rto.rewards.token_rewards)")
    if logp_ref_t1 is not None:
        require_same_shape(logp=logp, logp_ref_t1=logp_ref_t1)
    ref_t1 = logp_ref if logp_ref_t1 is None else logp_ref_t1
    dense_dpo = zeros if logp_dpo is None else dpo_token_reward(logp_dpo, ref_t1, beta_dpo, dpo_clip)
    kl = kl_k1(logp, logp_ref)
    rm = zeros if rm_score is None else place_on_last_token(clip_symmetric(rm_score, rm_clip), mask)

    rewards = dense_dpo - beta_kl * kl + beta_rm * rm.to(logp.dtype)  # eq. 4.7
    return torch.where(mask.bool(), rewards, zeros)


def sequence_kl(logp: Tensor, logp_ref: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence KL(pi || pi_ref) estimate: sum over response tokens of k1 = log pi - log pi_ref -> [B]."""
    require_dense(logp=logp, logp_ref=logp_ref, mask=mask)
    return masked_sum(kl_k1(logp, logp_ref), mask, dim=1)


def adaptive_kl_coef(beta_kl: float, observed_kl: float, target_kl: float, horizon: int, n_steps: int) -> float:
    """Proportional KL controller (Ziegler et al. 2019), applied after each rollout:

        e       = clip(observed_kl / target_kl - 1, -0.2, 0.2)
        beta_kl = beta_kl * (1 + e * n_steps / horizon)

    observed_kl is the mean per-sequence KL of the rollout; n_steps the sequences it held.
    """
    if not (target_kl > 0 and horizon > 0):
        raise ValueError(f"target_kl and horizon must be > 0, got {target_kl} and {horizon}")
    error = min(max(observed_kl / target_kl - 1.0, -0.2), 0.2)
    return beta_kl * (1.0 + error * n_steps / horizon)
