"""Per-token rewards for PPO: the RTO reward (paper eq. 4.7) and its parts.

Building rewards is one step; turning them into advantages is the next (`rto.advantages`).
Dense tensors are [B, T] over response tokens (right-padded; `mask` 1 on response tokens,
EOS included, 0 on padding); per-sequence tensors are [B]. Log-probs are those of the sampled
tokens. Rewards are rollout data: compute them under `torch.no_grad()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from rto.advantages import masked_sum, require_dense, require_same_shape

if TYPE_CHECKING:
    from rto.experience import Experience


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


# ---- granularity: where the dense DPO term is paid (paper section 5 ablations) -------------------
GRANULARITIES = ("token", "sentence", "delayed", "shaping")
SENTENCE_END_CHARS = (".", "!", "?", "\n")


def token_pieces(tokenizer, response_ids: list[list[int]]) -> list[list[str]]:
    """Each response token decoded on its own (special tokens such as EOS decode to ''), one list per response."""
    text = {t: tokenizer.decode([t], skip_special_tokens=True) for t in {t for ids in response_ids for t in ids}}
    return [[text[t] for t in ids] for ids in response_ids]


def sentence_ends(pieces: list[list[str]], mask: Tensor) -> Tensor:
    """[B, T] bool: True at response token t of row b when pieces[b][t] (its decoded text, see token_pieces)
    contains '.', '!', '?' or a newline; False elsewhere and outside the mask.

    A rule on text only, so a decimal point or an abbreviation ("3.5", "e.g.") ends a sentence too. The last
    response token always ends a sentence as well: sentence_rewards adds it, whatever its text.
    """
    if mask.dim() != 2 or len(pieces) != mask.shape[0] or any(len(row) > mask.shape[1] for row in pieces):
        raise ValueError(f"pieces ({len(pieces)} rows, longest {max(map(len, pieces), default=0)}) do not fit "
                         f"the mask {list(mask.shape)}")
    ends = torch.zeros(mask.shape, dtype=torch.bool)
    for b, row in enumerate(pieces):
        for t, piece in enumerate(row):
            ends[b, t] = any(c in piece for c in SENTENCE_END_CHARS)
    return ends.to(mask.device) & mask.bool()


def delayed_rewards(dense: Tensor, mask: Tensor) -> Tensor:
    """All of a response's reward summed onto its last token (the paper's "delayed DPO reward" ablation):

        r'_t = [t == H] * sum_{k=1..H} r_k

    0 outside the mask.
    """
    require_dense(dense=dense, mask=mask)
    return place_on_last_token(masked_sum(dense, mask, dim=1), mask)


def sentence_rewards(dense: Tensor, mask: Tensor, ends: Tensor) -> Tensor:
    """Semi-RTO: each sentence's summed reward placed on its last token.

        r'_t = [t ends a sentence] * sum_{k = s(t)..t} r_k,    s(t) = the token after the previous sentence end

    Sentence ends are the True entries of `ends` ([B, T] bool, e.g. from sentence_ends) inside the mask,
    plus the last response token H, which always ends one. 0 outside the mask.
    """
    require_dense(dense=dense, mask=mask, ends=ends)
    on = mask.bool()
    is_end = (ends.bool() & on).scatter(1, last_token_index(mask).unsqueeze(1), True)
    sentence = is_end.long().cumsum(1) - is_end.long()  # index of the sentence each token belongs to
    kept = torch.where(on, dense, torch.zeros_like(dense))
    sums = torch.zeros_like(kept).scatter_add(1, sentence, kept)  # row b, column s: the sum of sentence s
    return torch.where(is_end, sums.gather(1, sentence), torch.zeros_like(kept))


def shaping_rewards(dense: Tensor, mask: Tensor) -> Tensor:
    """RS-PPO: the dense reward on every token, and its sum taken off again at the last token:

        r'_t = r_t - [t == H] * sum_{k=1..H} r_k

    so every response receives 0 in total and its return is the rest of its reward (the RM score minus the
    KL). This is potential-based shaping with potential Phi(s_t) = sum_{k<t} r_k and Phi = 0 after the last
    token: r_t = Phi(s_{t+1}) - Phi(s_t). 0 outside the mask.
    """
    require_dense(dense=dense, mask=mask)
    kept = torch.where(mask.bool(), dense, torch.zeros_like(dense))
    return kept - delayed_rewards(dense, mask)


def place_dpo_reward(dense: Tensor, mask: Tensor, granularity: str = "token", ends: Tensor | None = None) -> Tensor:
    """The dense DPO term [B, T] paid at the chosen granularity (GRANULARITIES):

        token     RTO: on every token, as it is
        sentence  Semi-RTO: each sentence's sum on its last token (sentence_rewards; needs `ends`)
        delayed   the whole sum on the last token (delayed_rewards)
        shaping   RS-PPO: on every token, minus its sum at the last token (shaping_rewards)

    token, sentence and delayed keep each response's total; shaping makes it 0.
    """
    if granularity == "token":
        return dense
    if granularity == "sentence":
        if ends is None:
            raise ValueError("granularity 'sentence' needs the sentence ends (see rto.rewards.sentence_ends)")
        return sentence_rewards(dense, mask, ends)
    if granularity == "delayed":
        return delayed_rewards(dense, mask)
    if granularity == "shaping":
        return shaping_rewards(dense, mask)
    raise ValueError(f"unknown granularity {granularity!r}; valid: {', '.join(GRANULARITIES)}")


def _require_finite(**betas: float) -> None:
    for name, beta in betas.items():
        if not math.isfinite(beta):
            raise ValueError(f"{name} must be finite, got {beta}")


# ---- the terms of eq. 4.7, shared by token_rewards and compose_rewards ----------------------------
def dense_term(dense: Tensor, mask: Tensor, weight: float, clip: float | None, granularity: str = "token",
               ends: Tensor | None = None) -> Tensor:
    """A dense reward term as paid: place(clip(weight * dense_t, +-clip)) at `granularity` (place_dpo_reward).
    The clip applies per token to the weighted value (RTO's dpo_clip); 0 outside the mask."""
    on = mask.bool()
    scaled = torch.where(on, clip_symmetric(weight * dense, clip), torch.zeros_like(dense))
    return place_dpo_reward(scaled, mask, granularity, ends)


def sparse_term(score: Tensor, mask: Tensor, weight: float, clip: float | None) -> Tensor:
    """A per-response score [B] paid on the last response token: [t == H] * weight * clip(score, +-clip)."""
    return weight * place_on_last_token(clip_symmetric(score, clip), mask)


def kl_term(logp: Tensor, logp_ref: Tensor, mask: Tensor, beta_kl: float) -> Tensor:
    """The KL penalty -beta_kl * (log pi(y_t) - log pi_ref(y_t)) (k1, see token_rewards); 0 outside the mask."""
    return torch.where(mask.bool(), -beta_kl * kl_k1(logp, logp_ref), torch.zeros_like(logp))


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
    granularity: str = "token",
    sentence_ends: Tensor | None = None,
    per_term: bool = False,
) -> Tensor:
    """The RTO reward, paper eq. 4.7, per response token t = 1..H (H = last masked token):

        r_t = clip(beta_dpo * (log pi_dpo(y_t) - log pi_ref(y_t)), +-dpo_clip)  # dense: DPO token reward
            - beta_kl * KL_t(log pi(y_t), log pi_ref(y_t))                     # dense: KL penalty (k1)
            + [t == H] * beta_rm * clip(rm_score, +-rm_clip)                   # sparse: RM score

    with the DPO term paid at `granularity` (place_dpo_reward): "token" is eq. 4.7 as written (RTO);
    "sentence" (Semi-RTO, needs `sentence_ends` [B, T] bool), "delayed" and "shaping" (RS-PPO) move it.
    per_term=True returns the three terms stacked, [3, B, T] in the order (DPO as placed, -beta_kl * KL,
    RM): r = dpo + kl + rm. Default: r itself, [B, T]. The PPO stage builds the same sum from reward
    sources (compose_rewards: the "dpo" and "rm" sources with weights beta_dpo and beta_rm).

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
    - rm_score is per-sequence [B], already normalised by the caller (normalised_rm_score).
    - dpo_clip caps the scaled DPO term per token (0.05 as in the authors' public script, which
      caps the raw log-ratio at +-1 nat; the paper does not mention it); rm_clip caps the score.
      None means no clip. A beta of 0 switches its term off; it never means "unscaled".
    - Everything outside the mask is 0 (whatever the inputs hold there).

    Returns dense rewards [B, T] (or [3, B, T] with per_term).
    """
    require_dense(logp=logp, logp_ref=logp_ref, mask=mask)
    _require_finite(beta_dpo=beta_dpo, beta_kl=beta_kl, beta_rm=beta_rm)
    _check_kl_and_granularity(kl_estimator, granularity)
    zeros = torch.zeros_like(logp)
    dpo = zeros
    if logp_dpo is not None:
        ref_t1 = logp_ref if logp_ref_t1 is None else logp_ref_t1
        require_same_shape(logp=logp, logp_dpo=logp_dpo, logp_ref_t1=ref_t1)
        dpo = dense_term(logp_dpo - ref_t1, mask, beta_dpo, dpo_clip, granularity, sentence_ends)
    kl = kl_term(logp, logp_ref, mask, beta_kl)
    rm = zeros if rm_score is None else sparse_term(rm_score, mask, beta_rm, rm_clip).to(logp.dtype)

    rewards = dpo + kl + rm  # eq. 4.7
    return torch.stack([dpo, kl, rm]) if per_term else rewards


