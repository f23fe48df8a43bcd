"""The PPO stage on tiny random models: the missing-EOS penalty, advantage whitening, the value clip, the
adaptive KL controller, and the minibatches of a rollout."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import rto.stages.ppo as ppo
from rto.advantages import masked_whiten
from rto.experience import Experience, SequenceTensors, TokenTensors
from rto.losses import LOSS_AGGREGATIONS, policy_loss, value_loss
from rto.models import ValueModel, load_causal_lm, load_tokenizer
from rto.rewards import adaptive_kl_coef
from rto.rollout import Rollout
from rto.sequences import collate
from tests.conftest import make_reward_model

RM_MEAN, RM_STD = 0.1, 2.0


@pytest.fixture(scope="module")
def reward_model(tiny_model, tmp_path_factory) -> str:
    """The tiny model with a random scalar head and reward statistics RM_MEAN, RM_STD."""
    return make_reward_model(tiny_model, tmp_path_factory.mktemp("rm") / "model", RM_MEAN, RM_STD)


class Spy:
    """Wraps functions of rto.stages.ppo, recording (name, args, kwargs, result) of every call in order."""

    def __init__(self, monkeypatch, names):
        self.calls = []
        for name in names:
            real = getattr(ppo, name)
            monkeypatch.setattr(ppo, name, self._wrap(name, real))

    def _wrap(self, name, real):
        def wrapper(*args, **kwargs):
            result = real(*args, **kwargs)
            self.calls.append((name, args, kwargs, result))
            return result

        return wrapper

    def by_iteration(self):
        """Calls grouped per iteration: each iteration starts with its call to gae."""
        groups = []
        for call in self.calls:
            if call[0] == "gae":
                groups.append([])
            groups[-1].append(call)
        return groups


def run_ppo(out: Path, tiny_model: str, reward_model: str, spy_names=(), **overrides):
    kwargs = dict(out=str(out), reward="sparse", policy=tiny_model, reward_model=reward_model, iterations=2,
                  rollout_size=4, minibatch_size=2, max_new_tokens=6, train_layers=2, progress=False,
                  precision="fp32", actor_lr=1e-3, critic_lr=1e-3)
    kwargs.update(overrides)
    with pytest.MonkeyPatch.context() as mp:
        spy = Spy(mp, spy_names)
        summary = ppo.run(ppo.PPOConfig(**kwargs))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rollouts = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    return SimpleNamespace(out=out, summary=summary, metrics=metrics, rollouts=rollouts, spy=spy)


SPIED = ("gae", "policy_loss", "value_loss")


@pytest.fixture(scope="module")
def base(tiny_model, reward_model, tmp_path_factory):
    """Defaults of this module: whitened advantages, value clip 0.2, no EOS penalty, constant KL coefficient."""
    return run_ppo(tmp_path_factory.mktemp("ppo") / "base", tiny_model, reward_model, SPIED)


@pytest.fixture(scope="module")
def unwhitened(tiny_model, reward_model, tmp_path_factory):
    return run_ppo(tmp_path_factory.mktemp("ppo") / "unwhitened", tiny_model, reward_model, SPIED,
                   whiten_advantages=False)


@pytest.fixture(scope="module")
def variant(tiny_model, reward_model, tmp_path_factory):
    """One iteration, two epochs, no value clip, and a missing-EOS penalty of 1."""
    return run_ppo(tmp_path_factory.mktemp("ppo") / "variant", tiny_model, reward_model, SPIED, value_clip=None,
                   missing_eos_penalty=1.0, iterations=1, ppo_epochs=2)


def rows(x: torch.Tensor) -> list[tuple]:
    """The rows of a [B, T] tensor as a sorted list (minibatches hold the rollout's rows in a random order)."""
    return sorted(tuple(r) for r in x.tolist())


def trained_weights(out: Path, name: str) -> dict[str, torch.Tensor]:
    weights = load_file(out / name / "model.safetensors")
    return {k: v for k, v in weights.items() if ".layers.2." in k or ".layers.3." in k}  # the 2 trained layers


# ---- whitening -------------------------------------------------------------------------------------
def _check_policy_advantages(result, whiten: bool):
    iterations = result.spy.by_iteration()
    assert len(iterations) == 2
    for calls in iterations:
        (_, (rewards, values, mask, *_), _, (raw, _returns)) = calls[0]
        expected = masked_whiten(raw, mask) if whiten else raw
        used = [(args[2], args[3]) for name, args, _, _ in calls if name == "policy_loss"]
        assert len(used) == 2  # rollout 4, minibatches of 2, one epoch
        assert rows(torch.cat([a for a, _ in used])) == rows(expected)
        assert rows(torch.cat([m for _, m in used])) == rows(mask)
        assert rows(expected) != rows(raw if whiten else masked_whiten(raw, mask))  # the two cases differ


def test_whitened_advantages_reach_the_policy_loss(base):
    _check_policy_advantages(base, whiten=True)


def test_without_whitening_the_policy_loss_gets_raw_gae(unwhitened):
    _check_policy_advantages(unwhitened, whiten=False)


def test_whitening_changes_the_update(base, unwhitened, tiny_model):
    start = trained_weights(Path(tiny_model), ".")
    on, off = trained_weights(base.out, "policy"), trained_weights(unwhitened.out, "policy")
    assert on.keys() == off.keys() == start.keys() and on
    assert any(not torch.equal(on[k], start[k]) for k in on)  # both runs trained the policy
    assert any(not torch.equal(off[k], start[k]) for k in off)
    assert any(not torch.equal(on[k], off[k]) for k in on)
    # same seed: the first rollout is the same, so only the update differs
    first = [r["response"] for r in base.rollouts if r["iteration"] == 1]
    assert first == [r["response"] for r in unwhitened.rollouts if r["iteration"] == 1]


# ---- value clip ------------------------------------------------------------------------------------
def _plain_value_loss(values, returns, mask):
    on = mask.bool()
    return 0.5 * ((values - returns)[on] ** 2).mean()


def test_value_clip_reaches_value_loss(base):
    calls = [c for c in base.spy.calls if c[0] == "value_loss"]
    assert len(calls) == 4  # 2 iterations x 2 minibatches
    assert all(args[4] == 0.2 for _, args, _, _ in calls)


def test_without_value_clip_the_critic_loss_is_plain_mse(variant):
    calls = [c for c in variant.spy.calls if c[0] == "value_loss"]
    assert len(calls) == 4  # 2 epochs x 2 minibatches
    for _, (values, old_values, returns, mask, clip, agg), _, (loss, stats) in calls:
        assert agg == "token_mean"
        assert clip is None
        torch.testing.assert_close(loss, _plain_value_loss(values, returns, mask))
        assert stats["vf_clipfrac"] == 0
    # in the second epoch the critic has moved, so a clip would have mattered somewhere
    assert any(not torch.equal(args[0], args[1]) for _, args, _, _ in calls[2:])
    (row,) = variant.metrics
    assert row["vf_clipfrac"] == 0.0
    assert row["value_loss"] == pytest.approx(sum(float(c[3][0].detach()) for c in calls) / 4)
    assert (variant.out / "critic" / "model.safetensors").exists() and (variant.out / "DONE").exists()


# ---- missing-EOS penalty ---------------------------------------------------------------------------
def test_missing_eos_penalty_lowers_rm_by_exactly_the_penalty(base, variant):
    penalised = variant  # the penalty changes no sample of the first rollout: compare it row by row
    plain = [r for r in base.rollouts if r["iteration"] == 1]
    pen = penalised.rollouts
    assert [r["response"] for r in pen] == [r["response"] for r in plain]  # same seed, same samples
    assert [r["ended"] for r in pen] == [r["ended"] for r in plain]
    assert not all(r["ended"] for r in plain)  # 6 new tokens from a random model: (almost) nothing ends
    for p, q in zip(pen, plain):
        assert p["rm"] == pytest.approx(q["rm"] - (0.0 if q["ended"] else 1.0), abs=1e-6)
    m_pen, m_plain = penalised.metrics[0], base.metrics[0]
    assert m_pen["rm"] == pytest.approx(m_plain["rm"] - 1.0 * (1 - m_plain["eos_rate"]), abs=1e-6)
    assert m_pen["rm_raw"] == pytest.approx(m_plain["rm_raw"], abs=1e-6)  # the raw score is not penalised


def test_rm_is_normalised_with_the_reward_model_statistics(base):
    for row in base.metrics:
        assert row["rm"] == pytest.approx((row["rm_raw"] - RM_MEAN) / RM_STD, abs=1e-6)


def _rollout(tokenizer, ended: list[bool]) -> Rollout:
    prompts = [[tokenizer.bos_token_id or 1, 100 + i] for i in range(len(ended))]
    responses = [[200 + i] * (i + 1) + ([tokenizer.eos_token_id] if e else []) for i, e in enumerate(ended)]
    return Rollout(batch=collate(prompts, responses, tokenizer.pad_token_id), ended=torch.tensor(ended),
                   prompt_ids=prompts, response_ids=responses)


@pytest.fixture(scope="module")
def roles(tiny_model, reward_model):
    return {"policy": load_causal_lm(tiny_model).eval(), "ref": load_causal_lm(tiny_model).eval(), "dpo": None,
            "critic": ValueModel.from_pretrained(reward_model).eval(),
            "rm": ValueModel.from_pretrained(reward_model).eval()}


@pytest.mark.parametrize("penalty", [None, 0.5, 3.0])
def test_score_rollout_penalises_only_responses_without_eos(tiny_model, roles, penalty):
    cfg = ppo.PPOConfig(reward="sparse", missing_eos_penalty=penalty, score_batch_size=2, rescore_policy=True)
    accelerator = SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext, mixed_precision="no")
    ended = [True, False, False, True]
    texts, rows = ["a", "b", "c", "d"], [{"id": i} for i in range(4)]
    gold_calls = []
    exp = ppo.score_rollout(_rollout(load_tokenizer(tiny_model), ended), texts, rows, torch.tensor([0, 0, 1, 1]),
                            lambda t, r: gold_calls.append((t, r)) or [0.5, 0.0, 1.0, 0.25], roles, 0, cfg,
                            accelerator, (RM_MEAN, RM_STD))
    # the record is whole when it leaves the scoring step: texts, rows, groups and the gold score of those texts
    assert exp.texts == texts and exp.rows == rows and gold_calls == [(texts, rows)]
    assert exp.seqs.gold.tolist() == [0.5, 0.0, 1.0, 0.25] and exp.seqs.group.tolist() == [0, 0, 1, 1]
    raw = exp.seqs.rm_raw
    assert raw.unique().numel() == 4  # the random head scores every response differently
    # the penalty is subtracted from the normalised score (not divided by the reward std)
    expected = (raw - RM_MEAN) / RM_STD - (penalty or 0.0) * torch.tensor([0.0, 1.0, 1.0, 0.0])
    torch.testing.assert_close(exp.seqs.rm_score, expected)
    assert exp.seqs.ended.tolist() == ended
    assert exp.seqs.length.tolist() == [2, 2, 3, 5]


