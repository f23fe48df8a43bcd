"""A decode loop for pure sampling (and greedy decoding) over a decoder's forward and its KV cache.

What it samples is what `transformers.generate` samples with rto's sampling_config (top_k 0, top_p 1):
y_t ~ softmax(logits_t / T), logits in fp32 from the fp32 lm_head (rto.sequences.lm_logits, as the scoring
pass computes them). It spends less on the way:
  - the longest prefix every prompt shares (the chat template's system turn) is run once, at batch 1;
  - a prompt given several times in a row (PPO's group_size, pairs' samples_per_prompt) is run once;
  - a row leaves the batch (and the KV cache) as soon as it has drawn an EOS.
Each row draws its noise from its own generator (seeded from the global RNG), so the tokens of a row do not
depend on which other rows share its batch, when they finish, or how the prompts were grouped.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from transformers import DynamicCache

from rto.models import decoder_of
from rto.sequences import lm_logits


def shared_prefix_length(prompts: list[list[int]]) -> int:
    """The length of the longest common prefix of `prompts`, leaving at least one token of each prompt out of it
    (the last prompt token must run with the row's own suffix to give that row's first logits)."""
    shortest = min(map(len, prompts))
    n = 0
    while n < shortest - 1 and all(p[n] == prompts[0][n] for p in prompts):
        n += 1
    return n


def draw_tokens(logits: torch.Tensor, temperature: float, greedy: bool,
                generators: list[torch.Generator] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token per row from fp32 `logits` [b, V], its log-prob and the distribution's entropy:
    (tokens [b], log pi_T(token) [b], H = -sum_v pi_T(v) log pi_T(v) [b]).

    pi_T = softmax(logits / T) (T = 1 when greedy). Greedy takes the argmax; sampling inverts the CDF: with
    u ~ U(0, 1) from generators[i] for row i, the token is the first v with cumsum(pi_T)_v > u * sum(pi_T), so
    P(v) = pi_T(v) (up to fp32 rounding of the running sum, < 1e-7 per token) and each row's draw depends on
    its own stream only.
    """
    probs = torch.softmax(logits if greedy or temperature == 1.0 else logits / temperature, dim=-1)
    if greedy:
        tokens = logits.argmax(-1)
    else:
        cdf = probs.cumsum(-1)
        u = torch.cat([torch.rand(1, generator=g) for g in generators]).to(cdf.device)
        tokens = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
        tokens = tokens.clamp_(max=cdf.shape[-1] - 1)
    return tokens, probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).log(), torch.special.entr(probs).sum(-1)


def row_generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def _last_hidden(decoder, ids, mask, positions, cache) -> torch.Tensor:
    # the cache goes fourth, by position: transformers 5 renamed that argument (past_key_values -> cache) in place
    out = decoder(ids, mask, positions, cache, use_cache=True)
    return out.last_hidden_state[:, -1]


def _prefill(decoder, prompts: list[list[int]], pad_id: int) -> tuple[DynamicCache, torch.Tensor, torch.Tensor,
                                                                        torch.Tensor]:
    """Run `prompts` (all distinct) into a KV cache: their shared prefix once at batch 1, then each prompt's
    left-padded rest. Returns (cache, attention mask [U, L], next positions [U, 1], last hidden states [U, H]).

    Layout of row u: [shared prefix | pads | rest of prompt u]; positions count real tokens only, so every
    row sees the positions and keys a forward of its prompt alone would (up to float rounding).
    """
    device = decoder.embed_tokens.weight.device
    n = shared_prefix_length(prompts)
    cache = DynamicCache(config=decoder.config)
    rests = [p[n:] for p in prompts]
    width = max(map(len, rests))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    rest_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for u, r in enumerate(rests):
        ids[u, width - len(r):] = torch.tensor(r, dtype=torch.long)
        rest_mask[u, width - len(r):] = 1
    if n:
        prefix = torch.tensor([prompts[0][:n]], dtype=torch.long, device=device)
        _last_hidden(decoder, prefix, torch.ones_like(prefix), torch.arange(n, device=device)[None], cache)
        cache.reorder_cache(torch.zeros(len(prompts), dtype=torch.long, device=device))
    mask = torch.cat([torch.ones((len(prompts), n), dtype=torch.long), rest_mask], 1).to(device)
    positions = (n + rest_mask.cumsum(-1) - 1).clamp(min=0).to(device)
    hidden = _last_hidden(decoder, ids.to(device), mask, positions, cache)
    return cache, mask, positions[:, -1:] + 1, hidden


@torch.inference_mode()
def sample(model, prompts: list[list[int]], *, max_new_tokens: int, eos_ids: set[int], pad_id: int,
           temperature: float = 1.0, greedy: bool = False, seeds: list[int] | None = None,
           autocast=None) -> tuple[list[list[int]], list[bool], list[list[float]], list[list[float]]]:
    """Responses to `prompts`, each cut after its first EOS (kept): (tokens, ended, log pi_T of each token,
    entropy of pi_T at each token).

    `seeds` (one per prompt; drawn from the global RNG when None) seed each row's noise; `autocast` (a
    context-manager factory) wraps the decoder's forward, the logits stay fp32. The model is used as it is
    (call it in eval mode).
    """
    if not prompts or min(map(len, prompts)) == 0:
        raise ValueError("every prompt needs at least one token")
    if seeds is None and not greedy:
        seeds = torch.randint(0, 2**62, (len(prompts),)).tolist()
    decoder = decoder_of(model)
    unique = list(dict.fromkeys(map(tuple, prompts)))
    row_of = {p: u for u, p in enumerate(unique)}
    source = torch.tensor([row_of[tuple(p)] for p in prompts])
    tokens: list[list[int]] = [[] for _ in prompts]
    logps: list[list[float]] = [[] for _ in prompts]
    entropies: list[list[float]] = [[] for _ in prompts]
    ended = [False] * len(prompts)
    generators = None if greedy else row_generators(seeds)
    with autocast() if autocast is not None else nullcontext():
        cache, mask, positions, hidden = _prefill(decoder, [list(p) for p in unique], pad_id)
    device = hidden.device
    source = source.to(device)
    if len(unique) != len(prompts):  # copy each distinct prompt's cache rows to the rows that repeat it
        cache.reorder_cache(source)
    mask, positions, hidden = mask[source], positions[source], hidden[source]
    active = list(range(len(prompts)))  # the original index of each row still in the batch
    eos = torch.tensor(sorted(eos_ids), device=device)
    for step in range(max_new_tokens):
        drawn, logp, entropy = draw_tokens(lm_logits(model, hidden), temperature, greedy,
                                           None if greedy else [generators[i] for i in active])
        done = torch.isin(drawn, eos)
        for i, tok, lp, h, fin in zip(active, drawn.tolist(), logp.tolist(), entropy.tolist(), done.tolist()):
            tokens[i].append(tok)
            logps[i].append(lp)
            entropies[i].append(h)
            ended[i] = fin
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        if bool(done.any()):
            keep = (~done).nonzero().flatten()
            cache.reorder_cache(keep)
            active = [active[k] for k in keep.tolist()]
            drawn, mask, positions = drawn[keep], mask[keep], positions[keep]
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], 1)
        with autocast() if autocast is not None else nullcontext():
            hidden = _last_hidden(decoder, drawn[:, None], mask, positions, cache)
        positions = positions + 1
    return tokens, ended, logps, entropies
