"""`rto ppo --reward rto|sparse|custom`: PPO with RTO's dense token reward, classic sparse-reward PPO, or
any weighted sum of reward sources.

One iteration, in order (every detail visible here, CleanRL-style):
  1. rollout  - sample group_size responses per prompt from the policy (temperature T), cut after the first EOS
  2. scoring  - log-probs of policy and reference at temperature T, of the DPO model and reference at T=1;
                critic values V(s_t); reward-model score, normalised with the RM's training statistics; the
                gold score (logged only); all in one Experience record
  3. rewards  - weighted reward sources + KL (rto.rewards.compose_rewards; RTO = paper eq. 4.7 =
                rto.rewards.token_rewards), dense sources paid at --granularity (token = RTO, sentence =
                Semi-RTO, delayed, shaping = RS-PPO); sparse = the RM source alone
  4. advantages - --estimator: GAE (gamma, lambda) on the critic's values, or critic-free REINFORCE++, GRPO or
                RLOO (rto.advantages.ADVANTAGE_ESTIMATORS); then whitened over the rollout (not REINFORCE++, GRPO)
  5. update   - clipped policy loss + clipped value loss (GAE only), minibatches, gradient clipping
Reference, DPO model and reward model are frozen and stay in eval mode. A critic-free estimator loads no critic:
there is no value loss, no critic update and no `critic/` folder, and the rollout's values are zeros.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from rto.advantages import (ADVANTAGE_ESTIMATORS, NEEDS_GROUPS, NORMALISED, USES_CRITIC, explained_variance, gae,
                            masked_mean, masked_sum, masked_whiten)
from rto.experience import Experience, SequenceTensors, TokenTensors
from rto.lora import LoraOptions, enable_gradient_checkpointing, one_base_roles
from rto.losses import LOSS_AGGREGATIONS, policy_loss, value_loss
from rto.checkpoint import load_checkpoint, save_checkpoint
from rto.distributed import (all_sum, any_true, gather_lists, gathered, masked_moments, mean_over_processes,
                             shard_frozen, shard_trained, share_bounds, share_weight, world)
from rto.models import DEFAULT_MODEL, ValueModel, load_causal_lm, read_meta, save_model, set_trainable, weights_fingerprint
from rto.rewards import (REWARD_SOURCES, adaptive_kl_coef, check_sources, compose_rewards, normalised_rm_score,
                         sentence_ends, sequence_kl, token_pieces)
from rto.rollout import decode_responses, generate, off_policy_warning, score_sequences
from rto.runtime import keep_rows, timed
from rto.sequences import critic_values, probe_batch, token_logprobs, token_values
from rto.stages.common import (Checkpointing, Common, NonFiniteGuard, Optimization, backward, check_token_budget,
                               clip_gradients, drop_long_prompts, end_batch, finite, frozen, make_optimizer,
                               param_groups, role_tokenizer, shared_trunk_layers, start)
from rto.tasks import get_task, prompts_and_rows
from rto.zero import engine_for

REWARDS = ("rto", "sparse", "custom")


@dataclass
class PPOConfig(LoraOptions, Checkpointing, Optimization, Common):
    """Fields of `rto ppo`: PPO with RTO's dense token reward, the sparse RM reward or weighted reward sources."""

    out: str = "runs/ppo"
    reward: str = "rto"
    """rto | sparse | custom. rto: paper eq. 4.7, the dense DPO token reward + the KL penalty + the RM score on
    the last token; sparse: classic PPO, the KL penalty + the RM score; custom: the weighted `sources` + the
    KL penalty."""
    sources: dict[str, float] | None = None
    """--reward custom only: reward source -> weight, e.g. {dpo: 0.05, rm: 1.0}. Sources: dpo, simpo, rm
    (rto.rewards.REWARD_SOURCES) and any added with rto.rewards.register_source."""
    policy: str = DEFAULT_MODEL
    """Start of the policy (the SFT model): the embedded name, a local folder or a hub id."""
    ref: str | None = None
    """The reference pi_ref of the KL penalty and of the DPO reward; null = `policy`. It must be the model
    dpo_model was trained against."""
    dpo_model: str | None = None
    """pi_dpo, the source of the dense reward (needed by --reward rto): a model written by `rto dpo` with any
    --loss; a SimPO model pays its length-normalised log-prob (the simpo source), the others
    log(pi_dpo / pi_ref) (the dpo source)."""
    reward_model: str = "runs/rm/model"
    """The reward model (written by `rto rm`); its score is normalised with the mean and std it recorded."""
    critic: str | None = None
    """Start of the critic (estimator gae only); null = the reward model, its head rescaled to predict the
    normalised score."""
    task: str = "sentiment"
    """The task (rto.tasks: sentiment, ifeval): its train prompts and its gold scorer (the gold score is
    logged, never trained on)."""
    prompts: str | None = None
    """A prompt file (JSON Lines, Parquet or a datasets folder) instead of the task's train prompts."""
    iterations: int = 8
    """PPO iterations, each one rollout (sample, score, rewards, advantages) and ppo_epochs passes of updates
    over it; >= 1."""
    rollout_size: int = 32
    """Responses per iteration: rollout_size / group_size prompts, each sampled group_size times; a multiple
    of minibatch_size and of group_size; >= 1."""
    group_size: int = 1
    """Responses sampled per prompt; >= 1 (grpo and rloo compare them: >= 2)."""
    granularity: str = "token"
    """Where the dense reward is paid: token (RTO, eq. 4.7) | sentence (Semi-RTO: each sentence's sum on its
    last token) | delayed (the whole sum on the last token) | shaping (RS-PPO: on every token, with its sum
    taken off again at the last one)."""
    estimator: str = "gae"
    """Advantage estimator: gae (with the critic) | reinforce++ | grpo | rloo (critic-free: no critic is
    loaded or trained; grpo and rloo need group_size >= 2 and gamma 1)."""
    minibatch_size: int = 8
    """Responses per update; divides rollout_size; >= 1."""
    ppo_epochs: int = 1
    """Passes over each rollout, in shuffled minibatches; >= 1."""
    max_new_tokens: int = 40
    """Longest response, in tokens: sampling stops at EOS or here; >= 1."""
    temperature: float = 1.0
    """Sampling temperature T; the policy's log-probs (PPO ratio) and the KL penalty are taken at T, the DPO
    reward at 1; > 0."""
    top_k: int = 0
    """Sample only from the k most likely tokens; 0 = no cut. A cut makes PPO off-policy (its log-probs use
    the full softmax); >= 0."""
    top_p: float = 1.0
    """Nucleus sampling threshold; 1 = no cut. A cut makes PPO off-policy (its log-probs use the full
    softmax); in (0, 1]."""
    actor_lr: float = 3e-5
    """Peak learning rate of the policy; > 0."""
    critic_lr: float = 3e-5
    """Peak learning rate of the critic (estimator gae only); > 0."""
    warmup_ratio: float = 0.0
    checkpoint_every: int = 1
    """Iterations between checkpoints; 0 = only after the last one; >= 0."""
    beta_dpo: float = 0.05
    """The paper's beta1 (eq. 4.7): weight of the dense DPO reward log(pi_dpo / pi_ref) on every token
    (--reward rto; for a SimPO model, of its simpo source); >= 0, 0 = off."""
    dpo_clip: float | None = 0.05
    """Each token's weighted dense reward (beta_dpo * log-ratio) is clipped to +-dpo_clip; null = no clip;
    > 0. 0.05 follows the authors' public script."""
    beta_kl: float = 0.01
    """The paper's beta2: weight of the KL penalty -beta2 * (log pi - log pi_ref) on every token (k1
    estimate, at temperature T); the start value when adaptive_kl; >= 0."""
    adaptive_kl: bool = False
    """Adapt beta_kl after every rollout towards target_kl (Ziegler et al. 2019's proportional controller)."""
    target_kl: float = 6.0
    """Target of adaptive_kl: KL(pi || pi_ref) in nats per response (the rollout's mean); > 0."""
    kl_horizon: int = 10000
    """Horizon of adaptive_kl, in responses: each rollout multiplies beta_kl by 1 + e * rollout_size /
    kl_horizon, e = clip(KL / target_kl - 1, +-0.2); >= 1."""
    beta_rm: float = 1.0
    """The paper's beta3: weight of the reward-model score, paid on the last token (--reward rto and
    sparse); >= 0."""
    rm_clip: float | None = 10.0
    """The normalised RM score (r - mu) / sigma is clipped to +-rm_clip before its weight applies; null = no
    clip; > 0."""
    missing_eos_penalty: float | None = None
    """Subtracted from the normalised RM score of every response that did not end with EOS (before rm_clip);
    null = none."""
    gamma: float = 1.0
    """Discount factor gamma per token (gae, reinforce++; grpo and rloo need 1); in [0, 1]."""
    lam: float = 0.95
    """GAE's lambda: 1 = the discounted return minus the value (more variance), 0 = one-step TD (more bias);
    in [0, 1]."""
    clip: float = 0.2
    """PPO's epsilon: the probability ratio pi / pi_old is clipped to [1 - epsilon, 1 + epsilon] in the policy
    loss; > 0."""
    value_clip: float | None = 0.2
    """The critic's new values are clipped to +-value_clip around the rollout's in the value loss; null =
    plain squared error; > 0."""
    whiten_advantages: bool = True
    """Whiten the advantages over the rollout's response tokens (zero mean, unit variance); reinforce++ and
    grpo normalise their own and are not whitened again."""
    loss_agg: str = "token_mean"
    """How per-token losses become one number: token_mean (every token weighs the same) | seq_mean_token_sum
    (a response weighs by its length) | seq_mean_token_mean (every response weighs the same)."""
    generation_batch_size: int = 32
    """Responses generated at a time; >= 1."""
    score_batch_size: int = 16
    """Responses scored at a time by each model (policy, reference, DPO model, reward model, critic); >= 1."""
    rescore_policy: bool = False
    """Run the policy over the sampled tokens again in the scoring pass, and log how far the sampler's
    log-probs are from it (sampler_logp_gap). Off: PPO's old log-probs and the entropy are the sampler's own
    (fp32, the distribution each token was drawn from), one forward less per iteration, and with a shared trunk
    (train_layers) so are the trunk's hidden states (the sampler computed them; the scoring pass does not
    recompute them). The policy is always rescored under bf16 (its top layers only, on the sampler's trunk
    states, which the update reads too) and with top_k / top_p (their sampler logits come from transformers'
    generate; the trunk is recomputed)."""


