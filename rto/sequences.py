"""Token batches in one layout for every stage: [left-padded prompt | right-padded response].

With the prompt block of width P and the response block of width T, response token t sits at
position P + t, is predicted by the logits at position P + t - 1, and its value V(s_t) is read at
the same position. Masks come from lengths, never from comparing token ids with the pad id
(SmolLM2's pad token is its EOS token).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from rto.lora import recomputes_layers
from rto.models import ValueModel, decoder_of
from rto.trunk import role_hidden, trunk_hidden


@dataclass
class SeqBatch:
    input_ids: torch.Tensor  # [B, P+T] long
    attention_mask: torch.Tensor  # [B, P+T] long, 1 on real prompt and response tokens
    position_ids: torch.Tensor  # [B, P+T] long, 0-based from each row's first real token
    response_mask: torch.Tensor  # [B, T] float, 1 on response tokens (EOS included)
    prompt_width: int  # P

    @property
    def response_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_width :]

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1).long()

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: torch.Tensor | slice) -> "SeqBatch":
        return SeqBatch(
            self.input_ids[index], self.attention_mask[index], self.position_ids[index],
            self.response_mask[index], self.prompt_width,
        )

    def tight(self) -> tuple["SeqBatch", slice]:
        """This batch without the columns that are padding in every row (the prompt block's first ones, the
        response block's last ones), and the slice of this batch's columns it keeps; each token keeps its
        position id, so a forward over it gives every real token's states as the full batch's does."""
        prompt_lengths = self.attention_mask[:, :self.prompt_width].sum(-1)
        lead = self.prompt_width - int(prompt_lengths.max()) if len(self) else 0
        T = int(self.response_lengths.max()) if len(self) else 0
        keep = slice(lead, self.prompt_width + T)
        return SeqBatch(self.input_ids[:, keep], self.attention_mask[:, keep], self.position_ids[:, keep],
                        self.response_mask[:, :T], self.prompt_width - lead), keep

    def to(self, device) -> "SeqBatch":
        return SeqBatch(*(getattr(self, f.name).to(device) if f.name != "prompt_width" else self.prompt_width
                          for f in fields(self)))


def collate(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> SeqBatch:
    """Left-pad the prompts, right-pad the responses, and build masks and positions from lengths."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if any(len(r) == 0 for r in responses):
        raise ValueError("every response needs at least one token")
    P, T, B = max(map(len, prompts)), max(map(len, responses)), len(prompts)
    input_ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P + T), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[i, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
        input_ids[i, P : P + len(r)] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, P - len(p) : P + len(r)] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return SeqBatch(input_ids, attention_mask, position_ids, attention_mask[:, P:].float(), P)