# ---- adaptive KL controller ------------------------------------------------------------------------
def test_adaptive_kl_follows_the_controller(tiny_model, reward_model, tmp_path):
    cfg = dict(adaptive_kl=True, beta_kl=0.5, target_kl=0.05, kl_horizon=8, iterations=3, actor_lr=1e-2)
    result = run_ppo(tmp_path / "adaptive", tiny_model, reward_model, **cfg)
    rows_ = result.metrics
    assert [r["iteration"] for r in rows_] == [1, 2, 3]
    assert rows_[0]["kl_coef"] == 0.5
    # policy == reference on the first rollout: 0 up to float rounding (the sampler's log-probs against the
    # scoring pass's, which runs the reference on the sampler's trunk states)
    assert abs(rows_[0]["kl"]) < 1e-5
    for prev, row in zip(rows_, rows_[1:]):
        predicted = adaptive_kl_coef(prev["kl_coef"], prev["kl"], 0.05, 8, 4)
        assert row["kl_coef"] == pytest.approx(predicted, rel=1e-12)
        assert row["kl_coef"] != prev["kl_coef"]
    # KL 0 is below the target: error clipped to -0.2, coefficient * (1 - 0.2 * 4 / 8) = 0.45
    assert rows_[1]["kl_coef"] == pytest.approx(0.45)
    assert rows_[1]["kl"] != 0.0  # the policy moved, so the controller saw a real KL next
    # the logged coefficient is the one in the rewards: sparse k1 rewards sum to rm - kl_coef * KL per response
    for row in rows_:
        assert row["reward_total"] == pytest.approx(row["rm"] - row["kl_coef"] * row["kl"], rel=1e-5, abs=1e-5)