def check_config(cfg: PPOConfig) -> None:
    if cfg.reward not in REWARDS:
        raise ValueError(f"--reward must be one of {', '.join(REWARDS)}, got {cfg.reward!r}")
    if (cfg.reward == "custom") != (cfg.sources is not None):
        raise ValueError("--sources sets the reward sources of --reward custom (and only of it): "
                         + ("pass --sources, e.g. '{dpo: 0.05, rm: 1.0}'" if cfg.sources is None else
                            f"use --reward custom, or drop --sources to keep the {cfg.reward} preset"))
    if cfg.sources is not None:
        check_sources(cfg.sources)
    needs_dpo = cfg.reward == "rto" or any(REWARD_SOURCES[name].needs_dpo_model for name in cfg.sources or {})
    if needs_dpo and not cfg.dpo_model:
        raise ValueError(f"--reward {cfg.reward} needs --dpo_model (a DPO-trained model, e.g. the `model` folder "
                         "written by `rto dpo`); use --reward sparse for classic PPO")
    if cfg.loss_agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"--loss_agg must be one of {', '.join(LOSS_AGGREGATIONS)}, got {cfg.loss_agg!r}")
    if cfg.rollout_size % cfg.minibatch_size:
        raise ValueError(f"rollout_size ({cfg.rollout_size}) must be a multiple of minibatch_size ({cfg.minibatch_size})")
    if cfg.rollout_size % cfg.group_size:
        raise ValueError(f"rollout_size ({cfg.rollout_size}) counts responses: it must be a multiple of group_size "
                         f"({cfg.group_size})")
    if cfg.estimator in NEEDS_GROUPS and cfg.group_size < 2:
        raise ValueError(f"--estimator {cfg.estimator} compares the responses to one prompt: it needs "
                         f"--group_size >= 2, got {cfg.group_size}")
    if cfg.estimator in NEEDS_GROUPS and cfg.gamma != 1.0:
        raise ValueError(f"--estimator {cfg.estimator} scores each response by its undiscounted summed reward: "
                         f"--gamma must be 1, got {cfg.gamma}")
    dense = cfg.reward == "rto" or any(REWARD_SOURCES[name].dense for name in cfg.sources or {})
    if cfg.granularity != "token" and not dense:
        raise ValueError(f"--granularity {cfg.granularity} places the dense reward, which --reward {cfg.reward} "
                         "does not have")


