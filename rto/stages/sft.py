"""`rto sft` (optional): supervised fine-tuning on the chosen responses of a preference file.

The embedded default is already instruction-tuned, so the demo starts from it directly; this stage
is for users whose start model is not, or who want to fit it to their own preferred answers first.
"""

from __future__ import annotations

from dataclasses import dataclass

from rto.distributed import gathered, shard_trained
from rto.models import DEFAULT_MODEL, load_causal_lm, load_tokenizer, save_model, set_trainable
from rto.rollout import encode_prompts
from rto.sequences import nll_loss, probe_batch, shared_trunk
from rto.stages.common import (PairTraining, fit, load_pair_split, param_groups, response_batch, score_in_batches,
                               shared_trunk_layers, start)


@dataclass
class SFTConfig(PairTraining):
    """Fields of `rto sft`: supervised fine-tuning on the chosen responses of a preference file."""

    out: str = "runs/sft"
    model: str = DEFAULT_MODEL
    """The model to fine-tune: the embedded name, a local folder or a hub id."""
    data: str = "runs/pairs/pairs.jsonl"
    """Preference file (JSON Lines, Parquet or a datasets folder); trains on prompt -> chosen response."""
    lr: float = 2e-5


def run(cfg: SFTConfig) -> dict:
    run_, accelerator = start(cfg, "sft")
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code, role="model")
    train, heldout = load_pair_split(cfg.data, cfg, run_, tokenizer)
    model = load_causal_lm(cfg.model, cfg.trust_remote_code, role="model").to(accelerator.device)
    set_trainable(model, cfg.train_layers)
    probe = probe_batch(encode_prompts(tokenizer, [p.prompt for p in train[:2]], cfg.system_prompt),
                        tokenizer.pad_token_id)
    n_frozen = shared_trunk_layers([model], cfg.train_layers, probe, run_.note)
    shard_trained(model, "model", run_.note)  # FSDP launches: trained layers split over the processes

    def tokens(items):
        return response_batch(tokenizer, [p.prompt for p in items], [(p.chosen, p.chosen_ended) for p in items],
                              cfg.system_prompt, cfg.max_response_tokens)

    def nll(items):
        """The mean NLL of the items' response tokens, and how many tokens it averages."""
        batch = tokens(items).to(accelerator.device)
        return nll_loss(model, batch, shared_trunk(model, batch, n_frozen), n_frozen), int(batch.response_mask.sum())

    def loss(epoch, items):  # a token mean: with several processes each share weighs by its tokens (fit)
        value, tokens = nll(items)
        return value, {}, tokens

    steps = fit(run_, accelerator, model, param_groups(model, cfg.lr), train, cfg, loss, "sft",
                units_fn=lambda items: int(tokens(items).response_mask.sum()))
    summary = {"steps": steps, "train_rows": len(train)}
    if heldout:
        with gathered(model), accelerator.autocast():
            losses = score_in_batches(lambda it: nll(it)[0].reshape(1), heldout, cfg.batch_size)
        summary["heldout_nll"] = float(losses.mean())
    save_model(model, tokenizer, run_.dir / "model")
    run_.note(f"sft: {steps} steps; held-out nll {summary.get('heldout_nll', float('nan')):.3f} -> {run_.dir / 'model'}")
    run_.finish(summary)
    return summary
