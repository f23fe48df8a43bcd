"""A decode loop for pure sampling (and greedy decoding) over a decoder's forward and its KV cache.

What it samples is what `transformers.generate` samples with rto's sampling_config (top_k 0, top_p 1):
y_t ~ softmax(logits_t / T), logits in fp32 from the fp32 lm_head (rto.sequences.lm_logits, as the scoring
pass computes them). It spends less on the way:
  - a prompt given several times in a row (PPO's group_size, pairs' samples_per_prompt) is run once;
  - a row leaves the batch (and the KV cache) as soon as it has drawn an EOS;
  - the KV cache is written in place into buffers sized for the whole response (PreallocatedLayer), instead of
    being concatenated into a new tensor at every step, which copies all of it;
  - every linear layer's weight (the LM head's too) is cast once for the loop and, where oneDNN's packed products
    pay (not the decoder's fp32 layers on Intel's CPUs), packed in the layout oneDNN's matmul reads, instead of at
    every product (PackedProducts);
With `trunk_layers=n` it also returns the hidden states after the bottom n layers at every prompt and response
token: what the scoring pass would otherwise recompute as the shared trunk (rto.trunk.trunk_hidden).
Each row draws its noise from its own generator (seeded from the global RNG), every prompt is prefilled whole,
left-padded (a prefix shared by all prompts is not run once: see _prefill), and a product of fewer than 16 rows
runs on 16 (PackedProducts.MIN_ROWS), so the tokens of a row do not depend on which other rows share its batch,
when they finish, or how the prompts were grouped.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from functools import lru_cache, partial

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from rto.distributed import is_sharded
from rto.models import decoder_of
from rto.runtime import cpu_vendor
from rto.sequences import lm_logits
from rto.trunk import bottom_view


def draw_tokens(logits: torch.Tensor, temperature: float, greedy: bool, generators: list[torch.Generator] | None,
                work: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token per row from fp32 `logits` [b, V], its log-prob and the distribution's entropy:
    (tokens [b], log pi_T(token) [b], H = -sum_v pi_T(v) log pi_T(v) [b]).

    pi_T = softmax(logits / T) (T = 1 when greedy). Greedy takes the argmax; sampling inverts the CDF: with
    u ~ U(0, 1) from generators[i] for row i, the token is the first v with cumsum(pi_T)_v > u * sum(pi_T), so
    P(v) = pi_T(v) (up to fp32 rounding of the running sum, < 1e-7 per token) and each row's draw depends on
    its own stream only.

    `work`, a float tensor of at least [b, V] (its first b rows are overwritten), holds the entropy's terms and
    then the CDF: a decode loop that passes the same one at every step writes them into memory it already
    has, instead of two fresh vocabulary-sized blocks whose pages the kernel must hand over at every step
    (on a 2-core VM, 5.6k -> 0.9k page faults per batch-32 step; the same numbers).
    """
    probs = torch.softmax(logits if greedy or temperature == 1.0 else logits / temperature, dim=-1)
    work = work[: len(probs)] if work is not None else None
    # p log p through the vectorised log: torch.special.entr, the same terms, took 3.8-6.9 ms against 1.3 ms for
    # 32 x 49152 probabilities on a 2-core Xeon (AVX512); 0 log 0 = nan -> 0
    entropy = torch.log(probs, out=work).mul_(probs).nan_to_num_(0.0).sum(-1).neg_()
    if greedy:
        tokens = logits.argmax(-1)
    else:
        cdf = torch.cumsum(probs, -1, out=work)
        u = torch.cat([torch.rand(1, generator=g) for g in generators]).to(cdf.device)
        tokens = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
        tokens = tokens.clamp_(max=cdf.shape[-1] - 1)
    return tokens, probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).log(), entropy


def row_generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