def probe_batch(prompt_ids: list[list[int]], pad_id: int, response_tokens: int = 32) -> SeqBatch:
    """A small batch to compare two ways of running a model (rto.trunk.checked_trunk_layers): the first two
    prompts, each followed by a response of `response_tokens` tokens made of the prompt's own tokens repeated
    (any tokens serve to compare two forward paths; prompts of different lengths exercise the left padding)."""
    prompts = [list(p) or [pad_id] for p in prompt_ids[:2]]
    if not prompts:
        raise ValueError("a probe batch needs at least one prompt")
    responses = [(p * (response_tokens // len(p) + 1))[:response_tokens] for p in prompts]
    return collate(prompts, responses, pad_id)


def cut_at_eos(tokens: list[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    """Truncate a generated response after its first EOS (kept). Returns (tokens, ended_with_eos)."""
    for i, tok in enumerate(tokens):
        if tok in eos_ids:
            return tokens[: i + 1], True
    return tokens, False


def shared_trunk(model, batch: SeqBatch, n_frozen: int) -> torch.Tensor | None:
    """The frozen bottom's hidden states for `batch` (None when nothing is shared: roles run their full stack)."""
    if not n_frozen:
        return None
    return trunk_hidden(model, n_frozen, batch.input_ids, batch.attention_mask, batch.position_ids)


def shared_prefix_length(prompts: list[list[int]]) -> int:
    """The length of the longest common prefix of `prompts`, leaving at least one token of each prompt out of it
    (the last prompt token must run with the row's own suffix to give that row's first logits)."""
    shortest = min(map(len, prompts))
    n = 0
    while n < shortest - 1 and all(p[n] == prompts[0][n] for p in prompts):
        n += 1
    return n


def shared_prefix_width(batch: SeqBatch) -> int:
    """shared_prefix_length of the prompts of `batch` (0 for a single row: nothing to share)."""
    if len(batch) < 2:
        return 0
    lengths = batch.attention_mask[:, :batch.prompt_width].sum(-1).tolist()
    return shared_prefix_length([row[batch.prompt_width - n : batch.prompt_width]
                                 for row, n in zip(batch.input_ids.tolist(), lengths)])


def without_prefix(batch: SeqBatch, n: int) -> SeqBatch:
    """`batch` with the first `n` prompt tokens of every row taken out: row i, [pads | prefix | rest | response],
    becomes [pads | rest | response] (prompt width P - n); every kept token keeps its position id."""
    starts = batch.prompt_width - batch.attention_mask[:, :batch.prompt_width].sum(-1)
    col = torch.arange(batch.input_ids.shape[1] - n, device=starts.device)[None]
    index = col + n * (col >= starts[:, None])  # a row's pads stay, its columns from the prefix on move n left
    return SeqBatch(batch.input_ids.gather(1, index), batch.attention_mask.gather(1, index),
                    batch.position_ids.gather(1, index), batch.response_mask, batch.prompt_width - n)


def prefix_once_hidden(model, batch: SeqBatch, n: int) -> torch.Tensor | None:
    """Final hidden states of `batch` in the layout of without_prefix(batch, n), [B, L - n, H], with the n prompt
    tokens every row shares run once, at batch 1, into a KV cache that every row's rest then attends to: the
    states a full forward gives at those columns, up to float rounding, for 1 / B of the prefix's products.
    None for models with other than plain full-attention cache layers (sliding windows count cache slots, and
    the prefix would shift them), which need the full forward."""
    decoder = decoder_of(model)
    cache = DynamicCache(config=decoder.config)
    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    start = batch.prompt_width - int(batch.attention_mask[0, :batch.prompt_width].sum())
    prefix = batch.input_ids[:1, start : start + n]
    positions = torch.arange(n, device=prefix.device)[None]
    # the cache goes fourth, by position: transformers 5 renamed that argument (past_key_values -> cache)
    decoder(prefix, torch.ones_like(prefix), positions, cache, use_cache=True)
    cache.batch_repeat_interleave(len(batch))
    rest = without_prefix(batch, n)
    mask = torch.cat([rest.attention_mask.new_ones(len(batch), n), rest.attention_mask], 1)
    return decoder(rest.input_ids, mask, rest.position_ids, cache, use_cache=True).last_hidden_state


def _response_hidden(model, batch: SeqBatch, trunk, n_frozen) -> torch.Tensor:
    """Hidden states at positions P-1 .. P+T-1 ([B, T+1, H]): state before each response token, and after the last.
    Without a shared trunk, the prompt prefix that every row shares runs once (prefix_once_hidden), in scoring
    and in training alike (its gradient then gathers every row's share, as B copies of it would); not when the
    layers are recomputed in the backward pass (gradient checkpointing), which would write the cache twice."""
    if trunk is None and not (torch.is_grad_enabled() and recomputes_layers(model)):
        n = shared_prefix_width(batch)
        hidden = prefix_once_hidden(model, batch, n) if n else None
        if hidden is not None:
            return hidden[:, batch.prompt_width - n - 1 :]
    hidden = role_hidden(model, batch, trunk, n_frozen)
    return hidden[:, batch.prompt_width - 1 :]


def lm_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token logits in fp32, whatever autocast is active: lm_head runs on fp32 hidden states with the
    fp32 master weights, then the model's final-logit soft-cap where it has one (Gemma2:
    logits = cap * tanh(logits / cap)), exactly as the model's own forward and `generate` compute them.

    The DPO token log-ratios RTO uses as rewards are 0.005-0.05 nats: the size of bf16 rounding of logits
    of 10-30, so they are never computed from bf16 logits.
    """
    head = model.lm_head
    with torch.autocast(hidden.device.type, enabled=False):
        # one 2-D product: a 3-D slice that is not contiguous would run as a batched product (the decode loop runs
        # the head's product with a packed weight, or as (W h^T)^T: rto.decoding.PackedProducts)
        logits = head(hidden.float().reshape(-1, hidden.shape[-1])).contiguous().view(*hidden.shape[:-1], -1)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def response_logits(model, batch: SeqBatch, trunk=None, n_frozen: int = 0) -> torch.Tensor:
    """fp32 logits predicting each response token, [B, T, V] (row t predicts y_t from s_t)."""
    return lm_logits(model, _response_hidden(model, batch, trunk, n_frozen)[:, :-1])


class PickedLogProb(torch.autograd.Function):
    """log softmax(z)[y] = z_y - logsumexp(z) over the last dimension, and its gradient

        d/dz_v = g * (1[v = y] - softmax(z)_v)

    with one temporary of z's size in each direction (z - max, exponentiated in place; then -g * softmax(z)
    with g added at y), where logsumexp and gather allocate five between them: over a 49k vocabulary each one
    is a fresh block of tens to hundreds of MB whose pages the kernel must hand over."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        top = logits.amax(-1, keepdim=True)
        top = top.masked_fill(~top.isfinite(), 0.0)  # rows of -inf (or inf): as torch.logsumexp
        lse = torch.sub(logits, top).exp_().sum(-1, keepdim=True).log_().add_(top)
        ctx.save_for_backward(logits, index, lse)
        return (logits.gather(-1, index) - lse).squeeze(-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        logits, index, lse = ctx.saved_tensors
        g = grad.unsqueeze(-1)
        dz = torch.sub(logits, lse).exp_().mul_(-g)
        return dz.scatter_add_(-1, index, g), None


def picked_logprobs(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits, -1) at `index` (one class per row: logits [..., V], index [...]) -> [...]."""
    return PickedLogProb.apply(logits, index.unsqueeze(-1))


def picked_logprobs_(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """picked_logprobs computed in the memory of `logits`, which it overwrites (z - max, then its exp): for logits
    nobody reads again and no gradient flows through. The same operations as PickedLogProb's forward, without
    its vocabulary-sized temporary (126 MB for a scoring chunk of 16 x 40 tokens over a 49k vocabulary)."""
    picked = logits.gather(-1, index.unsqueeze(-1))
    top = logits.amax(-1, keepdim=True)
    top = top.masked_fill(~top.isfinite(), 0.0)
    lse = logits.sub_(top).exp_().sum(-1, keepdim=True).log_().add_(top)
    return (picked - lse).squeeze(-1)


def logprobs_from_logits(logits: torch.Tensor, batch: SeqBatch, temperature: float = 1.0,
                         consume: bool = False) -> torch.Tensor:
    """log pi_T(y_t | s_t) = log_softmax(logits / T)[y_t], [B, T]; 0 off the response mask. With `consume` (no
    gradient), the logits are overwritten: their last use."""
    if consume and not (torch.is_grad_enabled() and logits.requires_grad):
        logits = logits.div_(temperature) if temperature != 1.0 else logits
        return picked_logprobs_(logits, batch.response_ids) * batch.response_mask
    if temperature != 1.0:
        logits = logits / temperature
    return picked_logprobs(logits, batch.response_ids) * batch.response_mask


def entropy_from_logits(logits: torch.Tensor, batch: SeqBatch, temperature: float = 1.0) -> torch.Tensor:
    """H_t = -sum_v pi_T(v | s_t) log pi_T(v | s_t), the entropy of the sampling distribution, [B, T]; 0 off the mask.

    With e_v = exp((logits_v - max_u logits_u) / T) and S = sum_v e_v, pi_T(v) = e_v / S and

        H = log S - (sum_v e_v log e_v) / S

    computed with one temporary of the logits' size (e, then e log e in place), where log_softmax, exp and their
    product would allocate three or four: each is 126 MB for a scoring chunk of 16 x 40 tokens over a 49k
    vocabulary. Every e_v log e_v is <= 0, so nothing cancels; a -inf logit (e_v = 0) adds 0."""
    top = logits.amax(-1, keepdim=True)
    top = top.masked_fill(~top.isfinite(), 0.0)
    e = torch.sub(logits, top).div_(temperature).exp_()
    total = e.sum(-1)
    return (total.log() - e.xlogy_(e).sum(-1) / total) * batch.response_mask


def token_logprobs(model, batch: SeqBatch, trunk=None, n_frozen: int = 0, temperature: float = 1.0) -> torch.Tensor:
    """log pi(y_t | s_t) of the response tokens, [B, T], from log_softmax(logits / temperature) in fp32; 0 off the mask."""
    return logprobs_from_logits(response_logits(model, batch, trunk, n_frozen), batch, temperature, consume=True)


def token_values(model: ValueModel, batch: SeqBatch, trunk=None, n_frozen: int = 0) -> torch.Tensor:
    """Head outputs at positions P-1 .. P+T-1, [B, T+1]: column t < T is V(s_t), column len is the score."""
    return model.values(_response_hidden(model, batch, trunk, n_frozen))


def critic_values(all_values: torch.Tensor, batch: SeqBatch) -> torch.Tensor:
    """V(s_t) for t < T, 0 outside the response mask."""
    return all_values[:, :-1] * batch.response_mask


POOLINGS = ("last", "mean")


def sequence_scores(all_values: torch.Tensor, batch: SeqBatch, pooling: str = "last") -> torch.Tensor:
    """Reward-model score of each sequence, [B]:

        last: v(s_H+1), the head output on the last response token (the usual reward model)
        mean: (1/H) * sum_t v(s_t+1), the head output averaged over the response tokens
    """
    if pooling == "last":
        return all_values.gather(1, batch.response_lengths.unsqueeze(1)).squeeze(1)
    if pooling == "mean":
        mask = batch.response_mask
        return (all_values[:, 1:] * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def nll_loss(model, batch: SeqBatch, trunk=None, n_frozen: int = 0) -> torch.Tensor:
    """Mean negative log-likelihood of the response tokens (SFT)."""
    logits = response_logits(model, batch, trunk, n_frozen)
    nll = F.cross_entropy(logits.flatten(0, 1), batch.response_ids.flatten(), reduction="none")
    mask = batch.response_mask.flatten()
    return (nll * mask).sum() / mask.sum().clamp(min=1)
