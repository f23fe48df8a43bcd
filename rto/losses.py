"""Training losses: PPO policy and value losses (token level) and preference losses (sequence level).

Each loss returns (loss, stats): `loss` is a 0-d tensor to backpropagate, `stats` a dict of
detached 0-d tensors for logging. PPO losses aggregate over the response tokens of the minibatch
(dense [B, T] inputs, `mask` 1 on response tokens; a masked mean unless `agg` says otherwise); whatever the inputs hold outside
the mask (even NaN) affects neither the loss nor its gradient. Preference losses (DPO, IPO,
R-DPO, SimPO, TDPO1/2) take per-sequence [B] quantities: log-probs summed over the response (see
`sequence_logprob`), response lengths, sequential KL (see `sequential_kl`); PREFERENCE_LOSSES calls
each by name on one record of them (PairScores).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
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


# ---- loss aggregation: how per-token losses [B, T] become one number ----------------------------------
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean")


def aggregate(x: Tensor, mask: Tensor, agg: str = "token_mean") -> Tensor:
    """Per-token losses [B, T] -> a scalar, over the response tokens (mask) of the minibatch:

        token_mean           sum_{b,t} x_bt / sum_b |y_b|        every token weighs the same (default)
        seq_mean_token_sum   (1/B) sum_b sum_t x_bt              a response weighs by its length
        seq_mean_token_mean  (1/B) sum_b (1/|y_b|) sum_t x_bt    every response weighs the same

    With dense rewards over responses of different lengths the choice changes what is optimised:
    seq_mean_token_mean gives each token of a short response more weight than one of a long response.
    """
    if agg == "token_mean":
        return masked_mean(x, mask)
    if agg == "seq_mean_token_sum":
        return masked_sum(x, mask, dim=1).mean()
    if agg == "seq_mean_token_mean":
        return masked_mean(x, mask, dim=1).mean()
    raise ValueError(f"unknown loss aggregation {agg!r}; valid: {', '.join(LOSS_AGGREGATIONS)}")


def policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip: float = 0.2, agg: str = "token_mean"
) -> tuple[Tensor, Stats]:
    """PPO clipped surrogate (Schulman et al. 2017), ratio = pi(y_t) / pi_old(y_t):

        loss = aggregate( max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - clip, 1 + clip)) )

    aggregate is a masked mean over response tokens by default (see `aggregate` for the others).

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
    loss = aggregate(torch.maximum(unclipped, clipped), on, agg)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(logp.dtype), on),
            "approx_kl": masked_mean(0.5 * log_ratio**2, on),
            "ratio_mean": masked_mean(ratio, on),
        }
    return loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float | None = 0.2,
    agg: str = "token_mean",
) -> tuple[Tensor, Stats]:
    """Clipped value loss, v_clipped = old_v + clip(v - old_v, -clip, +clip):

        loss = 0.5 * aggregate( max((v - R)^2, (v_clipped - R)^2) )   (a masked mean by default)

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
    loss = 0.5 * aggregate(torch.maximum(unclipped, clipped), on, agg)
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


@dataclass
class PairScores:
    """What a preference loss sees of B (prompt, chosen y_w, rejected y_l) pairs, every field per-sequence [B].

    Per-token quantities enter already summed over each response (log-probs by `sequence_logprob`, the
    sequential KL by `sequential_kl`). A field the chosen loss does not read may be None: the dpo stage
    computes only the fields its `PreferenceLoss.inputs` name (no reference model for SimPO, full-vocabulary
    logits only for TDPO).
    """

    policy_chosen_logp: Tensor  # log pi(y_w|x)
    policy_rejected_logp: Tensor  # log pi(y_l|x)
    chosen_length: Tensor  # |y_w|, response tokens (EOS included)
    rejected_length: Tensor  # |y_l|
    ref_chosen_logp: Tensor | None = None  # log pi_ref(y_w|x)
    ref_rejected_logp: Tensor | None = None  # log pi_ref(y_l|x)
    chosen_seq_kl: Tensor | None = None  # D_SeqKL(x, y_w; pi_ref || pi)
    rejected_seq_kl: Tensor | None = None  # D_SeqKL(x, y_l; pi_ref || pi)

    @classmethod
    def cat(cls, parts: list["PairScores"]) -> "PairScores":
        """The scores of consecutive slices of pairs as one record (None fields stay None)."""
        return cls(**{f.name: None if getattr(parts[0], f.name) is None
                      else torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)})


def _require_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def _require_alpha(alpha: float) -> None:
    if not (alpha >= 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")


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
    _require_beta(beta)
    reward_chosen = beta * (policy_chosen_logp - ref_chosen_logp)
    reward_rejected = beta * (policy_rejected_logp - ref_rejected_logp)
    loss = -F.logsigmoid(reward_chosen - reward_rejected).mean()
    return loss, _preference_stats(reward_chosen, reward_rejected)


def ipo_loss(
    policy_chosen_logp: Tensor,
    policy_rejected_logp: Tensor,
    ref_chosen_logp: Tensor,
    ref_rejected_logp: Tensor,
    beta: float = 0.1,
) -> tuple[Tensor, Stats]:
    """IPO loss (Azar et al. 2023, eq. 17) on per-sequence summed log-probs [B]:

        h    = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))
        loss = mean( (h - 1 / (2 * beta))^2 )          (beta is the paper's tau)

    h is summed over the response tokens, as in the IPO paper, not divided by each response's length as
    TRL does: then h is the same log-ratio difference as DPO's, and the trained model's per-token
    log-ratios to the reference still sum to its sequence-level implicit reward, which is what RTO's
    dense reward reads token by token. The loss pulls h to 1/(2 beta) nats over the whole response
    (5 at beta 0.1), not per token.

    stats as dpo_loss, with the DPO implicit rewards beta * (log pi - log pi_ref): their margin is
    beta * h, pulled to 1/2.
    """
    _require_per_sequence(
        policy_chosen_logp=policy_chosen_logp,
        policy_rejected_logp=policy_rejected_logp,
        ref_chosen_logp=ref_chosen_logp,
        ref_rejected_logp=ref_rejected_logp,
    )
    _require_beta(beta)
    chosen_ratio = policy_chosen_logp - ref_chosen_logp
    rejected_ratio = policy_rejected_logp - ref_rejected_logp
    loss = ((chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2).mean()
    return loss, _preference_stats(beta * chosen_ratio, beta * rejected_ratio)


def rdpo_loss(
    policy_chosen_logp: Tensor,
    policy_rejected_logp: Tensor,
    ref_chosen_logp: Tensor,
    ref_rejected_logp: Tensor,
    chosen_length: Tensor,
    rejected_length: Tensor,
    beta: float = 0.1,
    alpha: float = 0.001,
) -> tuple[Tensor, Stats]:
    """R-DPO loss (Park et al. 2024): DPO with a length term, |y| = response tokens:

        r_chosen   = beta * (log pi(y_w|x) - log pi_ref(y_w|x)) - alpha * |y_w|
        r_rejected = beta * (log pi(y_l|x) - log pi_ref(y_l|x)) - alpha * |y_l|
        loss       = mean( -log sigmoid(r_chosen - r_rejected) )
                   = mean( -log sigmoid(DPO logit - alpha * (|y_w| - |y_l|)) )

    Defaults beta 0.1, alpha 0.001 are the RTO paper's R-DPO settings. stats as dpo_loss, on these
    r_chosen, r_rejected (so reward_margin is the mean logit).
    """
    _require_per_sequence(
        policy_chosen_logp=policy_chosen_logp,
        policy_rejected_logp=policy_rejected_logp,
        ref_chosen_logp=ref_chosen_logp,
        ref_rejected_logp=ref_rejected_logp,
        chosen_length=chosen_length,
        rejected_length=rejected_length,
    )
    _require_beta(beta)
    _require_alpha(alpha)
    reward_chosen = beta * (policy_chosen_logp - ref_chosen_logp) - alpha * chosen_length
    reward_rejected = beta * (policy_rejected_logp - ref_rejected_logp) - alpha * rejected_length
    loss = -F.logsigmoid(reward_chosen - reward_rejected).mean()
    return loss, _preference_stats(reward_chosen, reward_rejected)


def simpo_loss(
    policy_chosen_logp: Tensor,
    policy_rejected_logp: Tensor,
    chosen_length: Tensor,
    rejected_length: Tensor,
    beta: float = 2.5,
    gamma: float = 0.5,
) -> tuple[Tensor, Stats]:
    """SimPO loss (Meng et al. 2024), reference-free and length-normalised, |y| = response tokens:

        r_chosen   = beta / |y_w| * log pi(y_w|x)
        r_rejected = beta / |y_l| * log pi(y_l|x)
        loss       = mean( -log sigmoid(r_chosen - r_rejected - gamma) )

    gamma is the target margin on the reward scale, as in the SimPO paper and TRL. The SimPO authors'
    code takes gamma / beta instead (`gamma_beta_ratio`, the logit being beta * (... - gamma_beta_ratio)):
    a setting copied from there is gamma = beta * gamma_beta_ratio here. Defaults beta 2.5, gamma 0.5
    are the RTO paper's SimPO settings.

    stats as dpo_loss, on r_chosen and r_rejected (reward_margin leaves gamma out; accuracy counts
    r_chosen > r_rejected).
    """
    _require_per_sequence(
        policy_chosen_logp=policy_chosen_logp,
        policy_rejected_logp=policy_rejected_logp,
        chosen_length=chosen_length,
        rejected_length=rejected_length,
    )
    _require_beta(beta)
    if not math.isfinite(gamma):
        raise ValueError(f"gamma must be a finite number, got {gamma}")
    if not (bool((chosen_length > 0).all()) and bool((rejected_length > 0).all())):
        raise ValueError("every response needs at least one token (a length of 0 cannot be normalised)")
    reward_chosen = beta * policy_chosen_logp / chosen_length
    reward_rejected = beta * policy_rejected_logp / rejected_length
    loss = -F.logsigmoid(reward_chosen - reward_rejected - gamma).mean()
    return loss, _preference_stats(reward_chosen, reward_rejected)


def sequential_kl(logits_ref: Tensor, logits_pol: Tensor, mask: Tensor) -> Tensor:
    """Sequential KL of a response (Zeng et al. 2024, TDPO), from the logits predicting each response
    token ([B, T, V], row t scores the vocabulary at state s_t) and the response mask [B, T]:

        D_SeqKL(x, y; pi_ref || pi) = sum_t mask_t * sum_v pi_ref(v|s_t) * (log pi_ref(v|s_t) - log pi(v|s_t))

    Returns [B]. A vocabulary entry with pi_ref(v|s_t) = 0 contributes 0; positions off the mask
    (even NaN logits there) affect neither the result nor its gradient.
    """
    if logits_ref.shape != logits_pol.shape or logits_ref.dim() != 3 or mask.shape != logits_ref.shape[:2]:
        raise ValueError(f"sequential_kl needs logits [B, T, V] of one shape and a mask [B, T], got logits_ref "
                         f"{list(logits_ref.shape)}, logits_pol {list(logits_pol.shape)}, mask {list(mask.shape)}")
    on = mask.bool().unsqueeze(-1)
    logp_ref = torch.log_softmax(torch.where(on, logits_ref, torch.zeros_like(logits_ref)), dim=-1)
    logp_pol = torch.log_softmax(torch.where(on, logits_pol, torch.zeros_like(logits_pol)), dim=-1)
    p_ref = logp_ref.exp()
    # where pi_ref(v) = 0 the log-ratio is -inf (or NaN) and its weight 0: the term is 0, and so is its gradient
    log_ratio = torch.where(p_ref > 0, logp_ref - logp_pol, torch.zeros_like(p_ref))
    return masked_sum((p_ref * log_ratio).sum(-1), mask, dim=1)


def _tdpo(
    policy_chosen_logp: Tensor,
    policy_rejected_logp: Tensor,
    ref_chosen_logp: Tensor,
    ref_rejected_logp: Tensor,
    chosen_seq_kl: Tensor,
    rejected_seq_kl: Tensor,
    beta: float,
    alpha: float,
    stop_chosen_kl: bool,
) -> tuple[Tensor, Stats]:
    _require_per_sequence(
        policy_chosen_logp=policy_chosen_logp,
        policy_rejected_logp=policy_rejected_logp,
        ref_chosen_logp=ref_chosen_logp,
        ref_rejected_logp=ref_rejected_logp,
        chosen_seq_kl=chosen_seq_kl,
        rejected_seq_kl=rejected_seq_kl,
    )
    _require_beta(beta)
    _require_alpha(alpha)
    kl_chosen = chosen_seq_kl.detach() if stop_chosen_kl else chosen_seq_kl
    reward_chosen = beta * (policy_chosen_logp - ref_chosen_logp + alpha * kl_chosen)
    reward_rejected = beta * (policy_rejected_logp - ref_rejected_logp + alpha * rejected_seq_kl)
    loss = -F.logsigmoid(reward_chosen - reward_rejected).mean()
    stats = _preference_stats(reward_chosen, reward_rejected)
    stats.update(seq_kl_chosen=chosen_seq_kl.detach().mean(), seq_kl_rejected=rejected_seq_kl.detach().mean())
    return loss, stats


def tdpo1_loss(
    policy_chosen_logp: Tensor,
    policy_rejected_logp: Tensor,
    ref_chosen_logp: Tensor,
    ref_rejected_logp: Tensor,
    chosen_seq_kl: Tensor,
    rejected_seq_kl: Tensor,
    beta: float = 0.1,
) -> tuple[Tensor, Stats]:
    """TDPO1 loss (Zeng et al. 2024, eq. 19): DPO logit minus the sequential-KL difference (see sequential_kl):

        u     = beta * ((log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)))
        delta = beta * (D_SeqKL(x, y_l; pi_ref || pi) - D_SeqKL(x, y_w; pi_ref || pi))
        loss  = mean( -log sigmoid(u - delta) )

    beta scales delta too, as in the TDPO paper and its authors' code. Default beta 0.1 as in the RTO
    paper. stats: as dpo_loss on r = beta * (log pi - log pi_ref + D_SeqKL) (their margin is u - delta),
    plus seq_kl_chosen and seq_kl_rejected (batch means of D_SeqKL).
    """
    return _tdpo(policy_chosen_logp, policy_rejected_logp, ref_chosen_logp, ref_rejected_logp,
                 chosen_seq_kl, rejected_seq_kl, beta, 1.0, stop_chosen_kl=False)


def tdpo2_loss(
    policy_chosen_logp: Tensor,
    policy_rejected_logp: Tensor,
    ref_chosen_logp: Tensor,
    ref_rejected_logp: Tensor,
    chosen_seq_kl: Tensor,
    rejected_seq_kl: Tensor,
    beta: float = 0.1,
    alpha: float = 0.2,
) -> tuple[Tensor, Stats]:
    """TDPO2 loss (Zeng et al. 2024, eq. 20): as tdpo1_loss with delta weighted by alpha and no gradient
    through the chosen side's sequential KL (sg = stop-gradient):

        delta = beta * alpha * (D_SeqKL(x, y_l; pi_ref || pi) - sg(D_SeqKL(x, y_w; pi_ref || pi)))
        loss  = mean( -log sigmoid(u - delta) )

    Defaults beta 0.1, alpha 0.2 are the RTO paper's TDPO settings (the TDPO authors' code defaults to
    alpha 0.5). stats as tdpo1_loss with r = beta * (log pi - log pi_ref + alpha * D_SeqKL), so the
    reward margin is u - delta (the TDPO authors' code logs the rewards without alpha).
    """
    return _tdpo(policy_chosen_logp, policy_rejected_logp, ref_chosen_logp, ref_rejected_logp,
                 chosen_seq_kl, rejected_seq_kl, beta, alpha, stop_chosen_kl=True)


@dataclass(frozen=True)
class PreferenceLoss:
    """A preference loss by name: its pure function, the PairScores fields it reads (passed to it in this
    order) and its hyperparameters with their defaults. Every loss is called the same way:

        loss, stats = PREFERENCE_LOSSES[name](scores, **PREFERENCE_LOSSES[name].hyperparameters(beta=...))
    """

    name: str
    fn: Callable[..., tuple[Tensor, Stats]]
    inputs: tuple[str, ...]
    defaults: dict[str, float]

    @property
    def needs_reference(self) -> bool:
        return any(n.startswith("ref_") or n.endswith("_seq_kl") for n in self.inputs)

    @property
    def needs_seq_kl(self) -> bool:
        return "chosen_seq_kl" in self.inputs

    def hyperparameters(self, **given: float | None) -> dict[str, float]:
        """This loss's defaults, each replaced by the given value where that is not None; a value given for a
        hyperparameter the loss does not take is refused (ValueError), not ignored."""
        unused = sorted(k for k, v in given.items() if v is not None and k not in self.defaults)
        if unused:
            raise ValueError(f"the {self.name} loss takes no {' or '.join(unused)} (its hyperparameters: "
                             f"{', '.join(self.defaults)})")
        return {k: default if given.get(k) is None else given[k] for k, default in self.defaults.items()}

    def __call__(self, scores: PairScores, **hyperparameters: float) -> tuple[Tensor, Stats]:
        missing = [n for n in self.inputs if getattr(scores, n) is None]
        if missing:
            raise ValueError(f"the {self.name} loss needs {', '.join(missing)}")
        return self.fn(*(getattr(scores, n) for n in self.inputs), **hyperparameters)


_LOGPS = ("policy_chosen_logp", "policy_rejected_logp")
_REF = ("ref_chosen_logp", "ref_rejected_logp")
_LENGTHS = ("chosen_length", "rejected_length")
_SEQ_KL = ("chosen_seq_kl", "rejected_seq_kl")

# Offline preference losses by name (`rto dpo --loss NAME`); defaults are the RTO paper's baseline settings
# (spec section 5), except IPO's beta, for which it gives none: DPO's 0.1.
PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {loss.name: loss for loss in (
    PreferenceLoss("dpo", dpo_loss, _LOGPS + _REF, {"beta": 0.1}),
    PreferenceLoss("ipo", ipo_loss, _LOGPS + _REF, {"beta": 0.1}),
    PreferenceLoss("rdpo", rdpo_loss, _LOGPS + _REF + _LENGTHS, {"beta": 0.1, "alpha": 0.001}),
    PreferenceLoss("simpo", simpo_loss, _LOGPS + _LENGTHS, {"beta": 2.5, "gamma": 0.5}),
    PreferenceLoss("tdpo1", tdpo1_loss, _LOGPS + _REF + _SEQ_KL, {"beta": 0.1}),
    PreferenceLoss("tdpo2", tdpo2_loss, _LOGPS + _REF + _SEQ_KL, {"beta": 0.1, "alpha": 0.2}),
)}


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