def _check_kl_and_granularity(kl_estimator: str, granularity: str) -> None:
    if kl_estimator != "k1":
        raise ValueError(f"the KL penalty in the reward must use the k1 estimator, got {kl_estimator!r}: as a "
                         "reward, k2 and k3 give a biased policy gradient (see rto.rewards.token_rewards)")
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; valid: {', '.join(GRANULARITIES)}")


# ---- reward sources: one contract for everything that pays reward ---------------------------------
@dataclass(frozen=True)
class RewardSource:
    """Something that pays reward: `reward(exp)` maps a scored rollout (rto.experience.Experience) to
    unweighted [B, T] rewards on its response tokens (0 on padding).

    dense   True: a per-token reward, weighted, clipped per token by --dpo_clip and paid at --granularity;
            False: a per-response score placed on the last token (its [B, T] output is read there), clipped
            by --rm_clip and never moved by the granularity.
    needs_dpo_model  the source reads exp.tokens.logp_dpo (log pi_dpo at temperature 1), so PPO loads
            --dpo_model and scores it.
    """

    name: str
    reward: Callable[["Experience"], Tensor]
    dense: bool = True
    needs_dpo_model: bool = False


REWARD_SOURCES: dict[str, RewardSource] = {}


def register_source(name: str, *, dense: bool = True, needs_dpo_model: bool = False):
    """Decorator: register `fn(exp) -> [B, T]` as the reward source `name` (usable in PPO's --sources)."""
    def add(fn: Callable[["Experience"], Tensor]) -> Callable[["Experience"], Tensor]:
        if name in REWARD_SOURCES or name == "kl":
            raise ValueError(f"a reward source named {name!r} exists already")
        REWARD_SOURCES[name] = RewardSource(name, fn, dense, needs_dpo_model)
        return fn
    return add