def test_without_adaptive_kl_the_coefficient_stays(base):
    assert [r["kl_coef"] for r in base.metrics] == [0.01, 0.01]
    assert base.metrics[1]["kl"] != 0.0  # a KL the controller would have acted on
    for row in base.metrics:
        assert row["reward_total"] == pytest.approx(row["rm"] - 0.01 * row["kl"], rel=1e-5, abs=1e-5)


# ---- minibatches -----------------------------------------------------------------------------------
def _experience(n: int) -> Experience:
    """A rollout of n sequences where every field of row i carries the number i."""
    prompts = [[1000 + i] for i in range(n)]
    responses = [[2000 + i] * (1 + i % 3) for i in range(n)]
    batch = collate(prompts, responses, pad_id=0)
    ids = torch.arange(n, dtype=torch.float32)
    dense = ids[:, None].expand(n, batch.response_mask.shape[1]).clone()
    tokens = TokenTensors(logp=dense, logp_ref=dense + 0.5, values=dense + 0.25, advantages=dense - 0.5)
    seqs = SequenceTensors(rm_raw=ids, rm_score=ids * 2, ended=ids % 2 == 0, length=batch.response_lengths)
    trunk = ids[:, None, None].expand(n, batch.input_ids.shape[1], 3).clone()
    return Experience(batch=batch, tokens=tokens, seqs=seqs, trunk=trunk, texts=[f"text {i}" for i in range(n)])