def reward_weights(cfg: PPOConfig, dpo_loss: str | None) -> dict[str, float]:
    """The reward sources and their weights (rto.rewards.compose_rewards):
      rto     the DPO model's implicit token reward at beta_dpo ("simpo" for a model trained with the SimPO
              loss, reference-free and length-normalised; "dpo" = log pi_dpo / pi_ref otherwise) + the RM
              score at beta_rm: paper eq. 4.7
      sparse  the RM score at beta_rm: classic PPO
      custom  --sources as given
    The KL penalty (beta_kl) is added to all of them."""
    if cfg.reward == "custom":
        return dict(cfg.sources)
    if cfg.reward == "sparse":
        return {"rm": cfg.beta_rm}
    return {("simpo" if dpo_loss == "simpo" else "dpo"): cfg.beta_dpo, "rm": cfg.beta_rm}


def check_dpo_reference(run_, cfg: PPOConfig, ref, record: dict) -> None:
    """The "dpo" source is the DPO implicit reward only against the reference pi_dpo was trained with: a DPO
    model folder written by `rto dpo` records it (`record`, a fingerprint of its weights); another reference is
    refused, and so is a model trained without one (SimPO: use the "simpo" source)."""
    if record.get("stage") == "dpo" and record.get("reference") is None:
        raise ValueError(f"the DPO model {cfg.dpo_model} was trained with the reference-free {record.get('loss')} "
                         "loss, so log(pi_dpo / pi_ref) is not its implicit reward; use the \"simpo\" source "
                         "(--reward rto picks it for a SimPO model), or a model trained with dpo, ipo, rdpo, tdpo1 "
                         "or tdpo2")
    if "reference_fingerprint" not in record:
        run_.note(f"ppo: {cfg.dpo_model} does not record the reference it was trained against; make sure it is "
                  f"{cfg.ref or cfg.policy}")
        return
    if record["reference_fingerprint"] != weights_fingerprint(ref):
        raise ValueError(f"the DPO model {cfg.dpo_model} was trained against {record.get('reference')!r}, whose "
                         f"weights differ from this run's reference {cfg.ref or cfg.policy!r}; RTO's dense reward is "
                         "only the DPO implicit reward against that model: pass it as --ref (or --policy)")