def _dpo_logp(exp: "Experience") -> Tensor:
    if exp.tokens.logp_dpo is None:
        raise ValueError("this reward source reads log pi_dpo: score the rollout with the DPO model (--dpo_model)")
    return exp.tokens.logp_dpo


@register_source("dpo", needs_dpo_model=True)
def dpo_implicit_reward(exp: "Experience") -> Tensor:
    """log pi_dpo(y_t|s_t) - log pi_ref(y_t|s_t), both at temperature 1: the token-level implicit reward of a
    model trained against pi_ref with a reference-based loss (DPO, IPO, R-DPO, TDPO), up to its beta."""
    ref_t1 = exp.tokens.logp_ref if exp.tokens.logp_ref_t1 is None else exp.tokens.logp_ref_t1
    mask = exp.batch.response_mask
    return torch.where(mask.bool(), _dpo_logp(exp) - ref_t1, torch.zeros_like(ref_t1))


@register_source("simpo", needs_dpo_model=True)
def simpo_implicit_reward(exp: "Experience") -> Tensor:
    """log pi_simpo(y_t|s_t) / |y| at temperature 1: SimPO's reference-free, length-normalised reward
    (beta / |y|) * log pi(y|x) spread over the tokens, up to its beta; summed over a response it is the mean
    token log-prob."""
    mask = exp.batch.response_mask
    length = mask.sum(-1, keepdim=True).clamp(min=1)
    logp_dpo = _dpo_logp(exp)
    return torch.where(mask.bool(), logp_dpo / length, torch.zeros_like(logp_dpo))


