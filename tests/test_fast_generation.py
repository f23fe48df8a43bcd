"""rto's decode loop (rto.decoding) samples what transformers' generate samples, only faster.

Greedy decoding must give generate's tokens; the stored log-probs must be a fresh forward's; the sampled
frequencies must follow softmax(logits / T) over the whole vocabulary; and a row's tokens must not depend on
the rows it shares a batch (and a prompt prefill) with.
"""

import math
from contextlib import nullcontext

import pytest
import torch

import rto.decoding
from rto.decoding import PackedProducts, PreallocatedLayer, draw_tokens, onednn_packs, row_generators, sample
from rto.models import DEFAULT_MODEL, load_causal_lm, load_tokenizer
from rto.rollout import _generate_transformers, encode_prompts, eos_ids, generate
from rto.sequences import entropy_from_logits, response_logits, shared_prefix_length, token_logprobs


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return load_causal_lm(tiny_model).eval(), load_tokenizer(tiny_model)


def _prompts(tokenizer) -> list[list[int]]:
    """Chat prompts sharing the system turn, of different lengths, one given twice in a row."""
    texts = ["Tell me about tea", "Hi", "Hi", "Write a very short story about a lighthouse keeper", "Why?"]
    return encode_prompts(tokenizer, [[{"role": "user", "content": t}] for t in texts])


def chi_square(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 10.0) -> tuple[float, int]:
    """Pearson's statistic sum (O - E)^2 / E over the tokens expected >= `min_expected` times, the rest pooled
    into one bin; returns (statistic, degrees of freedom)."""
    expected = probs * counts.sum()
    big = expected >= min_expected
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


def chi_square_bound(dof: int) -> float:
    """A bound the statistic of a right sampler exceeds with probability ~1e-6 (Wilson-Hilferty, z = 4.75)."""
    z = 4.75
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def test_shared_prefix_leaves_each_prompt_a_token():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_prefix_length([[7], [7, 8]]) == 0
    assert shared_prefix_length([[1, 2], [3, 4]]) == 0


def test_greedy_gives_the_tokens_of_transformers_generate(tiny):
    model, tokenizer = tiny
    prompts = _prompts(tokenizer)
    ours = generate(model, tokenizer, prompts, max_new_tokens=12, greedy=True, progress=False)
    theirs = _generate_transformers(model, tokenizer, prompts, max_new_tokens=12, greedy=True, progress=False)
    assert ours.response_ids == theirs.response_ids
    assert torch.equal(ours.ended, theirs.ended)
    assert torch.equal(ours.batch.input_ids, theirs.batch.input_ids)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_stored_logprobs_equal_a_fresh_forward(tiny, temperature):
    model, tokenizer = tiny
    torch.manual_seed(3)
    rollout = generate(model, tokenizer, _prompts(tokenizer), max_new_tokens=10, temperature=temperature,
                       progress=False, return_logprobs=True)
    mask = rollout.batch.response_mask.bool()
    scored = token_logprobs(model, rollout.batch, temperature=temperature)
    assert torch.allclose(rollout.sampler_logp[mask], scored[mask], atol=1e-4)
    assert (rollout.sampler_logp[~mask] == 0).all()
    # PPO takes its old log-probs and entropies from the sampler: both equal the scoring pass's
    entropy = entropy_from_logits(response_logits(model, rollout.batch), rollout.batch, temperature)
    assert torch.allclose(rollout.sampler_entropy[mask], entropy[mask], atol=1e-4)
    assert (rollout.sampler_entropy[~mask] == 0).all()
    hf = _generate_transformers(model, tokenizer, _prompts(tokenizer), max_new_tokens=10, temperature=temperature,
                                progress=False, return_logprobs=True)
    hf_mask = hf.batch.response_mask.bool()
    hf_entropy = entropy_from_logits(response_logits(model, hf.batch), hf.batch, temperature)
    assert torch.allclose(hf.sampler_entropy[hf_mask], hf_entropy[hf_mask], atol=1e-4)


