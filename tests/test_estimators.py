"""Reward granularities and advantage estimators in the PPO stage, on tiny random models: each one runs two
iterations end to end and reaches the losses as its formula says; GAE with the default settings gives bitwise
the weights of a run with the default config."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import rto.stages.ppo as ppo
from rto.advantages import ADVANTAGE_ESTIMATORS, masked_whiten
from rto.cli import main
from rto.models import ValueModel, load_causal_lm, load_tokenizer
from rto.rewards import dpo_token_reward, place_dpo_reward, sentence_ends, token_pieces
from rto.runtime import read_metrics


@pytest.fixture(scope="module")
def dpo_model(tiny_model, tmp_path_factory) -> str:
    """The tiny model with its top two layers nudged: a stand-in DPO model whose token reward is not 0 (the tiny
    model itself, as the reference's twin, would give a DPO term of exactly 0 and leave the granularity untested).
    The bottom layers are the reference's, so the roles still share their trunk."""
    model = load_causal_lm(tiny_model)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in model.model.layers[2:]:
            for p in layer.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    folder = tmp_path_factory.mktemp("dpo") / "model"
    model.save_pretrained(folder)
    load_tokenizer(tiny_model).save_pretrained(folder)
    return str(folder)


class Calls:
    """Records (args, kwargs, result) of functions of the PPO stage (module attributes or registry entries)."""

    def __init__(self, mp):
        self.mp, self.calls = mp, {}

    def watch(self, owner, name):
        real = owner[name] if isinstance(owner, dict) else getattr(owner, name)
        record = self.calls.setdefault(name, [])

        def wrapper(*args, **kwargs):
            result = real(*args, **kwargs)
            record.append((args, kwargs, result))
            return result

        (self.mp.setitem if isinstance(owner, dict) else self.mp.setattr)(owner, name, wrapper)


@pytest.fixture(scope="module")
def runs(tiny_model, dpo_model, reward_model, tmp_path_factory):
    """One two-iteration run per setting, made on first use."""
    made = {}
    folder = tmp_path_factory.mktemp("estimators")

    def get(name: str, **overrides):
        if name in made:
            return made[name]
        cfg = dict(out=str(folder / name), reward="rto", policy=tiny_model, dpo_model=dpo_model,
                   reward_model=reward_model, iterations=2, rollout_size=4, minibatch_size=2, max_new_tokens=6,
                   train_layers=2, progress=False, precision="fp32", actor_lr=1e-3, critic_lr=1e-3)
        cfg.update(overrides)
        roles = []
        with pytest.MonkeyPatch.context() as mp:
            calls = Calls(mp)
            for fn in ("compose_rewards", "sentence_ends", "policy_loss", "gae"):
                calls.watch(ppo, fn)
            for estimator in ("reinforce++", "grpo", "rloo"):
                calls.watch(ADVANTAGE_ESTIMATORS, estimator)
            real_load = ValueModel.from_pretrained
            mp.setattr(ValueModel, "from_pretrained", lambda *a, **k: roles.append(k.get("role")) or real_load(*a, **k))
            summary = ppo.run(ppo.PPOConfig(**cfg))
        out = Path(cfg["out"])
        made[name] = SimpleNamespace(
            out=out, summary=summary, calls=calls.calls, loaded=roles, metrics=read_metrics(out),
            rollouts=[json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()],
            meta=json.loads((out / "policy" / "rto_model.json").read_text()),
            log=(out / "log.txt").read_text())
        return made[name]

    return get


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def rows(x: torch.Tensor) -> list[tuple]:
    """The rows of a [B, T] tensor, sorted (minibatches hold the rollout's rows in a random order)."""
    return sorted(tuple(r) for r in x.tolist())


def advantages_used(run) -> list[torch.Tensor]:
    """Per iteration, the advantages that reached the policy loss (2 minibatches of 2 responses each)."""
    used = [args[2] for args, _, _ in run.calls["policy_loss"]]
    assert len(used) == 4
    return [torch.cat(used[:2]), torch.cat(used[2:])]


# ---- GAE and the defaults --------------------------------------------------------------------------
def test_gae_with_default_settings_is_bitwise_the_default_run(runs, tiny_model):
    default = runs("default")  # no estimator, granularity or group_size given
    explicit = runs("gae", estimator="gae", granularity="token", group_size=1)
    for part in ("policy", "critic"):
        a, b = weights(default.out / part), weights(explicit.out / part)
        assert a.keys() == b.keys() and a
        assert all(torch.equal(a[k], b[k]) for k in a), part
    start = load_file(Path(tiny_model) / "model.safetensors")
    trained = weights(default.out / "policy")
    assert any(not torch.equal(trained[k], start[k]) for k in start if k in trained)  # the policy did move
    assert [r["response"] for r in default.rollouts] == [r["response"] for r in explicit.rollouts]
    timing = ("time", "tokens_per_s")
    strip = lambda row: {k: v for k, v in row.items() if not k.startswith(timing)}  # noqa: E731
    assert [strip(r) for r in default.metrics] == [strip(r) for r in explicit.metrics]
    # GAE: the critic is loaded, trained and saved; the other estimators were not called
    assert default.loaded.count("critic") == 1 and len(default.calls["gae"]) == 2
    assert not any(default.calls[name] for name in ("reinforce++", "grpo", "rloo"))
    assert {"value_loss", "critic_grad_norm", "explained_variance"} <= default.metrics[0].keys()
    assert (default.meta["estimator"], default.meta["granularity"], default.meta["group_size"]) == ("gae", "token", 1)
    assert "estimator gae (with a critic), granularity token, 1 response(s) per prompt" in default.log


# ---- critic-free estimators ------------------------------------------------------------------------
def _expected(name: str, rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The estimator's advantages recomputed from its formula, for groups [0, 0, 1, 1] (two pairs)."""
    on = mask.bool()
    if name == "reinforce++":  # whitened return-to-go (gamma 1)
        to_go = torch.where(on, rewards, 0.0).flip(1).cumsum(1).flip(1)
        return masked_whiten(torch.where(on, to_go, 0.0), mask)
    score = torch.where(on, rewards, 0.0).sum(1)
    other = score.view(2, 2).flip(1).reshape(4)  # the other response of each pair
    if name == "rloo":  # R_i - mean of the others
        per_response = score - other
    else:  # grpo: (R_i - mean) / (sample std + 1e-6); for a pair, std = |R_1 - R_2| / sqrt(2)
        per_response = (score - (score + other) / 2) / ((score - other).abs() / 2**0.5 + 1e-6)
    return torch.where(on, per_response[:, None].expand_as(rewards), 0.0)


@pytest.mark.parametrize("name, group_size", [("reinforce++", 1), ("grpo", 2), ("rloo", 2)])
def test_critic_free_estimator(runs, tiny_model, name, group_size):
    run = runs(name, estimator=name, group_size=group_size)
    calls = run.calls[name]
    assert len(calls) == 2 and not run.calls["gae"]  # one call per iteration, by name from the registry
    used = advantages_used(run)
    for (args, kwargs, (advantages, returns)), reached in zip(calls, used):
        rewards, mask = args
        assert kwargs["gamma"] == 1.0
        assert kwargs["groups"].tolist() == ([0, 0, 1, 1] if group_size == 2 else [0, 1, 2, 3])
        torch.testing.assert_close(advantages, _expected(name, rewards, mask), atol=1e-5, rtol=1e-5)
        assert advantages.abs().sum() > 0
        # REINFORCE++ and GRPO come out normalised; RLOO is whitened over the rollout like GAE
        final = masked_whiten(advantages, mask) if name == "rloo" else advantages
        assert rows(reached) == rows(final)
    # no critic: not loaded, not trained, not saved; the policy was trained
    assert "critic" not in run.loaded and not (run.out / "critic").exists()
    for row in run.metrics:
        assert not {"value_loss", "vf_clipfrac", "critic_grad_norm", "explained_variance", "value_mean"} & row.keys()
        assert "actor_grad_norm" in row and "policy_loss" in row
    start = load_file(Path(tiny_model) / "model.safetensors")
    trained = weights(run.out / "policy")
    assert any(not torch.equal(trained[k], start[k]) for k in start if k in trained)
    assert (run.meta["estimator"], run.meta["group_size"]) == (name, group_size)
    assert run.summary["estimator"] == name and f"estimator {name} (no critic)" in run.log
    # each prompt sampled group_size times in a row; prompts_seen counts prompts
    for it in (1, 2):
        batch = [r for r in run.rollouts if r["iteration"] == it]
        assert [r["group"] for r in batch] == [j // group_size for j in range(4)]
        assert all(batch[j]["prompt"] == batch[j - j % group_size]["prompt"] for j in range(4))
        assert run.metrics[it - 1]["prompts_seen"] == it * 4 // group_size
    if group_size == 2:  # two samples of one prompt differ (random tiny model, 6 tokens)
        assert any(r["response"] != s["response"] for r, s in zip(run.rollouts[::2], run.rollouts[1::2]))


# ---- granularity -----------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["token", "sentence", "delayed", "shaping"])
def test_granularity_places_the_dpo_term(runs, granularity):
    run = runs("default") if granularity == "token" else runs(granularity, granularity=granularity)
    calls = run.calls["compose_rewards"]
    assert len(calls) == 2
    assert len(run.calls["sentence_ends"]) == (2 if granularity == "sentence" else 0)
    for it, ((exp, weights), kwargs, paid_terms) in enumerate(calls):
        mask, tok = exp.batch.response_mask, exp.tokens
        on = mask.bool()
        assert kwargs["granularity"] == granularity and weights == {"dpo": 0.05, "rm": 1.0}
        ends = kwargs["ends"]
        if granularity == "sentence":  # the ends found in the decoded text reached the reward
            assert ends is run.calls["sentence_ends"][it][2]
        else:
            assert ends is None
        dense = torch.where(on, dpo_token_reward(tok.logp_dpo, tok.logp_ref_t1, weights["dpo"], kwargs["dense_clip"]),
                            0.0)
        assert dense.abs().sum() > 0  # the stand-in DPO model differs from the reference
        term = paid_terms.terms["dpo"]
        torch.testing.assert_close(term, place_dpo_reward(dense, mask, granularity, ends))
        paid = term.sum(1)
        torch.testing.assert_close(paid, torch.zeros_like(paid) if granularity == "shaping" else dense.sum(1))
        # the logged DPO reward is the term as paid, summed per response
        assert run.metrics[it]["reward_dpo"] == pytest.approx(float(paid.mean()), abs=1e-7)
        assert run.metrics[it]["reward_total"] == pytest.approx(float(paid_terms.total.sum(1).mean()), rel=1e-5,
                                                                abs=1e-6)
    if granularity == "delayed":  # only the last token of each response holds the DPO term
        (exp, _), _, paid_terms = calls[0]
        term = paid_terms.terms["dpo"]
        last = exp.batch.response_mask.sum(1).long() - 1
        assert torch.equal(term.nonzero()[:, 1], last[term.nonzero()[:, 0]])
    assert run.meta["granularity"] == granularity


def test_token_pieces_and_sentence_ends_with_the_tokenizer(tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    ids = tokenizer("Good day. Is it here?\nYes", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    pieces = token_pieces(tokenizer, [ids, ids[:2]])
    assert "".join(pieces[0]) == "Good day. Is it here?\nYes" and pieces[0][-1] == ""  # EOS decodes to ''
    assert pieces[1] == pieces[0][:2]
    mask = torch.tensor([[1] * len(ids), [1, 1] + [0] * (len(ids) - 2)])
    ends = sentence_ends(pieces, mask)
    marked = [p for p, end in zip(pieces[0], ends[0].tolist()) if end]
    unmarked = [p for p, end in zip(pieces[0], ends[0].tolist()) if not end]
    # the marked tokens are those holding the '.', the '?' and the newline, and only those
    assert "".join(c for p in marked for c in p if c in ".?\n") == ".?\n"
    assert all(any(c in p for c in ".?\n") for p in marked) and not any(c in p for p in unmarked for c in ".?\n")
    assert not ends[1].any()


# ---- command line ----------------------------------------------------------------------------------
def _ppo_args(tiny_model, dpo_model, reward_model, out, *extra):
    return ["ppo", "--reward", "rto", "--policy", tiny_model, "--dpo_model", dpo_model, "--reward_model",
            reward_model, "--iterations", "1", "--rollout_size", "4", "--minibatch_size", "4", "--max_new_tokens",
            "4", "--train_layers", "2", "--progress", "false", "--precision", "fp32", "--out", str(out), *extra]


def test_cli_grpo_with_groups_of_four_and_sentence_rewards(tiny_model, dpo_model, reward_model, tmp_path):
    out = tmp_path / "grpo"
    assert main(_ppo_args(tiny_model, dpo_model, reward_model, out, "--estimator", "grpo", "--group_size", "4",
                          "--granularity", "sentence")) == 0
    meta = json.loads((out / "policy" / "rto_model.json").read_text())
    assert (meta["estimator"], meta["group_size"], meta["granularity"]) == ("grpo", 4, "sentence")
    rollouts = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert len({r["prompt"] for r in rollouts}) == 1 and [r["group"] for r in rollouts] == [0, 0, 0, 0]
    assert not (out / "critic").exists()


@pytest.mark.parametrize("extra, message", [
    (["--estimator", "grpo"], "--estimator grpo compares the responses to one prompt: it needs --group_size >= 2, "
                              "got 1"),
    (["--estimator", "rloo", "--group_size", "2", "--gamma", "0.9"], "--gamma must be 1, got 0.9"),
    (["--group_size", "3"], "rollout_size (4) counts responses: it must be a multiple of group_size (3)"),
    (["--group_size", "0"], "group_size must be an integer >= 1, got 0"),
    (["--estimator", "ppo"], "estimator must be one of gae, reinforce++, grpo, rloo, got 'ppo'"),
    (["--granularity", "word"], "granularity must be one of token, sentence, delayed, shaping, got 'word'"),
    (["--granularity", "sentence", "--reward", "sparse"], "--granularity sentence places the dense reward, which "
                                                          "--reward sparse does not have"),
])
def test_cli_refuses_bad_settings_in_one_line(tiny_model, dpo_model, reward_model, tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    assert main(_ppo_args(tiny_model, dpo_model, reward_model, out, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("rto ppo: error: ") and message in err and err.count("\n") == 1
    assert not out.exists()  # refused before the run folder was made
