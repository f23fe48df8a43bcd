"""Generation: chat prompts -> token ids -> sampled responses, cut after the first EOS."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from rto.sequences import (SeqBatch, collate, critic_values, cut_at_eos, sequence_scores, shared_trunk,
                           token_logprobs, token_values)


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """Prepend `system_prompt` unless the conversation has one (None keeps the template's default)."""
    if system_prompt is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def encode_prompts(tokenizer, prompts: list[list[dict]], system_prompt: str | None = None) -> list[list[int]]:
    """Apply the tokenizer's chat template (with the assistant turn opened) and tokenize."""
    texts = [
        tokenizer.apply_chat_template(with_system_prompt(m, system_prompt), tokenize=False, add_generation_prompt=True)
        for m in prompts
    ]
    return [tokenizer(t, add_special_tokens=False).input_ids for t in texts]


def encode_response(tokenizer, text: str, ended: bool) -> list[int]:
    """Response text -> ids, with the EOS token appended when the response ended on its own."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return ids + [tokenizer.eos_token_id] if ended or not ids else ids


def eos_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    return ids


@dataclass
class Rollout:
    batch: SeqBatch
    ended: torch.Tensor  # [B] bool: the response emitted EOS within the budget
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, greedy: bool = False, batch_size: int = 32, autocast=None,
             desc: str = "generate", progress: bool = True) -> Rollout:
    """Sample one response per prompt (pure sampling by default: no top-k, top-p 1), batched.

    Prompts are sorted by length so each generation batch wastes little padding; the results come back
    in the input order.
    """
    device = next(model.parameters()).device
    eos = eos_ids(model, tokenizer)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=not greedy, temperature=None if greedy else temperature,
        top_k=None, top_p=None if greedy else top_p, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=sorted(eos), bos_token_id=None,
    )
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    responses: list[list[int] | None] = [None] * len(prompt_ids)
    ended = torch.zeros(len(prompt_ids), dtype=torch.bool)
    bar = tqdm(total=len(prompt_ids), desc=desc, unit="seq", disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer.pad({"input_ids": [prompt_ids[i] for i in idx]}, return_tensors="pt", padding_side="left")
        with autocast() if autocast is not None else torch.autocast("cpu", enabled=False):
            out = model.generate(
                input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                generation_config=config,
            )
        for row, i in enumerate(idx):
            tokens, ended[i] = cut_at_eos(out[row, enc["input_ids"].shape[1] :].tolist(), eos)
            responses[i] = tokens or [tokenizer.eos_token_id]
        bar.update(len(idx))
    bar.close()
    model.train(was_training)
    batch = collate(prompt_ids, responses, tokenizer.pad_token_id)
    return Rollout(batch=batch, ended=ended, prompt_ids=prompt_ids, response_ids=responses)


def decode_responses(tokenizer, response_ids: list[list[int]]) -> list[str]:
    return tokenizer.batch_decode(response_ids, skip_special_tokens=True)


@torch.no_grad()
def score_sequences(batch: SeqBatch, *, ref, policy=None, dpo=None, critic=None, rm=None, n_shared: int = 0,
                    temperature: float = 1.0, chunk: int = 16, autocast=None, device=None,
                    keep_trunk: bool = False) -> dict[str, torch.Tensor]:
    """Every given model reads the sampled tokens once, `chunk` sequences at a time, on one shared trunk.

    Returns, on `device`: logp_ref and logp ([B, T], at `temperature`; logp is logp_ref when policy is None),
    logp_dpo ([B, T]) when dpo is given, values ([B, T], the critic's V(s_t)) when critic is given, rm_raw
    ([B], pooled as the reward model was trained) when rm is given, and trunk when keep_trunk.
    """
    cols: dict[str, list] = {}
    for start in range(0, len(batch), chunk):
        b = batch.select(slice(start, start + chunk)).to(device or batch.input_ids.device)
        with autocast() if autocast is not None else torch.autocast("cpu", enabled=False):
            trunk = shared_trunk(ref, b, n_shared)
            logp_ref = token_logprobs(ref, b, trunk, n_shared, temperature)
            out = {"logp_ref": logp_ref,
                   "logp": logp_ref if policy is None else token_logprobs(policy, b, trunk, n_shared, temperature)}
            if dpo is not None:
                out["logp_dpo"] = token_logprobs(dpo, b, trunk, n_shared, temperature)
            if critic is not None:
                out["values"] = critic_values(token_values(critic, b, trunk, n_shared), b)
            if rm is not None:
                out["rm_raw"] = sequence_scores(token_values(rm, b, trunk, n_shared), b, rm.meta.get("pooling", "last"))
            if keep_trunk and trunk is not None:
                out["trunk"] = trunk
        for k, v in out.items():
            cols.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in cols.items()}