@pytest.mark.parametrize("bias", [False, True])
def test_packed_products_equal_linear_and_are_undone(bias):
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(24, 40, bias=bias), torch.nn.SiLU(), torch.nn.Linear(40, 24, bias=bias))
    big = torch.randn(4, 7, 24)
    inputs = [torch.randn(rows, 24) for rows in (1, 3, 32, 200)] + [torch.randn(8, 1, 24), big[:, -1], big]
    plain = [block(x) for x in inputs]
    products = PackedProducts(block)
    with products, torch.no_grad():  # (a product autograd must record runs as nn.Linear: see below)
        turned = [block(x) for x in inputs]
        assert all("forward" in layer.__dict__ for layer in (block[0], block[2]))
        # (in fp32 on Intel's CPUs only a vocabulary-wide head is packed: see below)
        assert {kept[3] for kept in products.prepared.values()} == {rto.decoding.packs_fp32()}
    assert not any("forward" in layer.__dict__ for layer in block) and not products.prepared  # undone
    for x, want, got in zip(inputs, plain, turned):  # fp32: the same sums in another order
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_under_bf16_autocast_each_weight_is_prepared_once_and_every_product_is_autocasts():
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.SiLU(), torch.nn.Linear(40, 24, bias=False))
    few, many = torch.randn(32, 24), torch.randn(3, 70, 24)
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    with bf16():  # what autocast computes from the fp32 weights, casting them at every product
        want_few, want_many = block(few), block(many)
    products = PackedProducts(block)
    with products, bf16(), torch.no_grad():
        got_few, got_many = block(few), block(many)
        kept = products.prepared[block[0]]
        block(few)
        assert products.prepared[block[0]] is kept and kept[0] == torch.bfloat16  # prepared once, reused
        assert set(products.prepared) == {block[0], block[2]}
    assert not products.prepared  # dropped on exit
    assert got_few.dtype == got_many.dtype == torch.bfloat16
    torch.testing.assert_close(got_few, want_few, rtol=0.01, atol=0.01)  # bf16 rounding of the results
    torch.testing.assert_close(got_many, want_many, rtol=0.01, atol=0.01)
    with products, torch.no_grad():  # no autocast: the fp32 weights
        block(few)
        assert products.prepared[block[0]][0] == torch.float32


def test_without_onednn_packing_the_kept_weights_run_through_the_blas(monkeypatch):
    """Without oneDNN's packed products (another build, a CPU without AVX512, bf16 on a CPU without native bf16),
    the prepared weight is the cast copy: a decode step's few rows run as (W x^T)^T, many as F.linear, bit for
    bit (the product autocast would run, with the weight autocast would cast)."""
    monkeypatch.setattr(rto.decoding, "onednn_packs", lambda dtype: False)
    torch.manual_seed(0)
    layer = torch.nn.Linear(24, 40)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            few, many = torch.randn(32, 24), torch.randn(200, 24)
            bias = layer.bias.to(torch.bfloat16 if autocast else torch.float32)
            want_few = torch.mm(layer.weight, few.t()).t() + bias
            want_many = layer(many)
            with PackedProducts(layer) as products, torch.no_grad():
                got_few, got_many = layer(few), layer(many)
                assert not products.prepared[layer][3]
        assert got_few.stride(0) == 1  # (W x^T)^T
        assert torch.equal(got_few, want_few) and torch.equal(got_many, want_many)