@register_source("rm", dense=False)
def reward_model_score(exp: "Experience") -> Tensor:
    """The reward model's normalised score of each response (exp.seqs.rm_score, see normalised_rm_score) on
    its last token: the sparse term of classic RLHF."""
    return place_on_last_token(exp.seqs.rm_score, exp.batch.response_mask)


def normalised_rm_score(rm_raw: Tensor, stats: tuple[float, float], ended: Tensor,
                        missing_eos_penalty: float | None = None) -> Tensor:
    """(rm_raw - mu) / sigma with the reward model's training statistics (mu, sigma), minus
    `missing_eos_penalty` for each response that did not end with EOS (None: no penalty). [B] -> [B]."""
    mean, std = stats
    score = (rm_raw - mean) / std
    if missing_eos_penalty is not None:
        score = torch.where(ended.bool(), score, score - missing_eos_penalty)
    return score


def check_sources(weights: dict[str, float]) -> None:
    """Every name a registered reward source, every weight finite; one-line errors naming what is wrong."""
    unknown = sorted(set(weights) - set(REWARD_SOURCES))
    if unknown:
        raise ValueError(f"unknown reward source(s) {unknown}; registered: {', '.join(REWARD_SOURCES)} "
                         "(add one with rto.rewards.register_source)")
    _require_finite(**{f"weight of {name!r}": float(w) for name, w in weights.items()})


@dataclass
class RewardTerms:
    """The rewards of one rollout, term by term as paid ([B, T] each; r = their sum), and per dense source
    the share of response tokens its per-token clip cut."""

    terms: dict[str, Tensor]
    clipfrac: dict[str, float]

    @property
    def total(self) -> Tensor:
        return torch.stack(list(self.terms.values())).sum(0)


def compose_rewards(exp: "Experience", weights: dict[str, float], *, beta_kl: float, dense_clip: float | None,
                    sparse_clip: float | None, granularity: str = "token", ends: Tensor | None = None) -> RewardTerms:
    """Token rewards from weighted reward sources plus the KL penalty:

        r_t = sum_{dense s}  place(clip(w_s * s_t, +-dense_clip))            # at `granularity`
            + sum_{sparse s} [t == H] * w_s * clip(s_H, +-sparse_clip)        # on the last token
            - beta_kl * (log pi(y_t) - log pi_ref(y_t))                       # k1, at the sampling temperature

    RTO (eq. 4.7, token_rewards) is weights {"dpo": beta_dpo, "rm": beta_rm}; classic PPO is {"rm": beta_rm}.
    Returns every term (named by its source, plus "kl") and the clip fraction of each dense source.
    """
    check_sources(weights)
    _check_kl_and_granularity("k1", granularity)
    mask = exp.batch.response_mask
    terms, clipfrac = {}, {}
    for name, weight in weights.items():
        source = REWARD_SOURCES[name]
        reward = source.reward(exp)
        require_same_shape(mask=mask, **{name: reward})
        if source.dense:
            terms[name] = dense_term(reward, mask, weight, dense_clip, granularity, ends)
            if dense_clip is not None:
                cut = ((weight * reward).abs() > dense_clip) & mask.bool()
                clipfrac[name] = float(cut.sum() / mask.sum().clamp(min=1))
        else:
            terms[name] = sparse_term(reward.gather(1, last_token_index(mask).unsqueeze(1)).squeeze(1), mask,
                                      weight, sparse_clip).to(reward.dtype)
    terms["kl"] = kl_term(exp.tokens.logp, exp.tokens.logp_ref, mask, beta_kl)
    return RewardTerms(terms, clipfrac)


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
