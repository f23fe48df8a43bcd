"""`rto eval`: score models on the held-out prompts of a task.

Per model: gold score (mean, 95% interval), paired gold difference and win rate against a baseline
on the same prompts, KL to the reference per response and per token (with intervals), reward-model
score, response length and EOS rate; and for every pair of models, the paired gold difference with its
interval and the win rate (the `headline` pair, RTO vs PPO by default, first). Every model samples with
the same seed on the same prompts, so comparisons between models are paired.
"""

from __future__ import annotations

import gc
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rto.data import write_jsonl
from rto.models import DEFAULT_MODEL, ValueModel, load_causal_lm, read_meta, resolve_model
from rto.rewards import sequence_kl
from rto.rollout import decode_responses, generate, off_policy_warning, score_sequences
from rto.sequences import probe_batch
from rto.stages.common import Common, check_token_budget, drop_long_prompts, role_tokenizer, shared_trunk_layers, start
from rto.tasks import get_task, prompts_and_rows

Z95 = 1.959964


def mean_ci95(x: torch.Tensor) -> tuple[float, float]:
    """(mean, half-width of the normal 95% interval) = (x_bar, 1.96 * s / sqrt(n)), s the sample std."""
    x = x.double()
    n = x.numel()
    half = Z95 * float(x.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
    return float(x.mean()), half


def win_rate(scores: torch.Tensor, baseline: torch.Tensor) -> tuple[float, float]:
    """Pairwise win rate against a baseline on the same prompts, ties counting 1/2, with its 95% half-width.

    w_i = 1 if s_i > b_i, 0.5 if s_i == b_i, else 0;  rate = mean(w), interval = 1.96 * std(w) / sqrt(n).
    """
    wins = (scores > baseline).double() + 0.5 * (scores == baseline).double()
    return mean_ci95(wins)


def parse_model(spec: str) -> tuple[str, str]:
    """'label=path' -> (label, path); a bare path is labelled by its folder name. The label names the file
    samples/{label}.jsonl, so it must be a plain name (runtime.check_name): no '/', not '..'."""
    from rto.runtime import check_name

    if "=" in spec:
        label, path = spec.split("=", 1)
        return check_name(label.strip(), "--models label"), path.strip()
    return check_name(Path(spec).name or spec, f"--models label (the folder name of {spec!r})"), spec


@dataclass
class EvalConfig(Common):
    """Fields of `rto eval`: models scored on held-out prompts, every pair of them compared."""

    out: str = "runs/eval"
    models: list[str] = field(default_factory=lambda: [f"sft={DEFAULT_MODEL}"])
    """The models, as "label=path" entries (a bare path is labelled by its folder name); a path is the
    embedded name, a local folder or a hub id."""
    ref: str = DEFAULT_MODEL
    """The reference pi_ref of the KL column (and of the heatmaps' DPO reward)."""
    reward_model: str | None = None
    """A reward model (from `rto rm`): adds the column of its normalised score; null = no column."""
    dpo_model: str | None = None
    """pi_dpo: adds per-token heatmaps of beta_dpo * log(pi_dpo / pi_ref) over heatmap_model's responses."""
    beta_dpo: float | None = None
    """Scale of the heatmaps, the paper's beta1; null = the one the heatmap model was trained with (recorded
    by `rto ppo`), else 0.05; >= 0."""
    baseline: str | None = None
    """Label of the model the table's delta and win-rate columns compare with; null = the first model."""
    headline: list[str] = field(default_factory=lambda: ["rto", "ppo"])
    """The pair of labels [a, b] compared first (a - b), when both are among the models."""
    heatmap_model: str | None = None
    """Label of the model whose responses the heatmaps show; null = the last model."""
    heatmaps: int = 4
    """Heatmaps drawn, one per response to the first prompts; >= 0."""
    task: str = "sentiment"
    """The task (rto.tasks: sentiment, ifeval): its eval prompts and its gold scorer."""
    prompts: str | None = None
    """A prompt file (JSON Lines, Parquet or a datasets folder) instead of the task's eval prompts."""
    num_prompts: int | None = 128
    """Prompts evaluated, a subset drawn with `seed`; null = all; >= 1."""
    max_new_tokens: int = 40
    """Longest response, in tokens: sampling stops at EOS or here; >= 1."""
    temperature: float = 1.0
    """Sampling temperature T; the KL column is taken at T; > 0."""
    top_k: int = 0
    """Sample only from the k most likely tokens; 0 = no cut (pure sampling); >= 0."""
    top_p: float = 1.0
    """Nucleus sampling threshold; 1 = no cut; in (0, 1]."""
    batch_size: int = 64
    """Responses generated at a time; >= 1."""
    score_batch_size: int = 16
    """Responses scored at a time by each model; >= 1."""


def paired_comparisons(gold: dict[str, torch.Tensor], labels: list[str], headline: list[str]) -> list[dict]:
    """Every pair of models on the same prompts: for models a (listed later) and b (listed earlier),
    the paired gold difference mean(a_i - b_i) with its 95% interval and a's win rate over b (ties 1/2).
    The `headline` pair [a, b] comes first, oriented as given, when both labels exist."""
    pairs = [(a, b) for j, a in enumerate(labels) for b in labels[:j]]
    if len(headline) == 2 and all(x in labels for x in headline) and headline[0] != headline[1]:
        a, b = headline
        pairs = [(a, b)] + [p for p in pairs if set(p) != {a, b}]
    rows = []
    for a, b in pairs:
        delta, delta_ci = mean_ci95(gold[a] - gold[b])
        wins, wins_ci = win_rate(gold[a], gold[b])
        rows.append({"a": a, "b": b, "gold_delta": delta, "gold_delta_ci95": delta_ci, "win_rate": wins,
                     "win_rate_ci95": wins_ci, "n": len(gold[a])})
    return rows


def heatmap_beta(cfg: EvalConfig, heat_path: str) -> float:
    """The beta_dpo of the heatmaps: as configured, else as the heatmap model was trained with, else 0.05."""
    if cfg.beta_dpo is not None:
        return cfg.beta_dpo
    return read_meta(heat_path).get("beta_dpo") or 0.05


def method_of(meta: dict) -> str:
    """One line naming how a model was made, from the record its stage wrote (rto_model.json): for PPO the
    reward sources and weights, the dense source's training loss, the granularity and the estimator."""
    stage = meta.get("stage")
    if stage == "ppo":
        sources = meta.get("sources") or {  # records written before sources existed
            **({"dpo": meta["beta_dpo"]} if meta.get("reward") == "rto" and meta.get("beta_dpo") else {}),
            "rm": meta.get("beta_rm", 1.0)}
        reward = " + ".join(f"{w:g}·{name}" for name, w in sources.items())
        group = meta.get("group_size") or 1
        parts = [f"PPO --reward {meta.get('reward')}: {reward} − {meta.get('beta_kl', 0.01):g}·KL"]
        if meta.get("dpo_loss"):
            parts.append(f"dense source trained with {meta['dpo_loss']}")
        parts += [f"granularity {meta.get('granularity', 'token')}",
                  f"estimator {meta.get('estimator', 'gae')}" + (f", {group} per prompt" if group > 1 else ""),
                  f"loss {meta.get('loss_agg', 'token_mean')}"]
        return "; ".join(parts)
    if stage == "dpo":
        return f"offline {meta.get('loss', 'dpo')} (beta {meta.get('beta')})"
    return stage or "as given (no rto record)"


def run(cfg: EvalConfig) -> dict:
    specs = [parse_model(m) for m in cfg.models]
    labels = [label for label, _ in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"model labels must be unique, got {labels}")
    baseline = cfg.baseline or labels[0]
    heat_label = cfg.heatmap_model or labels[-1]
    for name, value in (("baseline", baseline), ("heatmap_model", heat_label)):
        if value not in labels:
            raise ValueError(f"--{name} {value!r} is not one of the model labels {labels}")
    run_, accelerator = start(cfg, "eval")
    if not run_.writer:  # with several processes, process 0 evaluates every model alone; the others wait for it
        run_.finish()
        return {}
    device = accelerator.device
    if warning := off_policy_warning(cfg.top_k, cfg.top_p):
        run_.note(f"eval: {warning}")
    beta_dpo = heatmap_beta(cfg, dict(specs)[heat_label])

    prompts, prompt_rows = prompts_and_rows(cfg.task, cfg.prompts, "eval", cfg.num_prompts, cfg.seed)  # with each prompt's file row
    scorer = get_task(cfg.task).gold_scorer()
    tokenizer = role_tokenizer(run_, cfg, {"reference": cfg.ref, **{f"model {label}": path for label, path in specs},
                                           "reward model": cfg.reward_model, "DPO model": cfg.dpo_model})
    for label, path in specs:
        check_token_budget(cfg, path, f"model {label}", cfg.max_new_tokens)
    kept, prompt_ids = drop_long_prompts(run_, tokenizer, list(zip(prompts, prompt_rows)), cfg, "prompts", lambda x: x[0])
    prompts, prompt_rows = [p for p, _ in kept], [r for _, r in kept]
    ref = load_causal_lm(cfg.ref, cfg.trust_remote_code, role="reference").to(device).eval()
    rm = ValueModel.from_pretrained(cfg.reward_model, cfg.trust_remote_code, role="reward model").to(device).eval() if cfg.reward_model else None
    dpo = load_causal_lm(cfg.dpo_model, cfg.trust_remote_code, role="DPO model").to(device).eval() if cfg.dpo_model else None
    rm_mean, rm_std = (rm.reward_stats() if rm else None) or (0.0, 1.0)
    probe = probe_batch(prompt_ids, tokenizer.pad_token_id).to(device)

    results, heatmaps, samples, by_kind = {}, [], [], {}
    for label, path in specs:
        same_as_ref = resolve_model(path) == resolve_model(cfg.ref)
        model = ref if same_as_ref else load_causal_lm(path, cfg.trust_remote_code, role=f"model {label}").to(device).eval()
        torch.manual_seed(cfg.seed)  # the same sampling noise for every model: paired comparisons
        rollout = generate(model, tokenizer, prompt_ids, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                           top_p=cfg.top_p, top_k=cfg.top_k, batch_size=cfg.batch_size, autocast=accelerator.autocast,
                           desc=f"eval {label}", progress=cfg.progress)
        texts = decode_responses(tokenizer, rollout.response_ids)
        gold = torch.tensor(scorer(texts, prompt_rows), dtype=torch.float64)
        if hasattr(scorer, "by_kind"):  # a task whose gold score is made of parts (ifeval: one per instruction kind)
            by_kind[label] = {kind: {"followed": sum(oks), "asked": len(oks)}
                              for kind, oks in scorer.by_kind(texts, prompt_rows).items()}
        heat_dpo = dpo if label == heat_label else None
        roles = [m for m in (model, ref, rm, heat_dpo) if m is not None]
        scored = score_sequences(
            rollout.batch, ref=ref, policy=None if same_as_ref else model, dpo=heat_dpo, rm=rm,
            n_shared=shared_trunk_layers(roles, cfg.train_layers, probe, run_.note, trains=False),
            temperature=cfg.temperature,
            chunk=cfg.score_batch_size, autocast=accelerator.autocast, device=device,
        )
        scored = {k: v.cpu() for k, v in scored.items()}
        mask = rollout.batch.response_mask
        kl = sequence_kl(scored["logp"], scored["logp_ref"], mask)
        rm_scores = (scored["rm_raw"] - rm_mean) / rm_std if "rm_raw" in scored else None
        results[label] = {"gold": gold, "kl": kl, "rm": rm_scores, "length": rollout.batch.response_lengths.double(),
                          "ended": rollout.ended.double()}
        write_jsonl(run_.dir / "samples" / f"{label}.jsonl", [
            {"prompt": prompts[i][-1]["content"], "response": texts[i], "gold": float(gold[i]), "kl": float(kl[i]),
             "rm": None if rm_scores is None else float(rm_scores[i]), "ended": bool(rollout.ended[i])}
            for i in range(len(texts))])
        samples.append({"model": label, "prompt": prompts[0][-1]["content"], "response": texts[0],
                        "gold": float(gold[0])})
        if "logp_dpo" in scored:
            credit = beta_dpo * (scored["logp_dpo"] - scored["logp_ref_t1"])  # the DPO implicit reward at T = 1
            for i in range(min(cfg.heatmaps, len(texts))):
                ids = rollout.response_ids[i]
                heatmaps.append({
                    "title": f"{label}, prompt {i + 1} (gold {float(gold[i]):.2f})",
                    "prompt": prompts[i][-1]["content"],
                    "tokens": [tokenizer.decode([t]) for t in ids],
                    "values": credit[i, : len(ids)].tolist(),
                    "label": f"{beta_dpo} * log(pi_dpo / pi_ref)",
                })
        run_.note(f"eval {label}: gold {gold.mean():.3f}, KL {kl.mean():.2f}, EOS rate {rollout.ended.float().mean():.2f}")
        if model is not ref:
            del model
            gc.collect()

    base = results[baseline]["gold"]
    table = []
    for label in labels:
        r = results[label]
        gold_mean, gold_ci = mean_ci95(r["gold"])
        kl_mean, kl_ci = mean_ci95(r["kl"])
        kl_tok, kl_tok_ci = mean_ci95(r["kl"] / r["length"])
        row = {"model": label, "gold_mean": gold_mean, "gold_ci95": gold_ci, "kl": kl_mean, "kl_ci95": kl_ci,
               "kl_per_token": kl_tok, "kl_per_token_ci95": kl_tok_ci,
               "rm_mean": None if r["rm"] is None else float(r["rm"].mean()),
               "length": float(r["length"].mean()), "eos_rate": float(r["ended"].mean()), "n": len(r["gold"])}
        if label != baseline:
            row["gold_delta"], row["gold_delta_ci95"] = mean_ci95(r["gold"] - base)
            row["win_rate"], row["win_rate_ci95"] = win_rate(r["gold"], base)
        table.append(row)
    pairwise = paired_comparisons({label: results[label]["gold"] for label in labels}, labels, cfg.headline)
    report = {"table": table, "baseline": baseline, "pairwise": pairwise, "heatmaps": heatmaps, "samples": samples,
              "methods": {label: method_of(read_meta(path)) for label, path in specs},
              **({"by_kind": by_kind} if by_kind else {}),
              "n_prompts": len(prompts), "seed": cfg.seed, "temperature": cfg.temperature,
              "max_new_tokens": cfg.max_new_tokens, "top_k": cfg.top_k, "top_p": cfg.top_p, "task": cfg.task}
    (run_.dir / "eval.json").write_text(json.dumps(report, indent=2))
    from rto.report import format_pairwise_markdown, format_table_markdown

    run_.note(format_table_markdown(table, baseline, legend=False))
    run_.note(format_pairwise_markdown(pairwise))
    run_.finish({"models": labels, "baseline": baseline})
    return report