def test_per_product_packing_keeps_nothing_and_leaves_autocast_and_autograd_alone():
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.SiLU(), torch.nn.Linear(40, 24, bias=False))
    x = torch.randn(3, 70, 24)
    with torch.no_grad():
        want = block(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want_bf16 = block(x)
        products = PackedProducts(block, keep=False)
        with products:
            got = block(x)
            assert not products.prepared  # packed for each product, then let go
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got_bf16 = block(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert torch.equal(got_bf16, want_bf16)  # under autocast: autocast's own products
    # with gradients on, the products of weights that require them run as nn.Linear: autograd records them
    for keep in (True, False):
        block.zero_grad()
        with PackedProducts(block, keep=keep):
            block(x).square().sum().backward()
        grads = [p.grad.clone() for p in block.parameters()]
        block.zero_grad()
        block(x).square().sum().backward()
        assert all(torch.equal(a, p.grad) for a, p in zip(grads, block.parameters()))


@pytest.fixture
def cpu_of(monkeypatch):
    """cpu_of(vendor) makes oneDNN's packed products available on a CPU of that vendor (packing: a copy) and returns
    the list into which every packed product writes (its rows, its weight's shape)."""
    calls = []

    def counted(x, w, b=None):
        calls.append((x.shape[0], tuple(w.shape)))
        return torch.nn.functional.linear(x, w, b)

    monkeypatch.setattr(rto.decoding, "onednn_packs", lambda dtype: True)
    monkeypatch.setattr(rto.decoding, "pack_weight", lambda w: w.clone())
    monkeypatch.setattr(rto.decoding, "packed_linear", counted)

    def of(vendor: str) -> list:
        monkeypatch.setattr(rto.decoding, "cpu_vendor", lambda: vendor)
        rto.decoding.packs_fp32.cache_clear()
        return calls

    yield of
    rto.decoding.packs_fp32.cache_clear()


@pytest.mark.parametrize("vendor, packed", [("AuthenticAMD", True), ("GenuineIntel", False), ("", True)])
def test_per_product_packing_only_where_the_cpu_is_not_intels(cpu_of, vendor, packed):
    """At many rows (keep=False) an Intel CPU's products go through torch's BLAS (MKL: faster there than a weight
    packed at each use), others' through oneDNN with the weight packed at the use (where onednn_packs)."""
    calls = cpu_of(vendor)
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.SiLU(), torch.nn.Linear(40, 24))
    x = torch.randn(3, 70, 24)
    with torch.no_grad():
        want = block(x)
        with PackedProducts(block, keep=False):
            assert all(("forward" in layer.__dict__) is packed for layer in (block[0], block[2]))
            got = block(x)
        with PackedProducts(block):  # kept for a decode loop: on Intel's CPUs these layers stay unpacked too
            block(x[:, -1])
    assert torch.equal(got, want)
    assert [rows for rows, _ in calls] == [210, 210, PackedProducts.MIN_ROWS, PackedProducts.MIN_ROWS] * packed


@pytest.mark.parametrize("vendor", ["AuthenticAMD", "GenuineIntel"])
def test_a_decode_loop_on_intels_cpus_packs_only_the_vocabulary_wide_head(cpu_of, vendor):
    """Kept for a decode loop, fp32: on Intel's CPUs only an output head at least WIDE times wider than its input
    (the LM head) is packed for oneDNN; the other layers' products read their weights as they are (no copy), as
    (W x^T)^T at a decode step's rows. Elsewhere every weight is packed. The results are the same products."""
    calls = cpu_of(vendor)
    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.SiLU(), torch.nn.Linear(40, 24))
    head = torch.nn.Linear(24, 24 * PackedProducts.WIDE, bias=False)
    x = torch.randn(32, 24)
    with torch.no_grad():
        want = head(layers(x))
        with PackedProducts(layers, head) as products:
            got = head(layers(x))
            kept = {layer: products.prepared[layer] for layer in (layers[0], layers[2], head)}
    intel = vendor == "GenuineIntel"
    same = lambda layer: kept[layer][1].data_ptr() == layer.weight.data_ptr()  # noqa: E731
    assert kept[head][3] and not same(head)  # the head: a packed copy either way
    for layer in (layers[0], layers[2]):
        assert kept[layer][3] is not intel
        assert same(layer) is intel  # on Intel's CPUs the weight's own memory, not a copy
    assert [shape for _, shape in calls] == ([] if intel else [(40, 24), (24, 40)]) + [(24 * PackedProducts.WIDE, 24)]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("autocast", [None, nullcontext])  # (the stages pass accelerate's, a no-op in fp32)
