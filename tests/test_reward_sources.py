"""Reward sources (rto.rewards.REWARD_SOURCES, compose_rewards), the loss aggregations, and PPO's reward
presets: hand-computed values, the equality of the source path with eq. 4.7 (token_rewards), and runs on tiny
models (a SimPO model as RTO's dense source with GRPO; the user source of docs/reward-sources.md)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

import rto.stages.ppo as ppo
from rto.experience import Experience, SequenceTensors, TokenTensors
from rto.losses import aggregate, policy_loss, value_loss
from rto.rewards import (REWARD_SOURCES, check_sources, compose_rewards, normalised_rm_score, register_source,
                         token_rewards)
from rto.runtime import read_metrics
from rto.sequences import collate

DOC = Path(__file__).resolve().parents[1] / "docs" / "reward-sources.md"


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def experience(mask_lengths, *, logp, logp_ref, logp_dpo=None, logp_ref_t1=None, rm_score=None, texts=None):
    """A scored rollout with the given response lengths (prompt of one token) and [B, T] tensors."""
    batch = collate([[1]] * len(mask_lengths), [list(range(2, 2 + n)) for n in mask_lengths], 0)
    t = lambda x: None if x is None else torch.tensor(x, dtype=torch.float32)  # noqa: E731
    tokens = TokenTensors(logp=t(logp), logp_ref=t(logp_ref), values=torch.zeros(batch.response_mask.shape),
                          logp_dpo=t(logp_dpo), logp_ref_t1=t(logp_ref_t1))
    rm = t(rm_score) if rm_score is not None else torch.zeros(len(mask_lengths))
    seqs = SequenceTensors(rm_raw=rm, rm_score=rm, ended=torch.ones(len(mask_lengths), dtype=torch.bool),
                           length=batch.response_lengths)
    return Experience(batch=batch, tokens=tokens, seqs=seqs, texts=texts)


# two responses of 3 and 2 tokens (the third column of the second is padding, holding junk)
LOGP = [[-1.0, -2.0, -0.5], [-0.2, -1.0, 9.0]]
REF = [[-1.5, -1.0, -0.5], [-0.4, -1.5, 9.0]]
DPO = [[-0.5, -2.5, -1.5], [-0.1, -0.5, 9.0]]
RM = [1.5, -3.0]


# ---- the sources, by hand --------------------------------------------------------------------------
def test_dpo_source_is_the_log_ratio_against_the_temperature_one_reference():
    exp = experience([3, 2], logp=LOGP, logp_ref=REF, logp_dpo=DPO)
    close(REWARD_SOURCES["dpo"].reward(exp), [[1.0, -1.5, -1.0], [0.3, 1.0, 0.0]])
    ref_t1 = [[-1.0, -2.0, -1.0], [0.0, -1.0, 0.0]]
    exp = experience([3, 2], logp=LOGP, logp_ref=REF, logp_dpo=DPO, logp_ref_t1=ref_t1)
    close(REWARD_SOURCES["dpo"].reward(exp), [[0.5, -0.5, -0.5], [-0.1, 0.5, 0.0]])


def test_simpo_source_is_the_log_prob_over_the_response_length():
    exp = experience([3, 2], logp=LOGP, logp_ref=REF, logp_dpo=DPO)
    close(REWARD_SOURCES["simpo"].reward(exp), [[-0.5 / 3, -2.5 / 3, -0.5], [-0.05, -0.25, 0.0]])
    # summed over a response: its mean token log-prob, SimPO's reward up to beta
    close(REWARD_SOURCES["simpo"].reward(exp).sum(1), [-4.5 / 3, -0.3])


def test_a_source_of_the_dpo_model_without_its_log_probs_says_what_is_missing():
    exp = experience([3, 2], logp=LOGP, logp_ref=REF)
    with pytest.raises(ValueError, match="score the rollout with the DPO model"):
        REWARD_SOURCES["simpo"].reward(exp)


def test_rm_source_and_its_normalisation():
    score = normalised_rm_score(torch.tensor([3.0, 1.0, 2.0]), (1.0, 2.0), torch.tensor([True, False, True]), 0.5)
    close(score, [1.0, -0.5, 0.5])  # (r - 1) / 2, minus 0.5 where no EOS
    close(normalised_rm_score(torch.tensor([3.0]), (1.0, 2.0), torch.tensor([False])), [1.0])  # no penalty
    exp = experience([3, 2], logp=LOGP, logp_ref=REF, rm_score=RM)
    close(REWARD_SOURCES["rm"].reward(exp), [[0.0, 0.0, 1.5], [0.0, -3.0, 0.0]])


# ---- composition -----------------------------------------------------------------------------------
def test_compose_by_hand_with_clips_and_kl():
    exp = experience([3, 2], logp=LOGP, logp_ref=REF, logp_dpo=DPO, rm_score=RM)
    paid = compose_rewards(exp, {"dpo": 0.5, "rm": 2.0}, beta_kl=0.1, dense_clip=0.6, sparse_clip=2.0)
    # dpo: 0.5 * [1, -1.5, -1] -> clipped at 0.6: [0.5, -0.6, -0.5]; [0.15, 0.5]
    close(paid.terms["dpo"], [[0.5, -0.6, -0.5], [0.15, 0.5, 0.0]])
    # rm: 2 * clip([1.5, -3], 2) on the last token
    close(paid.terms["rm"], [[0.0, 0.0, 3.0], [0.0, -4.0, 0.0]])
    # kl: -0.1 * (logp - ref)
    close(paid.terms["kl"], [[-0.05, 0.1, 0.0], [-0.02, -0.05, 0.0]])
    close(paid.total, [[0.45, -0.5, 2.5], [0.13, -3.55, 0.0]])
    assert list(paid.terms) == ["dpo", "rm", "kl"]
    assert paid.clipfrac == {"dpo": pytest.approx(1 / 5)}  # one of five response tokens: |0.5 * -1.5| > 0.6


@pytest.mark.parametrize("granularity", ["token", "sentence", "delayed", "shaping"])
@pytest.mark.parametrize("clips", [(0.05, 10.0), (None, None), (0.3, 1.0)])
def test_dpo_and_rm_sources_are_eq_4_7(granularity, clips):
    """The PPO stage's source path equals token_rewards (the paper's equation) term by term."""
    gen = torch.Generator().manual_seed(3)
    lengths = [5, 2, 4, 1]
    B, T = len(lengths), 5
    logp, ref, dpo, ref_t1 = (-torch.rand(B, T, generator=gen) * 3 for _ in range(4))
    rm = torch.randn(B, generator=gen) * 3
    ends = torch.rand(B, T, generator=gen) > 0.6 if granularity == "sentence" else None
    exp = experience(lengths, logp=logp.tolist(), logp_ref=ref.tolist(), logp_dpo=dpo.tolist(),
                     logp_ref_t1=ref_t1.tolist(), rm_score=rm.tolist())
    mask = exp.batch.response_mask
    paid = compose_rewards(exp, {"dpo": 0.4, "rm": 0.7}, beta_kl=0.2, dense_clip=clips[0], sparse_clip=clips[1],
                           granularity=granularity, ends=ends)
    expected = token_rewards(logp, ref, mask, logp_dpo=dpo, logp_ref_t1=ref_t1, rm_score=rm, beta_dpo=0.4,
                             beta_kl=0.2, beta_rm=0.7, dpo_clip=clips[0], rm_clip=clips[1], granularity=granularity,
                             sentence_ends=ends, per_term=True)
    for i, name in enumerate(["dpo", "kl", "rm"]):
        torch.testing.assert_close(paid.terms[name], expected[i], atol=1e-6, rtol=0)
    torch.testing.assert_close(paid.total, expected.sum(0), atol=1e-6, rtol=0)


def test_granularity_moves_dense_sources_only():
    exp = experience([3, 2], logp=LOGP, logp_ref=REF, logp_dpo=DPO, rm_score=RM)
    paid = compose_rewards(exp, {"simpo": 1.0, "rm": 1.0}, beta_kl=0.0, dense_clip=None, sparse_clip=None,
                           granularity="shaping")
    close(paid.terms["simpo"].sum(1), [0.0, 0.0])  # shaping takes a dense term's sum off again
    close(paid.terms["rm"], [[0.0, 0.0, 1.5], [0.0, -3.0, 0.0]])  # the RM score stays whole


def test_unknown_sources_and_names_taken_twice_are_refused():
    with pytest.raises(ValueError, match=r"unknown reward source\(s\) \['nope'\]; registered: dpo, simpo, rm"):
        check_sources({"nope": 1.0, "rm": 1.0})
    with pytest.raises(ValueError, match="must be finite"):
        check_sources({"rm": float("nan")})
    for taken in ("dpo", "kl"):
        with pytest.raises(ValueError, match="exists already"):
            register_source(taken)(lambda exp: exp.tokens.logp)


# ---- loss aggregation ------------------------------------------------------------------------------
def test_aggregations_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("nan"), 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert float(aggregate(x, mask, "token_mean")) == pytest.approx(10 / 4)
    assert float(aggregate(x, mask, "seq_mean_token_sum")) == pytest.approx((6 + 4) / 2)
    assert float(aggregate(x, mask, "seq_mean_token_mean")) == pytest.approx((2 + 4) / 2)
    with pytest.raises(ValueError, match="unknown loss aggregation 'sum'"):
        aggregate(x, mask, "sum")


def test_policy_and_value_losses_aggregate_as_asked():
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    logp = torch.zeros(2, 3)  # ratio 1: the policy loss is -A aggregated
    adv = torch.tensor([[1.0, 2.0, 3.0], [-4.0, 0.0, 0.0]])
    loss, _ = policy_loss(logp, logp, adv, mask, agg="seq_mean_token_mean")
    assert float(loss) == pytest.approx(-(2.0 + -4.0) / 2)
    loss, _ = policy_loss(logp, logp, adv, mask)  # token mean by default
    assert float(loss) == pytest.approx(-(6.0 - 4.0) / 4)
    values, returns = torch.zeros(2, 3), torch.tensor([[1.0, 1.0, 2.0], [2.0, 0.0, 0.0]])
    loss, _ = value_loss(values, values, returns, mask, clip=None, agg="seq_mean_token_sum")
    assert float(loss) == pytest.approx(0.5 * ((1 + 1 + 4) + 4) / 2)


# ---- the presets and their checks ------------------------------------------------------------------
def test_reward_presets_pick_the_sources():
    cfg = ppo.PPOConfig(dpo_model="d", beta_dpo=0.3, beta_rm=2.0, progress=False)
    assert ppo.reward_weights(cfg, "dpo") == {"dpo": 0.3, "rm": 2.0}
    assert ppo.reward_weights(cfg, None) == {"dpo": 0.3, "rm": 2.0}  # a DPO model without a record
    assert ppo.reward_weights(cfg, "tdpo2") == {"dpo": 0.3, "rm": 2.0}
    assert ppo.reward_weights(cfg, "simpo") == {"simpo": 0.3, "rm": 2.0}
    assert ppo.reward_weights(ppo.PPOConfig(reward="sparse", beta_rm=2.0), None) == {"rm": 2.0}
    custom = ppo.PPOConfig(reward="custom", sources={"rm": 1.0, "simpo": 0.1}, dpo_model="d")
    assert ppo.reward_weights(custom, "dpo") == {"rm": 1.0, "simpo": 0.1}


@pytest.mark.parametrize("fields, message", [
    ({"reward": "custom"}, "pass --sources"),
    ({"sources": {"rm": 1.0}}, "use --reward custom"),
    ({"reward": "custom", "sources": {"rm": 1.0, "simpo": 1.0}}, "needs --dpo_model"),
    ({"reward": "custom", "sources": {"loudness": 1.0}}, "unknown reward source(s) ['loudness']"),
    ({"reward": "custom", "sources": {"rm": 1.0}, "granularity": "sentence"}, "does not have"),
    ({"reward": "sparse", "loss_agg": "sum"}, "--loss_agg must be one of token_mean"),
])
def test_bad_reward_settings_are_refused(fields, message):
    with pytest.raises(ValueError) as err:
        ppo.check_config(ppo.PPOConfig(**fields))
    assert message in str(err.value)


# ---- on tiny models --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def simpo_model(tiny_model, tmp_path_factory):
    """A SimPO model trained for two steps by `rto dpo --loss simpo` on the tiny model."""
    from rto.stages import dpo

    folder = tmp_path_factory.mktemp("simpo")
    pairs = folder / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Say something about {i}.", "chosen": "Nice, calm words.",
                                         "rejected": "Bad words!", "chosen_ended": True, "rejected_ended": True})
                             + "\n" for i in range(4)))
    dpo.run(dpo.DPOConfig(out=str(folder / "run"), pairs=str(pairs), loss="simpo", model=tiny_model, batch_size=2,
                          train_layers=2, progress=False, precision="fp32", eval_fraction=0.0))
    return str(folder / "run" / "model")


def test_rto_with_a_simpo_model_and_grpo_from_the_command_line(tmp_path, tiny_model, simpo_model):
    from rto.cli import main

    out = tmp_path / "rto"
    assert main(["ppo", "--reward", "rto", "--dpo_model", simpo_model, "--policy", tiny_model, "--reward_model",
                 tiny_model, "--estimator", "grpo", "--group_size", "2", "--iterations", "2", "--rollout_size", "4",
                 "--minibatch_size", "2", "--max_new_tokens", "5", "--train_layers", "2", "--beta_dpo", "0.5",
                 "--dpo_clip", "null", "--progress", "false", "--out", str(out)]) == 0
    log = (out / "log.txt").read_text()
    assert "reward 0.5 * simpo + 1 * rm - 0.01 * KL; estimator grpo (no critic)" in log
    meta = json.loads((out / "policy" / "rto_model.json").read_text())
    assert meta["sources"] == {"simpo": 0.5, "rm": 1.0} and meta["dpo_loss"] == "simpo"
    assert meta["estimator"] == "grpo" and not (out / "critic").exists()
    for row in read_metrics(out):
        # a SimPO reward is a (weighted) mean log-prob: negative, and at most 0.5 * log(vocab) per response
        assert -0.5 * 12 < row["reward_simpo"] < 0
        assert {"reward_rm", "reward_kl"} <= row.keys() and "reward_dpo" not in row


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_documented_user_source_runs(tmp_path, tiny_model, monkeypatch):
    register, run_it = _python_blocks(DOC.read_text())
    try:
        exec(register, {})  # the doc's code, as a user would paste it
        exp = experience([3, 2], logp=LOGP, logp_ref=REF, texts=["Hi there!", "Hello"])
        paid = compose_rewards(exp, {"no_exclamation": 0.5}, beta_kl=0.0, dense_clip=None, sparse_clip=None)
        close(paid.terms["no_exclamation"], [[0.0, 0.0, -0.5], [0.0, 0.0, 0.0]])
        configs = []
        monkeypatch.setattr(ppo, "run", configs.append)
        exec(run_it, {})
        monkeypatch.undo()
        (documented,) = configs
        assert documented.reward == "custom" and documented.sources == {"rm": 1.0, "no_exclamation": 0.5}
        # the documented config, on the tiny models
        out = tmp_path / "calm"
        ppo.run(dataclasses.replace(documented, out=str(out), policy=tiny_model, reward_model=tiny_model, iterations=2,
                                    rollout_size=4, minibatch_size=2, max_new_tokens=6, train_layers=2,
                                    progress=False))
        rollouts = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
        for it, row in enumerate(read_metrics(out), 1):
            shouted = [float("!" in r["response"]) for r in rollouts if r["iteration"] == it]
            assert row["reward_no_exclamation"] == pytest.approx(-0.5 * sum(shouted) / len(shouted))
    finally:
        REWARD_SOURCES.pop("no_exclamation", None)