def rescore_needed(cfg: PPOConfig, accelerator) -> bool:
    """Whether the scoring pass runs the policy: asked for, or the sampler's log-probs are not fp32 ones of the
    full softmax from rto's decode loop (bf16 autocast; top_k / top_p go through transformers' generate)."""
    return cfg.rescore_policy or accelerator.mixed_precision != "no" or bool(cfg.top_k) or cfg.top_p < 1.0


def score_rollout(rollout, texts: list[str], rows: list[dict], group: torch.Tensor, gold_scorer, roles: dict,
                  n_shared: int, cfg: PPOConfig, accelerator, rm_stats) -> Experience:
    """Step 2: every model looks at the sampled tokens once (the shared trunk is kept for the update); the
    rollout's record is built here, whole: tokens, scores, texts, prompt rows, groups and the gold score.

    The policy's log-probs pi_old and entropies, and the shared trunk's states, are the sampler's (rto's decode
    loop computes them in fp32 from the logits it drew each token from), unless the policy is rescored (see
    PPOConfig.rescore_policy)."""
    rescore = rescore_needed(cfg, accelerator)
    scored = score_sequences(
        rollout.batch, ref=roles["ref"], policy=roles["policy"] if rescore else None, dpo=roles["dpo"],
        critic=roles["critic"], rm=roles["rm"], n_shared=n_shared, temperature=cfg.temperature,
        chunk=cfg.score_batch_size, autocast=accelerator.autocast, device=accelerator.device, keep_trunk=True,
        entropy=rescore, trunk=rollout.trunk,
    )
    device = accelerator.device
    if not rescore:  # (score_sequences without a policy gives the reference's log-probs as logp)
        scored["logp"], scored["entropy"] = rollout.sampler_logp.to(device), rollout.sampler_entropy.to(device)
    batch = rollout.batch.to(device)
    ended = rollout.ended.to(device)
    values = scored["values"] if "values" in scored else torch.zeros_like(scored["logp"])  # no critic: zeros
    tokens = TokenTensors(logp=scored["logp"], logp_ref=scored["logp_ref"], values=values,
                          logp_dpo=scored.get("logp_dpo"), logp_ref_t1=scored.get("logp_ref_t1"),
                          entropy=scored["entropy"])
    seqs = SequenceTensors(
        rm_raw=scored["rm_raw"], rm_score=normalised_rm_score(scored["rm_raw"], rm_stats, ended, cfg.missing_eos_penalty),
        ended=ended, length=batch.response_lengths, gold=torch.tensor(gold_scorer(texts, rows)).to(device),
        group=group.to(device))
    return Experience(batch=batch, tokens=tokens, seqs=seqs, trunk=scored.get("trunk"), texts=texts, rows=rows)