def test_in_fp32_a_row_draws_the_same_tokens_whatever_prompts_share_its_batch(tiny, autocast):
    """fp32: each row's tokens and log-probs do not depend on the batch around it, whose longest prompt sets the
    padding (so that one process and two sample the same pairs). On CPUs where the products are oneDNN's packed
    ones, SDPA's flash kernel summed each row's keys in blocks placed by that padding: other tokens drawn."""
    model, tokenizer = tiny
    text = "Describe item number {} in a few words please, with care, and with a lot of detail about everything."
    prompts = [tokenizer(text.format(i))["input_ids"][: 4 + i] for i in range(16) for _ in range(3)]
    seeds = list(range(100, 148))
    kw = dict(max_new_tokens=8, eos_ids=set(), pad_id=tokenizer.pad_token_id, autocast=autocast)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each process of a 2-process run on 2 cores
    try:
        whole = sample(model, prompts, seeds=seeds, **kw)
        halves = [sample(model, prompts[i : i + 24], seeds=seeds[i : i + 24], **kw) for i in (0, 24)]
    finally:
        torch.set_num_threads(threads)
    assert whole[0] == halves[0][0] + halves[1][0]
    torch.testing.assert_close(torch.tensor(whole[2]), torch.tensor(halves[0][2] + halves[1][2]), rtol=0, atol=1e-5)


def test_scoring_with_packed_products_scores_what_plain_products_score(tiny, monkeypatch):
    """The scoring pass's fp32 products through oneDNN (packed per product): every log-prob, value and score
    within float rounding of plain nn.Linear products."""
    from rto.rollout import score_sequences
    from rto.sequences import collate

    model, tokenizer = tiny
    prompts = _prompts(tokenizer)
    batch = collate(prompts, [[5, 6, 7, 8][: 1 + i % 4] for i in range(len(prompts))], tokenizer.pad_token_id)
    kw = dict(ref=model, policy=model, dpo=model, chunk=2, entropy=True)
    packed = score_sequences(batch, **kw)
    monkeypatch.setattr(PackedProducts, "__enter__", lambda self: self)
    plain = score_sequences(batch, **kw)
    assert set(packed) == set(plain)
    for key in packed:
        torch.testing.assert_close(packed[key], plain[key], rtol=0, atol=1e-5)


def test_bf16_sampling_draws_what_plain_autocast_products_draw(tiny, monkeypatch):
    """The prepared (cast, packed) weights change no token, and the log-probs and entropies only by the float
    rounding of the bf16 products: against a rollout whose every product casts the fp32 weight again and runs
    through F.linear (the behaviour without PackedProducts)."""
    model, tokenizer = tiny
    kw = dict(max_new_tokens=8, eos_ids=set(), pad_id=tokenizer.pad_token_id, seeds=[1, 2, 3, 4, 5],
              autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    prepared = sample(model, _prompts(tokenizer), **kw)
    monkeypatch.setattr(PackedProducts, "__enter__", lambda self: self)
    plain = sample(model, _prompts(tokenizer), **kw)
    assert prepared[:2] == plain[:2]
    for ours, theirs in zip(prepared[2:4], plain[2:4]):
        torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=0, atol=0.02)