def _order(exp: Experience, size: int, gen: torch.Generator) -> list[list[int]]:
    out = []
    for mb in exp.minibatches(size, gen):
        ids = mb.seqs.rm_raw.long().tolist()
        # every field of a minibatch row belongs to the same sequence
        assert mb.batch.input_ids[:, 0].tolist() == [1000 + i for i in ids]
        assert mb.batch.response_lengths.tolist() == [1 + i % 3 for i in ids]
        assert (mb.tokens.logp == mb.seqs.rm_raw[:, None]).all()
        assert (mb.tokens.advantages == mb.seqs.rm_raw[:, None] - 0.5).all()
        assert mb.seqs.rm_score.tolist() == [2.0 * i for i in ids]
        assert mb.texts == [f"text {i}" for i in ids]
        assert (mb.trunk == mb.seqs.rm_raw[:, None, None]).all()
        out.append(ids)
    return out


def test_a_tight_minibatch_drops_only_columns_of_padding_and_keeps_every_loss():
    """Experience.tight, as the update runs each micro-batch: the columns that are padding in all its rows go, from
    the batch, the dense tensors and the trunk alike; every masked loss and mean is the same."""
    batch = collate([[7, 7, 7], [8], [9, 9], [6]], [[1], [2, 2, 2], [3, 3], [4, 4, 4, 4]], pad_id=0)  # P 3, T 4
    g = torch.Generator().manual_seed(0)
    dense = lambda: torch.randn(4, 4, generator=g) * batch.response_mask  # noqa: E731  (0 off the mask)
    tokens = TokenTensors(logp=dense(), logp_ref=dense(), values=dense(), advantages=dense(), returns=dense())
    seqs = SequenceTensors(rm_raw=torch.arange(4.0), rm_score=torch.arange(4.0), ended=torch.ones(4, dtype=torch.bool),
                           length=batch.response_lengths)
    trunk = torch.randn(4, 7, 5, generator=g)
    mb = Experience(batch=batch, tokens=tokens, seqs=seqs, trunk=trunk).select(torch.tensor([2, 1, 0]))
    t = mb.tight()  # prompts of 2, 1, 3 tokens: none dropped; responses of 2, 3, 1: the 4th column goes
    assert t.batch.prompt_width == 3 and t.batch.input_ids.shape == (3, 6) and t.tokens.logp.shape == (3, 3)
    assert torch.equal(t.trunk, mb.trunk[:, :6]) and t.tokens.rewards is None and t.seqs is mb.seqs
    t = mb.select(torch.tensor([0, 1])).tight()  # prompts of 2 and 1 tokens, responses of 2 and 3
    assert t.batch.prompt_width == 2 and t.batch.input_ids.tolist() == [[9, 9, 3, 3, 0], [0, 8, 2, 2, 2]]
    assert torch.equal(t.trunk, mb.trunk[:2, 1:6]) and torch.equal(t.tokens.advantages, mb.tokens.advantages[:2, :3])
    whole = mb.select(torch.tensor([0, 1]))

    def loss(e: Experience, agg: str) -> float:
        tok, m = e.tokens, e.batch.response_mask
        return float(policy_loss(tok.logp + 0.1 * m, tok.logp, tok.advantages, m, agg=agg)[0]
                     + value_loss(tok.values + 0.2 * m, tok.values, tok.returns, m, agg=agg)[0])

    for agg in LOSS_AGGREGATIONS:
        assert loss(t, agg) == pytest.approx(loss(whole, agg), rel=1e-6), agg