class PreallocatedLayer(DynamicLayer):
    """A full-attention KV-cache layer whose keys and values live in buffers with room for `capacity` positions:
    each step writes its new positions in place and `keys` / `values` are views of the filled part, so attention
    reads the numbers a concatenating DynamicLayer holds, without copying the whole cache at every step (about
    a sixth of a batch-32 decode step on a 2-core CPU). Outgrowing the capacity reallocates (twice as large).

    With `dtype` (the active autocast's, bf16), the buffers hold keys and values in that dtype: attention under
    autocast casts its inputs to it anyway, so it reads the same numbers, but casts each new position once
    instead of the whole cache in every layer at every step (~250 us of a ~550 us attention call for a batch-32
    SmolLM2 layer on a 2-core Xeon)."""

    def __init__(self, capacity: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.capacity = capacity
        self.dtype = dtype
        self.key_buffer = self.value_buffer = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = 0 if self.key_buffer is None else self.keys.shape[-2]
        m = n + key_states.shape[-2]
        if self.key_buffer is None or m > self.key_buffer.shape[-2]:
            size = max(m, self.capacity if self.key_buffer is None else 2 * self.key_buffer.shape[-2])
            grown = [x.new_empty(*x.shape[:-2], size, x.shape[-1], dtype=self.dtype or x.dtype)
                     for x in (key_states, value_states)]
            if n:
                grown[0][..., :n, :], grown[1][..., :n, :] = self.keys, self.values
            self.key_buffer, self.value_buffer = grown
        self.key_buffer[..., n:m, :] = key_states
        self.value_buffer[..., n:m, :] = value_states
        self.keys, self.values = self.key_buffer[..., :m, :], self.value_buffer[..., :m, :]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.key_buffer is not None:
            m = self.keys.shape[-2]
            self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
            self.keys, self.values = self.key_buffer[..., :m, :], self.value_buffer[..., :m, :]

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self.batch_select_indices(beam_idx)


def new_cache(config, capacity: int, dtype: torch.dtype | None = None) -> DynamicCache:
    """A DynamicCache for `config` whose full-attention layers are PreallocatedLayers of `capacity` positions,
    holding `dtype` (None: the dtype of the keys) (sliding-window layers stay as transformers builds them)."""
    cache = DynamicCache(config=config)
    cache.layers = [PreallocatedLayer(capacity, dtype) if type(layer) is DynamicLayer else layer
                    for layer in cache.layers]
    return cache


def _last_hidden(decoder, ids, mask, positions, cache) -> torch.Tensor:
    # the cache goes fourth, by position: transformers 5 renamed that argument (past_key_values -> cache) in place
    out = decoder(ids, mask, positions, cache, use_cache=True)
    return out.last_hidden_state[:, -1]


ALIGN = 16  # the columns a row's keys are aligned to, AVX512's 16 fp32 lanes (and twice AVX2's 8): see _prefill


def _prefill(decoder, prompts: list[list[int]], pad_id: int, capacity: int
             ) -> tuple[DynamicCache, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Run `prompts` (all distinct), left-padded to the longest, W tokens, into a KV cache with room for
    `capacity` more positions. Returns (cache, attention mask [U, A + W], next positions [U, 1], last hidden
    states [U, H], W).

    Layout of row u: [A empty slots | pads | prompt u], where the A zero-filled, masked slots make A + W a
    multiple of ALIGN; positions count real tokens only, so every row sees the positions and keys a forward
    of its prompt alone would. The layout keeps a row's arithmetic the same whatever the other prompts of its
    batch (so 1 process and 2 sample the same: tests/test_distributed.py). Attention sums over the keys
    (softmax's sum, and the weighted sum of the values) in vector lanes and blocks counted from the first
    column; a row's keys start at column A + W - len(prompt u), the same modulo 16 at every batch width, so
    they fall into the same lanes, and the masked columns before them add exact zeros. On a 2-core AMD EPYC
    (fp32, SDPA's math kernel) with the keys starting at W - len(prompt u), rows drew other tokens in a batch
    of 24 prompts than in the 48 they were part of. Each prompt runs whole: a prefix that the prompts share is
    not run once (as the scoring pass runs it: rto.sequences.prefix_once_hidden), which would put padding
    between a row's keys, at an offset that depends on the batch. Under autocast (bf16) no slots are added:
    there a row's arithmetic depends on its batch anyway (SDPA's flash kernel, whose blocks of keys start at
    the first column), so the slots would only cost time.
    """
    device = decoder.embed_tokens.weight.device
    width = max(map(len, prompts))
    autocast = torch.is_autocast_enabled(device.type)
    empty = 0 if autocast else -width % ALIGN
    config = decoder.config
    cache = new_cache(config, empty + width + capacity, torch.get_autocast_dtype(device.type) if autocast else None)
    if empty:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        zeros = torch.zeros(len(prompts), config.num_key_value_heads, empty, head_dim,
                            dtype=decoder.embed_tokens.weight.dtype, device=device)
        for layer in cache.layers:
            layer.update(zeros, zeros)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), empty + width), dtype=torch.long)
    for u, p in enumerate(prompts):
        ids[u, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[u, empty + width - len(p):] = 1
    positions = (mask[:, empty:].cumsum(-1) - 1).clamp(min=0).to(device)
    mask = mask.to(device)
    hidden = _last_hidden(decoder, ids.to(device), mask, positions, cache)
    return cache, mask, positions[:, -1:] + 1, hidden, width


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """`w` (out x in, as nn.Linear holds it) in the blocked layout oneDNN's matmul reads, for packed_linear."""
    return torch.ops.mkldnn._reorder_linear_weight(w, None)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b for a 2-D x through oneDNN, W packed by pack_weight."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@lru_cache(maxsize=None)
def onednn_packs(dtype: torch.dtype) -> bool:
    """True when this torch build runs a CPU linear layer in `dtype` through oneDNN with a weight packed ahead of
    time (torch.ops.mkldnn._reorder_linear_weight and _linear_pointwise, the ops torch.compile's CPU backend
    uses for frozen weights) on a CPU with AVX512; checked once on a small product against F.linear. bf16 passes
    on an AVX512 CPU without AVX512-BF16 or AMX too, where oneDNN emulates it: there every bf16 product is about
    4x slower than fp32's, packed or not (README, "Sampling, temperatures and precision"), which is why
    --precision auto runs fp32 on such CPUs. On an AVX2-only AMD EPYC, an earlier trial of oneDNN's prepacked
    weights ran a decode step's layers slower than torch's default BLAS (230 against 197 ms a step), so there the
    products stay with that BLAS."""
    if dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available() \
            or not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    try:
        if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        g = torch.Generator().manual_seed(0)
        w, x = torch.randn(8, 16, generator=g).to(dtype), torch.randn(3, 16, generator=g).to(dtype)
        y = packed_linear(x, pack_weight(w))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return y.dtype == dtype and torch.allclose(y.float(), nn.functional.linear(x, w).float(), rtol=0.02, atol=0.02)


@lru_cache(maxsize=None)
def packs_fp32() -> bool:
    """True where fp32 products run faster through oneDNN with a packed weight than through torch's BLAS: where
    onednn_packs, on a CPU other than Intel's. Torch's x86 builds use MKL as that BLAS, which keeps its fastest
    kernels for Intel's CPUs. On a 2-core AVX512 Xeon without AVX512-BF16 (fp32): at the scoring pass's hundreds
    of rows (RTO's four SmolLM2 models on 32 x 74 tokens, chunks of 16) F.linear ran the pass 1.01-1.32x faster than
    packing each weight at its use (4 pairs); at a decode step's 32 rows the decoder's layers as (W x^T)^T on the
    weights themselves sampled 1.02-1.12x faster than with every weight packed (5 pairs), and hold no copy
    (benchmarks/README.md, "A fifth machine"). On an AVX512 AMD EPYC, MKL ran them about 2x slower (a 1536 x 576
    layer at 1120 rows: 11.1 against 5.0 ms)."""
    return onednn_packs(torch.float32) and cpu_vendor() != "GenuineIntel"


class PackedProducts:
    """While active, every plain nn.Linear on the CPU under `modules` computes y = x W^T + b with its weight
    prepared once for the whole decode loop instead of at every product:

      - in the dtype the product runs in: the active CPU autocast's (bf16) or the weight's own. autocast casts an
        fp32 weight again at every product (it caches only weights that require gradients, and only until its
        block ends); a cast kept for the loop is the very tensor it would make;
      - packed in the blocked layout oneDNN's matmul reads (onednn_packs), so no product reorders it. On a 2-core
        AMD EPYC (AVX512) at a decode step's 32 rows, fp32: the 49k x 576 LM head 19.5 -> 6.5 ms, SmolLM2's
        1536 x 576 layers 0.35 -> 0.16 ms (torch's default fp32 BLAS there, MKL, runs them 2-3x slower);
        with oneDNN held to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2) 18.7 -> 11.3 ms and 0.34 -> 0.27 ms; bf16 about even.
        In fp32 on Intel's CPUs (packs_fp32) only an output head at least WIDE times wider than its input (the LM
        head over a vocabulary) is packed: the other layers' products read the weights themselves, through torch's
        BLAS, faster there, and no copy of them is held (2-core AVX512 Xeon, SmolLM2, 32 rows x 40 tokens, 5
        rounds: 4.72 s a rollout against 4.97 with every weight packed and 4.90 with none; ~400 MB less held).

    Results equal F.linear up to float summation order in fp32 (oneDNN sums in another order than MKL); bf16
    products are oneDNN's either way. Without oneDNN's packed products (onednn_packs: another build, a CPU
    without AVX512, or a dtype the CPU does not run natively) the kept cast weight goes through torch's BLAS, at
    FEW_ROWS rows (a decode step's batch) as (W x^T)^T, which that BLAS runs 1.1-1.6x faster than x W^T for a
    decoder's matrices at 16-48 rows (fp32, 2-core AVX2 EPYC: SmolLM2's gate/up 1.38 -> 0.84 ms at 32 rows).
    Kept for a decode loop, a product of fewer than MIN_ROWS rows runs on MIN_ROWS, the rest zeros: the libraries
    take other kernels, which sum in another order, for a few rows (on a 2-core AMD EPYC with AVX512, fp32: MKL's
    products of SmolLM2's matrices, either way round, for 1-11 rows against 12 or more; oneDNN's packed 1536-wide
    product for 1 row), so a row sampled alone, in a rollout's last short batch, or among the few rows left after
    the others drew EOS would round otherwise than in a full batch (and one process and two sample otherwise).
    Other devices and subclasses (peft's LoRA wrappers, whose inner Linear layers are patched) run as usual, and so
    does a product that autograd must record (a weight or an input that requires gradients, with gradients on) or
    whose weight is a shard (FSDP). It holds one prepared copy of each weight it packs or casts while active
    (4 bytes per weight in fp32, 2 in bf16); an fp32 weight left unpacked is used as it is.

    keep=False, for forwards at many rows (the scoring pass: hundreds of rows a product, so that packing a weight
    costs little next to its product): every fp32 product packs its weight and lets it go, holding one packed
    weight at a time, where packs_fp32 (not on Intel's CPUs, whose BLAS runs these products faster: there
    nothing is patched); under autocast every product runs as usual (oneDNN's bf16 product, autocast's cast)."""

    FEW_ROWS = 48
    WIDE = 8
    MIN_ROWS = 16

    def __init__(self, *modules: nn.Module, keep: bool = True):
        self.keep = keep
        self.linears = [] if not keep and not packs_fp32() else list(dict.fromkeys(
            m for module in modules for m in module.modules() if type(m) is nn.Linear and m.weight.device.type == "cpu"))
        self.prepared: dict[nn.Linear, tuple[torch.dtype, torch.Tensor, torch.Tensor | None, bool]] = {}

    def prepare(self, linear: nn.Linear) -> tuple[torch.dtype, torch.Tensor, torch.Tensor | None, bool]:
        """(dtype, weight, bias, packed): `linear`'s weight and bias in the dtype its product runs in now, the
        weight packed for oneDNN when `packed`; made at the first product in that dtype and kept (with keep)."""
        dtype = linear.weight.dtype
        if torch.is_autocast_enabled("cpu") and dtype.is_floating_point:
            dtype = torch.get_autocast_dtype("cpu")
        kept = self.prepared.get(linear)
        if kept is None or kept[0] != dtype:
            w = linear.weight.detach().to(dtype)
            b = None if linear.bias is None else linear.bias.detach().to(dtype)
            packed = onednn_packs(dtype) and (dtype != torch.float32 or packs_fp32()
                                              or linear.out_features >= self.WIDE * linear.in_features)
            kept = (dtype, pack_weight(w) if packed else w, b, packed)
            if self.keep:
                self.prepared[linear] = kept
        return kept

    def _forward(self, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() and (x.requires_grad or linear.weight.requires_grad)) \
                or is_sharded(linear.weight) or (not self.keep and torch.is_autocast_enabled("cpu")):
            return nn.functional.linear(x, linear.weight, linear.bias)
        dtype, w, b, packed = self.prepare(linear)
        rows = x.numel() // x.shape[-1]
        if rows > self.FEW_ROWS and not packed:
            return nn.functional.linear(x.to(dtype), w, b)
        x2 = x.to(dtype).reshape(rows, -1)
        if self.keep and rows < self.MIN_ROWS:
            x2 = torch.cat([x2, x2.new_zeros(self.MIN_ROWS - rows, x2.shape[1])])  # zero rows below: see above
        if packed:
            y = packed_linear(x2, w, b)
        else:  # a transposed view: the next product reads a contiguous x^T
            y = torch.mm(w, x2.t()).t()
            if b is not None:
                y = y + b
        return y[:rows].view(*x.shape[:-1], y.shape[-1])

    def __enter__(self):
        for m in self.linears:
            m.forward = partial(self._forward, m)
        return self

    def __exit__(self, *exc):
        for m in self.linears:
            m.__dict__.pop("forward", None)
        self.prepared.clear()


class _LayerOutputs:
    """Records the output of one decoder layer at every forward while active (a forward hook)."""

    def __init__(self, layer: nn.Module):
        self.seen: list[torch.Tensor] = []
        self._handle = layer.register_forward_hook(self._record)

    def _record(self, module, args, output):
        self.seen.append(output[0] if isinstance(output, tuple) else output)

    def remove(self):
        self._handle.remove()


@torch.inference_mode()
def sample(model, prompts: list[list[int]], *, max_new_tokens: int, eos_ids: set[int], pad_id: int,
           temperature: float = 1.0, greedy: bool = False, seeds: list[int] | None = None,
           autocast=None, trunk_layers: int = 0) -> tuple[list[list[int]], list[bool], list[list[float]],
                                                          list[list[float]], list[torch.Tensor] | None]:
    """Responses to `prompts`, each cut after its first EOS (kept): (tokens, ended, log pi_T of each token,
    entropy of pi_T at each token, trunk states or None).

    `seeds` (one per prompt; drawn from the global RNG when None) seed each row's noise; `autocast` (a
    context-manager factory) wraps the decoder's forward, the logits stay fp32. The model is used as it is
    (call it in eval mode).

    With `trunk_layers=n > 0`, the trunk states of row i are its hidden states after the embeddings and the
    bottom n layers at each prompt token and each response token, [len(prompt) + len(response), H], as this
    decode loop computed them (a row's last token, which the loop never needs to feed, is fed to the bottom
    layers alone; a row that drew EOS stays in the batch for one more step to feed its EOS). They equal
    rto.trunk.trunk_hidden of the prompt and response up to float rounding.
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
    record = _LayerOutputs(decoder.layers[trunk_layers - 1]) if trunk_layers else None
    on_cpu = decoder.embed_tokens.weight.device.type == "cpu"

    @contextmanager
    def run():
        with autocast() if autocast is not None else nullcontext():
            if on_cpu and not torch.is_autocast_enabled("cpu"):
                # fp32 on the CPU: attention through SDPA's math kernel. Its flash kernel (which the packed
                # products' contiguous q, k, v let it take) sums each row's keys in blocks placed by the batch's
                # padding, so a row drew other tokens next to other prompts, and one process sampled other pairs
                # than two. The math kernel is slower: SmolLM2's fp32 sampler at 32 rows on a 2-core Xeon,
                # 3 alternating runs each, median 95 against 123 tokens/s (median of the paired ratios 0.88)
                with sdpa_kernel(SDPBackend.MATH):
                    yield
            else:
                yield
    products = PackedProducts(decoder, model.lm_head)
    try:
        products.__enter__()
        with run():
            cache, mask, positions, hidden, width = _prefill(decoder, [list(p) for p in unique], pad_id,
                                                             max_new_tokens + 1)
        device = hidden.device
        source = source.to(device)
        states: list[list[torch.Tensor]] = []
        if record is not None:  # each row's prompt, without its pads
            prefilled = record.seen[-1]
            states = [[prefilled[row_of[tuple(p)], width - len(p):]] for p in prompts]
        if len(unique) != len(prompts):  # copy each distinct prompt's cache rows to the rows that repeat it
            cache.reorder_cache(source)
        mask, positions, hidden = mask[source], positions[source], hidden[source]
        active = list(range(len(prompts)))  # the original index of each row still in the batch
        eos = torch.tensor(sorted(eos_ids), device=device)
        work = None  # draw_tokens' workspace, [rows, V], made at the first step

        def leave(done: torch.Tensor, *rows: torch.Tensor):
            """Drop the rows that drew EOS from the cache, `active` and `rows` (each indexed by batch row)."""
            keep = (~done).nonzero().flatten()
            cache.reorder_cache(keep)
            return [active[k] for k in keep.tolist()], *(r[keep] for r in rows)

        for step in range(max_new_tokens):
            logits = lm_logits(model, hidden)
            if work is None:
                work = torch.empty_like(logits)
            drawn, logp, entropy = draw_tokens(logits, temperature, greedy,
                                               None if greedy else [generators[i] for i in active], work)
            done = torch.isin(drawn, eos)
            for i, tok, lp, h, fin in zip(active, drawn.tolist(), logp.tolist(), entropy.tolist(), done.tolist()):
                tokens[i].append(tok)
                logps[i].append(lp)
                entropies[i].append(h)
                ended[i] = fin
            last = step == max_new_tokens - 1 or bool(done.all())
            if last and record is None:
                break
            if bool(done.any()) and record is None:  # finished rows leave now (with a record: after their EOS is fed)
                active, drawn, mask, positions = leave(done, drawn, mask, positions)
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], 1)
            with run():
                if last:  # feed every row's last token to the bottom layers alone: the trunk state after it
                    _last_hidden(bottom_view(decoder, trunk_layers), drawn[:, None], mask, positions, cache)
                else:
                    hidden = _last_hidden(decoder, drawn[:, None], mask, positions, cache)
            positions = positions + 1
            if record is not None:
                for i, state in zip(active, record.seen[-1][:, 0]):
                    states[i].append(state[None])
                if last:
                    break
                if bool(done.any()):
                    active, hidden, mask, positions = leave(done, hidden, mask, positions)
    finally:
        products.__exit__()
        if record is not None:
            record.remove()
    trunk = [torch.cat(parts) for parts in states] if record is not None else None
    return tokens, ended, logps, entropies, trunk