def test_draw_tokens_follows_softmax_at_the_temperature():
    torch.manual_seed(0)
    logits = 2.0 * torch.randn(1, 400)
    n, temperature = 20000, 0.7
    tokens, logp, entropy = draw_tokens(logits.expand(n, -1), temperature, False, row_generators(range(n)))
    probs = torch.softmax(logits[0] / temperature, -1)
    counts = torch.bincount(tokens, minlength=400).double()
    stat, dof = chi_square(counts, probs.double())
    assert stat < chi_square_bound(dof)
    for wrong in (torch.softmax(logits[0], -1), torch.softmax(logits[0] / temperature, -1).where(
            probs >= probs.topk(50).values[-1], 0.0)):  # temperature 1, or top-k 50, would be caught
        wrong_stat, wrong_dof = chi_square(counts, (wrong / wrong.sum()).double())
        assert wrong_stat > chi_square_bound(wrong_dof)
    assert torch.allclose(logp, torch.log_softmax(logits[0] / temperature, -1)[tokens], atol=1e-5)
    assert torch.allclose(entropy, -(probs * probs.log()).sum(), atol=1e-5)


@pytest.mark.parametrize("greedy", [False, True])
def test_draw_tokens_in_a_workspace_draws_the_same(greedy):
    """A workspace larger than the batch (rows left the loop) holds the entropy terms and the CDF: the same
    tokens, log-probs and entropies, bit for bit, and the logits untouched."""
    torch.manual_seed(0)
    logits = 3.0 * torch.randn(5, 300)
    kept = logits.clone()
    work = torch.full((8, 300), float("nan"))
    gens = lambda: None if greedy else row_generators(range(5))  # noqa: E731
    fresh = draw_tokens(logits, 0.8, greedy, gens())
    reused = draw_tokens(logits, 0.8, greedy, gens(), work)
    for a, b in zip(fresh, reused):
        assert torch.equal(a, b)
    assert torch.equal(logits, kept)
    assert not work[:5].isnan().any() and work[5:].isnan().all()  # the first 5 rows written, no more


def test_sampled_first_tokens_follow_the_model(tiny_model):
    """Many one-token samples of a model whose next-token distribution is peaked (final norm scaled up)."""
    model, tokenizer = load_causal_lm(tiny_model).eval(), load_tokenizer(tiny_model)
    with torch.no_grad():
        model.model.norm.weight.mul_(10.0)
    ids = _prompts(tokenizer)[0]
    temperature = 0.8
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([ids])).logits[0, -1] / temperature, -1).double()
    assert probs.max() > 0.05 and (probs > 1e-3).sum() > 55  # peaked, yet spread beyond a top 50
    torch.manual_seed(4)
    rollout = generate(model, tokenizer, [ids] * 6000, max_new_tokens=1, temperature=temperature, batch_size=2000,
                       progress=False)
    counts = torch.bincount(torch.tensor([r[0] for r in rollout.response_ids]), minlength=len(probs)).double()
    stat, dof = chi_square(counts, probs)
    assert dof > 20 and stat < chi_square_bound(dof)
    at_one = torch.softmax(torch.log(probs) * temperature, -1)  # the distribution at T = 1
    top50 = probs.where(probs >= probs.topk(50).values[-1], 0.0)
    for wrong in (at_one, top50 / top50.sum()):
        wrong_stat, wrong_dof = chi_square(counts, wrong)
        assert wrong_stat > chi_square_bound(wrong_dof)


def test_a_row_draws_the_same_tokens_alone(tiny):
    """Shared prefix, a repeated prompt and rows dropped as they finish leave every row's tokens unchanged:
    each row's noise comes from its own seed (exactly equal here; in general equal unless two tokens' CDF
    bounds fall within float rounding of the uniform draw, or the greedy argmax is a float near-tie)."""
    model, tokenizer = tiny
    prompts = _prompts(tokenizer)
    seeds = [11, 12, 13, 14, 15]
    free, *_ = sample(model, prompts, max_new_tokens=12, eos_ids=set(), pad_id=tokenizer.pad_token_id,
                        seeds=seeds)
    assert free[1] != free[2]  # the repeated prompt's rows draw their own tokens
    stop = {free[0][3], free[3][1]}  # EOS ids that end rows at different steps, so rows leave the batch
    together, ended, *_ = sample(model, prompts, max_new_tokens=12, eos_ids=stop, pad_id=tokenizer.pad_token_id,
                                seeds=seeds)
    assert ended[0] and ended[3] and len(together[0]) <= 4 and len(together[3]) <= 2
    for i, (p, seed) in enumerate(zip(prompts, seeds)):
        alone, alone_ended, *_ = sample(model, [p], max_new_tokens=12, eos_ids=stop, pad_id=tokenizer.pad_token_id,
                                       seeds=[seed])
        assert together[i] == alone[0] and ended[i] == alone_ended[0]
        cut = next((k + 1 for k, t in enumerate(free[i]) if t in stop), len(free[i]))
        assert together[i] == free[i][:cut]  # cut after its first EOS, the tokens before it unchanged