def run(cfg: PPOConfig) -> dict:
    check_config(cfg)
    run_, accelerator = start(cfg, f"ppo --reward {cfg.reward}")
    uses_critic = cfg.estimator in USES_CRITIC
    needs_dpo = cfg.reward == "rto" or any(REWARD_SOURCES[name].needs_dpo_model for name in cfg.sources or {})
    dpo_record = read_meta(cfg.dpo_model) if needs_dpo else {}
    weights = reward_weights(cfg, dpo_record.get("loss"))
    run_.note(f"ppo: reward {' + '.join(f'{w:g} * {name}' for name, w in weights.items())} - {cfg.beta_kl:g} * KL; "
              f"estimator {cfg.estimator} ({'with a critic' if uses_critic else 'no critic'}), granularity "
              f"{cfg.granularity}, {cfg.group_size} response(s) per prompt, loss aggregation {cfg.loss_agg}")
    device = accelerator.device
    prompts, prompt_rows = prompts_and_rows(cfg.task, cfg.prompts, "train", None, cfg.seed)  # with each prompt's file row
    gold_scorer = get_task(cfg.task).gold_scorer()
    tokenizer = role_tokenizer(run_, cfg, {
        "policy": cfg.policy, "reference": cfg.ref, "DPO model": cfg.dpo_model if needs_dpo else None,
        "reward model": cfg.reward_model, "critic": cfg.critic if uses_critic else None})
    check_token_budget(cfg, cfg.policy, "policy", cfg.max_new_tokens)
    kept, prompt_ids = drop_long_prompts(run_, tokenizer, list(zip(prompts, prompt_rows)), cfg, "prompts", lambda x: x[0])
    prompts, prompt_rows = [p for p, _ in kept], [r for _, r in kept]
    load = lambda path, role: load_causal_lm(path, cfg.trust_remote_code, role=role).to(device)  # noqa: E731
    if cfg.lora:  # one base: the policy a new adapter on it, the reference it without adapters, the DPO model a
        # second adapter on it (rto.lora); lora_meta names the base in the saved adapter's record
        lm_roles, lora_meta = one_base_roles(cfg.policy, cfg.ref, cfg.dpo_model if needs_dpo else None, dpo_record,
                                             cfg, cfg.train_layers, load, run_.note)
    else:
        lm_roles = {"policy": load(cfg.policy, "policy"), "ref": frozen(load(cfg.ref or cfg.policy, "reference")),
                    "dpo": frozen(load(cfg.dpo_model, "DPO model")) if needs_dpo else None}
        lora_meta = {}
    roles = {
        **lm_roles,
        "rm": frozen(ValueModel.from_pretrained(cfg.reward_model, cfg.trust_remote_code, role="reward model").to(device)),
        "critic": (ValueModel.from_pretrained(cfg.critic or cfg.reward_model, cfg.trust_remote_code, role="critic")
                   .to(device) if uses_critic else None),  # critic-free estimators need no values
    }
    if cfg.gradient_checkpointing:  # the trained models recompute their layers' activations in the backward pass
        for model in (roles["policy"], roles["critic"]):
            if model is not None:
                enable_gradient_checkpointing(model)
    if "dpo" in weights:
        check_dpo_reference(run_, cfg, roles["ref"], dpo_record)
    if warning := off_policy_warning(cfg.top_k, cfg.top_p):
        run_.note(f"ppo: {warning}")
    policy, critic = roles["policy"], roles["critic"]
    if critic is not None:
        critic.normalize_head()  # a critic started from the RM predicts normalised scores from step 1
    for model in (policy, critic) if critic is not None else (policy,):
        model.eval()  # no dropout in rollouts or updates; gradients still flow
        set_trainable(model, cfg.train_layers)
    probe = probe_batch(prompt_ids, tokenizer.pad_token_id).to(device)
    n_shared = shared_trunk_layers([m for m in roles.values() if m is not None], cfg.train_layers, probe, run_.note)
    for role, model in (("policy", policy), ("critic", critic)):  # FSDP launches: the trained layers split over
        if model is not None:                                   # the processes (rto.distributed)
            shard_trained(model, role, run_.note)
    for role, key in (("reference", "ref"), ("DPO model", "dpo"), ("reward model", "rm")):  # and the frozen roles'
        if roles[key] is not None:                              # own layers (each process scores an equal share)
            shard_frozen(roles[key], role, n_shared, run_.note)
    rm_stats = roles["rm"].reward_stats()
    if rm_stats is None:
        run_.note(f"ppo: {cfg.reward_model} has no reward statistics; scores are used unnormalised")
        rm_stats = (0.0, 1.0)

    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(prompts), generator=gen).tolist()
    prompts_per_iter = cfg.rollout_size // cfg.group_size
    # several processes (rto.distributed): each samples, scores and trains on its contiguous share of the
    # iteration's prompts (whole groups), with minibatch_size / processes of its responses per minibatch
    n_proc = world()[1]
    if prompts_per_iter % n_proc or cfg.minibatch_size % n_proc:
        raise ValueError(f"{n_proc} processes share each iteration's {prompts_per_iter} prompts and each minibatch's "
                         f"{cfg.minibatch_size} responses equally: rollout_size / group_size and minibatch_size must "
                         f"be multiples of {n_proc}")
    first, last = share_bounds(prompts_per_iter)
    updates_per_iter = cfg.ppo_epochs * (cfg.rollout_size // cfg.minibatch_size)
    total = cfg.iterations * updates_per_iter
    # each trained model: (trainable parameters, optimizer, schedule); the critic only when the estimator uses values
    trained = {"actor": ([p for p in policy.parameters() if p.requires_grad],
                         *make_optimizer(param_groups(policy, cfg.actor_lr), total, cfg))}
    if critic is not None:
        trained["critic"] = ([p for p in critic.parameters() if p.requires_grad],
                             *make_optimizer(param_groups(critic, cfg.critic_lr), total, cfg))
    actor_sched = trained["actor"][2]
    # under a DeepSpeed launch (rto.zero) each trained model and its AdamW go into a ZeRO engine, which averages,
    # clips and steps; None otherwise
    engines = {name: engine_for(model, trained[name][1], cfg.max_grad_norm, role, run_.note)
               for name, model, role in (("actor", policy, "policy"), ("critic", critic, "critic")) if name in trained}
    if not any(engines.values()):
        engines = {}
    beta_kl = cfg.beta_kl
    history = []
    guard = NonFiniteGuard(run_, cfg.max_nonfinite_steps, f"ppo ({cfg.reward})", "iteration")
    # what a checkpoint holds beside the trainable weights: optimizers, schedulers, the minibatch generator
    # (and every global RNG), the KL coefficient, the metrics history, the RM's reward statistics (a resume
    # checks they are unchanged); the iteration is the data position
    models = {"policy": policy} if critic is None else {"policy": policy, "critic": critic}
    stateful = {}
    for name, (_, opt, sched) in trained.items():
        stateful.update({f"{name}_opt": engines.get(name) or opt, f"{name}_sched": sched})
    done = 0
    if run_.resume_from:
        state = load_checkpoint(run_.resume_from, models, stateful, {"minibatches": gen})
        done, beta_kl, history, guard.skipped = state["iteration"], state["beta_kl"], state["history"], state["skipped"]
        if tuple(state["rm_stats"]) != tuple(rm_stats):
            raise ValueError(f"{cfg.reward_model} changed since {run_.resume_from} was written (reward mean/std "
                             f"{tuple(state['rm_stats'])} then, {tuple(rm_stats)} now); --resume false starts over")
    if run_.writer:
        keep_rows(run_.dir / "rollouts.jsonl", lambda row: row["iteration"] <= done)
    pure = not cfg.top_k and cfg.top_p >= 1.0  # pure sampling takes per-response seeds (rollout.generate)
    rescore = rescore_needed(cfg, accelerator)  # else the sampler's log-probs and entropies are used
    # the shared trunk's states are the sampler's whenever rto's decode loop samples (not through transformers'
    # generate, for top_k / top_p), also when the policy is rescored under bf16: the scoring pass then runs the
    # policy's top layers on them, as the update does (its old log-probs and its ratio's numerator read the same
    # trunk). --rescore_policy true recomputes the trunk too, so that sampler_logp_gap measures the whole forward.
    sampler_trunk = n_shared if pure and not cfg.rescore_policy else 0

    for it in tqdm(range(done + 1, cfg.iterations + 1), desc=f"ppo ({cfg.reward})", unit="iter",
                   initial=done, total=cfg.iterations, disable=not cfg.progress):
        times: dict[str, float] = {}
        start_at = (it - 1) * prompts_per_iter
        idx = [order[(start_at + j) % len(order)] for j in range(prompts_per_iter) for _ in range(cfg.group_size)]
        group = torch.arange(prompts_per_iter).repeat_interleave(cfg.group_size)  # one id per prompt
        # every response's sampling seed, drawn as one process draws them (pure sampling; see rollout.generate)
        seeds = torch.randint(0, 2**62, (len(idx),)).tolist() if pure else None
        mine = slice(first * cfg.group_size, last * cfg.group_size)  # this process's responses
        idx, group, seeds = idx[mine], group[mine], seeds[mine] if pure else None

        # 1. rollout
        with timed(times, "time_generate_s"), gathered(policy):
            rollout = generate(policy, tokenizer, [prompt_ids[i] for i in idx], max_new_tokens=cfg.max_new_tokens,
                               temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                               batch_size=cfg.generation_batch_size, autocast=accelerator.autocast, desc="rollout",
                               progress=cfg.progress, return_logprobs=True, seeds=seeds,
                               trunk_layers=sampler_trunk)

        # 2. scoring (and the gold score, logged only)
        with timed(times, "time_score_s"), gathered(policy, critic):
            exp = score_rollout(rollout, decode_responses(tokenizer, rollout.response_ids), [prompt_rows[i] for i in idx],
                                group, gold_scorer, roles, n_shared, cfg, accelerator, rm_stats)
        mask, tok = exp.batch.response_mask, exp.tokens

        # 3. token rewards: the weighted sources + KL (RTO: paper eq. 4.7), dense ones paid at --granularity; kept
        # term by term, so the log reads them as they were paid
        ends = None
        if cfg.granularity == "sentence":  # a token whose text holds . ! ? or a newline ends a sentence
            ends = sentence_ends(token_pieces(tokenizer, rollout.response_ids), mask)
        paid = compose_rewards(exp, weights, beta_kl=beta_kl, dense_clip=cfg.dpo_clip, sparse_clip=cfg.rm_clip,
                               granularity=cfg.granularity, ends=ends)
        tok.rewards = paid.total
        # 4. advantages (--estimator): GAE on the critic's values, or a critic-free estimator on the same rewards
        # (GRPO and RLOO compare each response with the others of its group); then whitened over the whole
        # rollout, unless the estimator normalises them itself (REINFORCE++, GRPO)
        if cfg.estimator == "gae":
            tok.advantages, tok.returns = gae(tok.rewards, tok.values, mask, cfg.gamma, cfg.lam)
        else:
            estimate = ADVANTAGE_ESTIMATORS[cfg.estimator]  # (batch statistics span every process's rollout)
            tok.advantages, tok.returns = estimate(tok.rewards, mask, groups=exp.seqs.group, gamma=cfg.gamma,
                                                   moments=masked_moments if n_proc > 1 else None)
        if cfg.whiten_advantages and cfg.estimator not in NORMALISED:
            tok.advantages = masked_whiten(tok.advantages, mask,
                                           moments=masked_moments(tok.advantages, mask) if n_proc > 1 else None)
        # a NaN/inf anywhere in the rollout's numbers would poison every minibatch: skip this update
        bad = next((name for name, x in (("reward", tok.rewards), ("advantage", tok.advantages), ("value", tok.values),
                                         ("log-prob", tok.logp)) if not finite(x[mask.bool()])), None)
        if n_proc > 1 and any_true(bad is not None):  # every process skips the update together
            bad = bad or "number in another process's rollout"
        if bad:
            guard.skip(it, f"{bad} in the rollout")

        # 5. update: clipped policy loss (and clipped value loss when there is a critic) on minibatches
        stats: dict[str, list] = {}
        if bad:  # the schedules follow the data position, as in the offline stages: a skipped update still counts
            for _ in range(updates_per_iter):
                for _, _, sched in trained.values():
                    sched.step()
        with timed(times, "time_update_s"):
            for _ in range(cfg.ppo_epochs if not bad else 0):
                for mb in exp.minibatches(cfg.minibatch_size // n_proc, gen):
                    # micro-batches of this process's share (all of it without micro_batch_size), each without the
                    # columns that are padding in all its rows (Experience.tight); each loss weighs
                    # by the micro-batch's share of the whole minibatch's tokens (token_mean) or responses, over
                    # every process: share_weight(units, total) = W * units / total, 1 for one process and one part
                    parts = [part.tight() for part in mb.split(cfg.micro_batch_size or len(mb))]
                    units = [float(p.batch.response_mask.sum()) if cfg.loss_agg == "token_mean" else float(len(p))
                             for p in parts]
                    local = sum(units)
                    total = float(all_sum(local))  # over every process (local with one process)
                    ok, logged = True, {}
                    for part, n in zip(parts, units):
                        b, m, weight = part.batch, part.batch.response_mask, share_weight(n, total)
                        # separate parameters: each loss reaches its own model, so each is backpropagated as soon
                        # as it is computed (the policy's activations are freed before the critic's forward); both
                        # models step only if both losses and all gradients are finite
                        with accelerator.autocast():
                            logp = token_logprobs(policy, b, part.trunk, n_shared, cfg.temperature)
                            pg_loss, pg_stats = policy_loss(logp, part.tokens.logp, part.tokens.advantages, m,
                                                            cfg.clip, cfg.loss_agg)
                        ok = backward(accelerator, pg_loss * weight, engines.get("actor")) and ok
                        part_stats = {"policy_loss": pg_loss, **pg_stats}
                        if critic is not None:
                            with accelerator.autocast():
                                values = critic_values(token_values(critic, b, part.trunk, n_shared), b)
                                vf_loss, vf_stats = value_loss(values, part.tokens.values, part.tokens.returns, m,
                                                               cfg.value_clip, cfg.loss_agg)
                            ok = backward(accelerator, vf_loss * weight, engines.get("critic")) and ok
                            part_stats.update({"value_loss": vf_loss, **vf_stats})
                        for k, v in part_stats.items():  # this process's minibatch means, over its micro-batches
                            v = float(v.detach() if torch.is_tensor(v) else v) * n / local
                            logged[k] = logged.get(k, 0.0) + v
                    if engines:  # each engine steps unless its gradient norm is NaN/inf (end_batch)
                        grad_norms = end_batch([engines[name] for name in trained], ok)
                    else:
                        grad_norms = clip_gradients([params for params, _, _ in trained.values()], cfg.max_grad_norm,
                                                    ok)
                    if all(math.isfinite(norm) for norm in grad_norms):
                        for _, opt, _ in trained.values() if not engines else ():
                            opt.step()
                        guard.ok()
                    else:
                        guard.skip(it, "loss or gradient in a minibatch")
                    for name, (_, opt, sched) in trained.items():
                        sched.step()
                        (engines.get(name) or opt).zero_grad(set_to_none=True)
                    logged.update({f"{name}_grad_norm": norm for name, norm in zip(trained, grad_norms)})
                    for k, v in logged.items():
                        stats.setdefault(k, []).append(v)

        # logging (and the adaptive KL controller, which acts on the next rollout)
        kl = sequence_kl(tok.logp, tok.logp_ref, mask)
        n_tokens = float(all_sum(mask.sum()))  # every process's response tokens
        metrics = {
            "iteration": it, "prompts_seen": it * prompts_per_iter,
            "gold": float(exp.seqs.gold.mean()), "rm": float(exp.seqs.rm_score.mean()),
            "rm_raw": float(exp.seqs.rm_raw.mean()), "kl": float(kl.mean()), "kl_coef": beta_kl,
            "reward_total": float((tok.rewards * mask).sum(-1).mean()),
            # each term per response as paid (reward_dpo is 0 with --granularity shaping)
            **{f"reward_{name}": float(masked_sum(term, mask, dim=1).mean()) for name, term in paid.terms.items()},
            **{f"{name}_clipfrac": frac for name, frac in paid.clipfrac.items()},
            "eos_rate": float(exp.seqs.ended.float().mean()), "length": float(exp.seqs.length.float().mean()),
            **({"value_mean": float(masked_mean(tok.values, mask)),
                "explained_variance": float(explained_variance(tok.values, tok.returns, mask))}
               if critic is not None else {}),
            "entropy": float(masked_mean(tok.entropy, mask)),
            "kl_per_token": float(masked_mean(tok.logp - tok.logp_ref, mask)),
            # the sampler drew each token from the distribution the scoring pass computes (on-policy check)
            **({"sampler_logp_gap": float(masked_mean((rollout.sampler_logp.to(mask.device) - tok.logp).abs(), mask))}
               if rescore else {}),
            "tokens_per_s_generate": n_tokens / times["time_generate_s"],
            "tokens_per_s_score": n_tokens / times["time_score_s"],
            "tokens_per_s_update": (n_tokens * cfg.ppo_epochs / times["time_update_s"]
                                    if not bad and times.get("time_update_s") else 0.0),
            "lr": actor_sched.get_last_lr()[0], "skipped_steps": guard.skipped,
            **{k: sum(v) / len(v) for k, v in stats.items()}, **times,
        }
        metrics = mean_over_processes(metrics)  # this iteration's figures over every process's share
        run_.log(it, metrics)
        history.append(metrics)
        samples = gather_lists([{"iteration": it, "prompt": prompts[idx[j]][-1]["content"], "response": exp.texts[j],
                                 "group": int(group[j]), "gold": float(exp.seqs.gold[j]),
                                 "rm": float(exp.seqs.rm_score[j]), "ended": bool(exp.seqs.ended[j])}
                                for j in range(len(exp))])
        if run_.writer:
            with open(run_.dir / "rollouts.jsonl", "a") as f:
                f.writelines(json.dumps(sample) + "\n" for sample in samples)
        if cfg.adaptive_kl and math.isfinite(metrics["kl"]):
            beta_kl = adaptive_kl_coef(beta_kl, metrics["kl"], cfg.target_kl, cfg.kl_horizon, cfg.rollout_size)
        if it == cfg.iterations or (cfg.checkpoint_every and it % cfg.checkpoint_every == 0):
            state = {"iteration": it, "beta_kl": beta_kl, "history": history, "skipped": guard.skipped,
                     "rm_stats": list(rm_stats)}
            save_checkpoint(run_.dir, it, models, stateful, state, generators={"minibatches": gen},
                            keep=cfg.keep_checkpoints)

    save_model(policy, tokenizer, run_.dir / "policy", meta={
        "stage": "ppo", "reward": cfg.reward, "sources": weights, "dpo_model": cfg.dpo_model if needs_dpo else None,
        "dpo_loss": dpo_record.get("loss"), "beta_dpo": weights.get("dpo", weights.get("simpo")),
        "dpo_clip": cfg.dpo_clip, "beta_kl": cfg.beta_kl, "beta_rm": cfg.beta_rm, "temperature": cfg.temperature,
        "granularity": cfg.granularity, "estimator": cfg.estimator, "group_size": cfg.group_size,
        "loss_agg": cfg.loss_agg, **lora_meta})
    if critic is not None:
        save_model(critic, tokenizer, run_.dir / "critic")
    last = history[-1]
    summary = {"iterations": cfg.iterations, "reward": cfg.reward, "sources": weights, "estimator": cfg.estimator,
               "granularity": cfg.granularity, "loss_agg": cfg.loss_agg, "final_gold": last["gold"], "final_kl": last["kl"],
               "time_generate_s": sum(h["time_generate_s"] for h in history),
               "time_score_s": sum(h["time_score_s"] for h in history),
               "time_update_s": sum(h["time_update_s"] for h in history)}
    run_.note(f"ppo ({cfg.reward}): {cfg.iterations} iterations; last rollout gold {last['gold']:.3f}, "
              f"KL {last['kl']:.2f}, EOS rate {last['eos_rate']:.2f} -> {run_.dir / 'policy'}")
    run_.finish(summary)
    return summary
