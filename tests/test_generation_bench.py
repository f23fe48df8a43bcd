"""The generation benchmark's product clock and the bound it reports (a tiny random Llama, no real model)."""

from __future__ import annotations

import pytest

import argparse

from benchmarks.generation import fill_defaults, product_clock, products_bound
from rto.decoding import PackedProducts, sample
from rto.models import load_causal_lm, load_tokenizer


def test_the_clock_times_every_product_of_the_decode_loop_and_then_lets_go(tiny_model):
    model, tokenizer = load_causal_lm(tiny_model).eval(), load_tokenizer(tiny_model)
    layers, new_tokens = model.config.num_hidden_layers, 3
    # distinct first tokens: no shared prefix, so one prefill forward, then a forward per drawn token but the last
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    with product_clock() as clock:
        tokens, *_ = sample(model, prompts, max_new_tokens=new_tokens, eos_ids=set(), pad_id=tokenizer.pad_token_id,
                            seeds=[0, 1, 2])
    assert all(len(t) == new_tokens for t in tokens)
    # 7 products a layer (q, k, v, o, gate, up, down) at each of `new_tokens` decoder forwards, and the LM head at
    # each drawn token
    assert clock["products"] == (7 * layers + 1) * new_tokens
    assert clock["seconds"] > 0
    assert PackedProducts._forward.__name__ == "_forward"  # the class is as it was
    with product_clock() as again:
        sample(model, prompts, max_new_tokens=1, eos_ids=set(), pad_id=tokenizer.pad_token_id, seeds=[0, 1, 2])
    assert again["products"] == 7 * layers + 1 and clock["products"] == (7 * layers + 1) * new_tokens


def test_the_products_only_bound_by_hand():
    rto_runs = [{"tokens": 100, "seconds": 2.0, "products_s": 1.0}, {"tokens": 90, "seconds": 3.0, "products_s": 1.5}]
    transformers_runs = [{"tokens_per_s": 25.0}, {"tokens_per_s": 20.0}]
    bound = products_bound(rto_runs, transformers_runs)
    # shares 0.5 and 0.5; bounds 100 / 1 / 25 = 4 and 90 / 1.5 / 20 = 3
    assert bound == {"products_share_median": pytest.approx(0.5), "products_only_bound_median": pytest.approx(3.5),
                     "products_only_bound_min": pytest.approx(3.0), "products_only_bound_max": pytest.approx(4.0)}


def test_demo_settings_fill_only_what_is_unset():
    def args(demo: bool, **given):
        keys = ("max_new_tokens", "system_prompt", "precision", "train_layers")
        return fill_defaults(argparse.Namespace(demo=demo, **{k: given.get(k) for k in keys}))

    demo = args(True)
    assert (demo.max_new_tokens, demo.system_prompt, demo.precision, demo.train_layers) == (32, "", "auto", 6)
    plain = args(False)
    assert (plain.max_new_tokens, plain.system_prompt, plain.precision, plain.train_layers) == (40, None, "fp32", None)
    mixed = args(True, max_new_tokens=40, precision="fp32")
    assert (mixed.max_new_tokens, mixed.system_prompt, mixed.precision, mixed.train_layers) == (40, "", "fp32", 6)