def test_the_preallocated_cache_layer_holds_what_concatenation_holds():
    """Appends of 1-3 positions past its capacity (it grows), and rows dropped and repeated (reorder_cache)."""
    from transformers.cache_utils import DynamicLayer

    ours, theirs = PreallocatedLayer(capacity=4), DynamicLayer()
    gen = torch.Generator().manual_seed(0)
    for step, width in enumerate((3, 1, 2, 1, 3)):
        k, v = (torch.randn(3, 2, width, 8, generator=gen) for _ in range(2))
        got, want = ours.update(k, v), theirs.update(k, v)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        if step == 2:  # rows leave and repeat between steps, as the decode loop moves them
            for layer in (ours, theirs):
                layer.reorder_cache(torch.tensor([2, 0, 0]))
    assert ours.get_seq_length() == theirs.get_seq_length() == 10
    assert ours.key_buffer.shape[-2] == 16  # outgrew 4, then 8


def test_the_preallocated_cache_samples_what_a_growing_cache_samples(tiny, monkeypatch):
    """The decode loop on PreallocatedLayers gives the same tokens, log-probs and entropies, bit for bit, as on
    transformers' concatenating DynamicCache, with a shared prefix, a repeated prompt and rows ending early."""
    model, tokenizer = tiny
    prompts, seeds = _prompts(tokenizer), [21, 22, 23, 24, 25]
    free, *_ = sample(model, prompts, max_new_tokens=10, eos_ids=set(), pad_id=tokenizer.pad_token_id, seeds=seeds)
    stop = {free[0][2], free[4][5]}
    kw = dict(max_new_tokens=10, eos_ids=stop, pad_id=tokenizer.pad_token_id, seeds=seeds)
    ours = sample(model, prompts, **kw)
    monkeypatch.setattr(rto.decoding, "new_cache",
                        lambda config, capacity, dtype=None: rto.decoding.DynamicCache(config=config))
    theirs = sample(model, prompts, **kw)
    assert any(ours[1]) and not all(ours[1])  # some rows ended early, some ran to the budget
    assert ours[:4] == theirs[:4]


