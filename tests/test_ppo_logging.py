"""What a PPO practitioner reads every iteration, and schedules that follow the data position."""

import math

import pytest

from rto.runtime import read_metrics
from rto.stages.ppo import PPOConfig, run


def _config(tmp_path, tiny_model, name, **kw):
    kw.setdefault("reward_model", tiny_model)
    kw.setdefault("precision", "fp32")
    return PPOConfig(out=str(tmp_path / name), reward="sparse", policy=tiny_model,
                     iterations=3, rollout_size=4, minibatch_size=2, max_new_tokens=6, train_layers=2, progress=False,
                     actor_lr=1e-3, critic_lr=1e-3, warmup_ratio=0.3, min_lr_ratio=0.0, temperature=0.9, **kw)


@pytest.fixture(scope="module")
def metrics(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("ppo_logging")
    run(_config(tmp, tiny_model, "p"))
    return read_metrics(tmp / "p")




def test_every_iteration_logs_the_usual_diagnostics(metrics):
    for row in metrics:
        for key in ("explained_variance", "approx_kl", "clipfrac", "vf_clipfrac", "entropy", "kl", "kl_per_token",
                    "tokens_per_s_generate", "tokens_per_s_score", "tokens_per_s_update"):
            assert key in row, key
        assert row["entropy"] > 0  # a random tiny model samples from a wide distribution
        assert row["tokens_per_s_generate"] > 0 and row["tokens_per_s_score"] > 0 and row["tokens_per_s_update"] > 0
        assert math.isnan(row["explained_variance"]) or row["explained_variance"] <= 1
        assert "sampler_logp_gap" not in row  # the old log-probs are the sampler's: nothing to compare


def test_sampler_logprobs_stand_for_a_scoring_pass_of_the_policy(tmp_path, tiny_model, reward_model):
    """By default PPO's old log-probs and entropies are the sampler's; a run that rescores the policy (and logs
    the gap) samples the same tokens and trains to the same numbers, up to fp32 rounding."""
    runs = {}
    for name, rescore in (("sampler", False), ("rescored", True)):
        run(_config(tmp_path, tiny_model, name, rescore_policy=rescore, reward_model=reward_model))
        runs[name] = read_metrics(tmp_path / name)
    assert len(runs["sampler"]) == len(runs["rescored"]) == 3
    assert runs["sampler"][-1]["kl"] != 0  # the policy moved: later iterations compare trained policies
    for ours, theirs in zip(runs["sampler"], runs["rescored"]):
        # the sampler drew each token from the distribution the scoring pass computes (fp32: rounding only)
        assert theirs["sampler_logp_gap"] < 1e-4
        for key in ("length", "rm_raw", "kl", "entropy", "policy_loss", "value_loss", "approx_kl", "reward_total"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-3, abs=1e-5), key


def test_a_skipped_rollout_still_advances_the_schedules(tmp_path, tiny_model, metrics, monkeypatch):
    import rto.stages.ppo as ppo

    from tests.test_guards import nan_terms

    real, calls = ppo.compose_rewards, []

    def nan_on_first_iteration(*a, **k):
        calls.append(1)
        paid = real(*a, **k)
        return nan_terms(paid) if len(calls) == 1 else paid

    monkeypatch.setattr(ppo, "compose_rewards", nan_on_first_iteration)
    skipped = read_metrics(tmp_path / "s") if run(_config(tmp_path, tiny_model, "s")) else None
    assert [r["skipped_steps"] for r in skipped] == [1, 1, 1]
    # the learning rate after each iteration is where an unskipped run has it: the schedule follows the data
    assert [r["lr"] for r in skipped] == pytest.approx([r["lr"] for r in metrics])
    assert len({r["lr"] for r in metrics}) == 3  # (warm-up then decay: the check above could fail)


def test_under_bf16_the_policy_is_rescored_on_the_samplers_trunk(tmp_path, tiny_model, monkeypatch):
    """Under bf16 the scoring pass reruns the policy (the update's forward must give its old log-probs), but only its
    top layers, on the trunk states the sampler kept while it drew the tokens: no role runs the frozen bottom layers
    again, and the update reads the same states."""
    import rto.stages.ppo as ppo
    from rto.models import decoder_of

    bottom_runs, real_score = [], ppo.score_rollout

    def score(rollout, texts, rows, group, gold_scorer, roles, *args, **kwargs):
        assert rollout.trunk is not None  # the sampler kept the trunk's states
        hooks = [decoder_of(m).layers[0].register_forward_hook(lambda *_: bottom_runs.append(1))
                 for m in roles.values() if m is not None]
        try:
            return real_score(rollout, texts, rows, group, gold_scorer, roles, *args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()

    monkeypatch.setattr(ppo, "score_rollout", score)
    run(_config(tmp_path, tiny_model, "bf16", precision="bf16"))
    rows = read_metrics(tmp_path / "bf16")
    log = (tmp_path / "bf16" / "log.txt").read_text()
    assert "trunk sharing on" in log and "precision bf16" in log
    assert bottom_runs == []
    # rescored: the sampler's log-probs against the top layers' full forward in bf16, rounding apart
    assert all(0 < row["sampler_logp_gap"] < 0.05 for row in rows), [row["sampler_logp_gap"] for row in rows]