def test_the_update_runs_each_minibatch_without_its_columns_of_padding(tiny_model, reward_model, tmp_path):
    """Every forward of the update (rto.stages.ppo's token_logprobs) gets a batch whose first column holds some
    row's first prompt token and whose last holds some row's last response token."""
    run = run_ppo(tmp_path / "ppo", tiny_model, reward_model, ("token_logprobs",), rollout_size=8, ppo_epochs=2)
    batches = [call[1][1] for call in run.spy.calls]
    assert len(batches) == 2 * 2 * 4  # iterations x epochs x minibatches
    assert all(bool(b.attention_mask[:, 0].any()) and bool(b.response_mask[:, -1].any()) for b in batches)


@pytest.mark.parametrize("n, size, sizes", [(8, 2, [2, 2, 2, 2]), (8, 4, [4, 4]), (8, 8, [8]), (5, 2, [2, 2, 1])])
def test_minibatches_cover_every_sequence_once_per_epoch(n, size, sizes):
    exp = _experience(n)
    gen = torch.Generator().manual_seed(0)
    epochs = [_order(exp, size, gen) for _ in range(3)]
    for batches in epochs:
        assert [len(b) for b in batches] == sizes
        assert sorted(i for b in batches for i in b) == list(range(n))
    if n > 2:  # the generator moves on: epochs are shuffled afresh
        flat = [[i for b in batches for i in b] for batches in epochs]
        assert len({tuple(f) for f in flat}) > 1


def test_minibatch_order_is_the_generators_permutation():
    exp = _experience(8)
    flat = lambda seed: [i for b in _order(exp, 2, torch.Generator().manual_seed(seed)) for i in b]  # noqa: E731
    torch.manual_seed(123)
    first = flat(0)
    torch.manual_seed(456)  # the global RNG plays no part
    assert flat(0) == first
    assert flat(1) != first and flat(2) != first
    assert first != list(range(8))  # shuffled, not in rollout order