def test_under_bf16_the_cache_holds_bf16_and_the_rollout_is_the_same_bit_for_bit(tiny, monkeypatch):
    """Under bf16 autocast the cache stores keys and values in bf16 (attention casts them to bf16 anyway): the
    same tokens, log-probs and entropies, bit for bit, as a cache that keeps the fp32 keys the layers give."""
    model, tokenizer = tiny
    kw = dict(max_new_tokens=8, eos_ids=set(), pad_id=tokenizer.pad_token_id, seeds=[1, 2, 3, 4, 5],
              autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    made = []
    new_cache = rto.decoding.new_cache

    def spy(config, capacity, dtype=None):
        made.append(new_cache(config, capacity, dtype))
        return made[-1]

    monkeypatch.setattr(rto.decoding, "new_cache", spy)
    ours = sample(model, _prompts(tokenizer), **kw)
    assert {layer.key_buffer.dtype for layer in made[-1].layers} == {torch.bfloat16}
    monkeypatch.setattr(rto.decoding, "new_cache", lambda config, capacity, dtype=None: spy(config, capacity))
    theirs = sample(model, _prompts(tokenizer), **kw)
    assert {layer.key_buffer.dtype for layer in made[-1].layers} == {torch.float32}
    assert ours[:4] == theirs[:4]


def test_batching_and_order_do_not_change_a_seeded_rollout(tiny):
    model, tokenizer = tiny
    prompts = _prompts(tokenizer)
    torch.manual_seed(5)
    big = generate(model, tokenizer, prompts, max_new_tokens=8, progress=False, return_logprobs=True)
    torch.manual_seed(5)
    small = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=2, progress=False, return_logprobs=True)
    assert big.response_ids == small.response_ids
    # the log-probs bit for bit: each row's keys lie in the same columns modulo 16 in every batch
    # (rto.decoding._prefill); the entropies sum over the vocabulary, which torch may split otherwise for fewer rows
    assert torch.equal(big.sampler_logp, small.sampler_logp)
    torch.testing.assert_close(big.sampler_entropy, small.sampler_entropy, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def smol_shaped(tiny):
    """A random 2-layer Llama of SmolLM2-135M's widths (576 hidden, 1536 MLP, 9 query and 3 key-value heads, its
    vocabulary): the shapes whose products BLAS libraries compute with other kernels for a few rows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tokenizer = tiny
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval(), tokenizer


def test_a_decode_product_of_few_rows_runs_on_min_rows(smol_shaped):
    """Kept for a decode loop, a product of fewer than MIN_ROWS rows runs on MIN_ROWS (zeros below), so each row
    comes out of the kernel a full decode batch uses, bit for bit (on a 2-core AMD EPYC, without the padding,
    MKL's fp32 products gave other sums for 1-11 rows and oneDNN's packed 1536-wide one for 1 row)."""
    model, _ = smol_shaped
    layers = [model.model.layers[0].mlp.up_proj, model.model.layers[0].mlp.down_proj, model.lm_head]
    torch.manual_seed(1)
    with torch.no_grad(), PackedProducts(*layers):
        for layer in layers:
            x = torch.randn(PackedProducts.MIN_ROWS, layer.in_features)
            full = layer(x)
            for rows in (1, 3, 5, 11, PackedProducts.MIN_ROWS - 1):
                assert torch.equal(layer(x[:rows]), full[:rows]), (layer, rows)


def test_a_row_samples_the_same_alone_as_in_a_full_batch(smol_shaped):
    """13 prompts sampled at batch_size 16 and at 4 (batches of 4, 4, 4 and 1; prompts sorted by length): the same
    tokens and log-probs bit for bit, at SmolLM2's widths. Fails without PackedProducts.MIN_ROWS on a 2-core AMD
    EPYC: in fp32 the longest prompt, sampled alone, drew log-probs 1e-6 off (oneDNN's 1-row product), and with
    torch held to AVX2 (MKL's products) 11 of the 13 rows did."""
    model, tokenizer = smol_shaped
    prompts = (_prompts(tokenizer) * 3)[:13]
    rollouts = []
    for batch_size in (16, 4):
        torch.manual_seed(7)
        rollouts.append(generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=batch_size, progress=False,
                                 return_logprobs=True))
    full, split = rollouts
    assert full.response_ids == split.response_ids
    assert torch.equal(full.sampler_logp, split.sampler_logp)
    torch.testing.assert_close(full.sampler_entropy, split.sampler_entropy, rtol=0, atol=1e-5)


def test_the_prefill_runs_every_distinct_prompt_whole_and_left_padded(tiny, monkeypatch):
    """One fp32 prefill forward of the distinct prompts, each whole and left-padded, behind masked empty slots
    that make the keys' width a multiple of 16, although they share their system turn: a prefix run once would
    put padding between a row's keys, and attention's sums over the keys would round otherwise at every batch
    width (on an AMD EPYC 2 processes then sampled other pairs than 1: tests/test_distributed.py)."""
    model, tokenizer = tiny
    prompts = _prompts(tokenizer)
    assert shared_prefix_length(prompts) > 10
    fed = []
    last_hidden = rto.decoding._last_hidden

    def spy(decoder, ids, mask, positions, cache):
        fed.append((ids.clone(), mask.clone(), positions.clone()))
        return last_hidden(decoder, ids, mask, positions, cache)

    monkeypatch.setattr(rto.decoding, "_last_hidden", spy)
    sample(model, prompts, max_new_tokens=2, eos_ids=set(), pad_id=tokenizer.pad_token_id, seeds=[1, 2, 3, 4, 5])
    distinct = list(dict.fromkeys(map(tuple, prompts)))
    ids, mask, positions = fed[0]
    width = max(map(len, distinct))
    assert ids.shape == (len(distinct), width) and mask.shape[1] % 16 == 0 and 0 <= mask.shape[1] - width < 16
    for row, p in enumerate(distinct):
        pads = width - len(p)
        assert ids[row, pads:].tolist() == list(p) and positions[row, pads:].tolist() == list(range(len(p)))
        assert mask[row].tolist() == [0] * (mask.shape[1] - len(p)) + [1] * len(p)
    assert [f[0].shape for f in fed[1:]] == [(len(prompts), 1)]  # then one token a row


def test_autocast_keeps_fp32_logprobs(tiny):
    model, tokenizer = tiny
    torch.manual_seed(6)
    rollout = generate(model, tokenizer, _prompts(tokenizer), max_new_tokens=6, progress=False, return_logprobs=True,
                       autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scored = token_logprobs(model, rollout.batch)
    mask = rollout.batch.response_mask.bool()
    # the same bf16 layers, fp32 lm_head: equal up to bf16 rounding of differently shaped matmuls
    assert torch.allclose(rollout.sampler_logp[mask], scored[mask], atol=0.1)
    assert rollout.sampler_logp.dtype == torch.float32


@pytest.mark.slow
def test_real_model_greedy_and_logprobs():
    from rto.tasks import get_task

    model, tokenizer = load_causal_lm(DEFAULT_MODEL).eval(), load_tokenizer(DEFAULT_MODEL)
    prompts = encode_prompts(tokenizer, get_task("sentiment").prompts("train")[:4], None)
    ours = generate(model, tokenizer, prompts, max_new_tokens=16, greedy=True, progress=False)
    theirs = _generate_transformers(model, tokenizer, prompts, max_new_tokens=16, greedy=True, progress=False)
    assert ours.response_ids == theirs.response_ids
    torch.manual_seed(7)
    rollout = generate(model, tokenizer, prompts + prompts[:2], max_new_tokens=16, progress=False,
                       return_logprobs=True)
    mask = rollout.batch.response_mask.bool()
    scored = token_logprobs(model, rollout.batch)
    assert torch.allclose(rollout.sampler_logp[mask], scored[mask], atol=1e-4)
    entropy = entropy_from_logits(response_logits(model, rollout.batch), rollout.batch)
    assert torch.allclose(rollout.sampler_entropy[mask], entropy[mask], atol=1e-4)
    assert entropy[mask].std() > 0.1  # a trained model: the entropies differ from token to token
    assert all(not (set(r[:-1]) & eos_ids(model, tokenizer)) for r in rollout.response_ids)


def test_the_decode_loop_uses_no_deprecated_argument(tiny):
    """transformers 5 renamed the decoder's cache argument (past_key_values -> cache) and warns on the old name
    until it removes it; the loop passes the cache by position, so no version of the 5 series warns or breaks."""
    import warnings

    model, tokenizer = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        tokens, *_ = sample(model, _prompts(tokenizer)[:2], max_new_tokens=3, eos_ids=eos_ids(model, tokenizer),
                              pad_id=tokenizer.pad_token_id, seeds=[1, 2])
    assert all(1 <= len(t) <= 3 for t in tokens)
