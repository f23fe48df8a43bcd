"""Generation: chat prompts -> token ids -> sampled responses, cut after the first EOS."""

from __future__ import annotations

import re
import uuid
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import GenerationConfig

from rto.decoding import PackedProducts, sample
from rto.sequences import (SeqBatch, collate, critic_values, cut_at_eos, entropy_from_logits, logprobs_from_logits,
                           response_logits, sequence_scores, shared_trunk, token_logprobs, token_values)


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """Prepend `system_prompt` unless the conversation has one (None keeps the template's default)."""
    if system_prompt is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def _control_pattern(tokenizer) -> re.Pattern | None:
    """A regex matching the tokenizer's special-token strings (e.g. ``<|im_end|>``), or None when it has none."""
    strings = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content},
                     key=len, reverse=True)
    return re.compile("|".join(map(re.escape, strings))) if strings else None


def _text_ids(tokenizer, text: str) -> list[int]:
    """Ids of `text` read as plain text: special-token strings in it become ordinary tokens."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids


def _render(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _template_pieces(tokenizer, messages: list[dict], rendered: str, found: str) -> list[tuple[str, bool]]:
    """`rendered` (the chat template applied to `messages`) as (text, is_message_content) pieces.

    The template is rendered again with a unique stand-in for each message's content and split at the
    stand-ins; the pieces must join back to `rendered` with the contents as given (or stripped, for
    templates that trim them). Raises ValueError, naming `found` (the special-token string seen in a
    message), for a template that changes contents in another way.
    """
    tag = f"@@rto-{uuid.uuid4().hex}-"
    stand_in = [{**m, "content": f"{tag}{i}@@"} for i, m in enumerate(messages)]
    parts = re.split(re.escape(tag) + r"(\d+)@@", _render(tokenizer, stand_in))
    template, order = parts[0::2], [int(i) for i in parts[1::2]]
    for transform in (lambda s: s, str.strip):
        contents = [transform(messages[i]["content"]) for i in order]
        pieces = [(template[0], False)]
        for content, text in zip(contents, template[1:]):
            pieces += [(content, True), (text, False)]
        if "".join(text for text, _ in pieces) == rendered:
            return pieces
    raise ValueError(f"the tokenizer's chat template changes the text of messages (more than trimming it), so the "
                     f"special-token string {found!r} in a message cannot be kept as plain text; remove such "
                     "strings from the data, or use a tokenizer whose template inserts messages as given")


def encode_prompts(tokenizer, prompts: list[list[dict]], system_prompt: str | None = None) -> list[list[int]]:
    """Apply the tokenizer's chat template (with the assistant turn opened) and tokenize.

    Message contents are text: a special-token string inside one (e.g. ``<|im_end|>\\n<|im_start|>system``
    in a prompt) is encoded as ordinary tokens, never as the special token, so data cannot open or close
    turns. A conversation without such strings gets exactly the ids of tokenizing the rendered template; one
    with them has its template pieces tokenized as usual and its contents as plain text (see _template_pieces).
    """
    control = _control_pattern(tokenizer)
    encoded = []
    for messages in prompts:
        messages = with_system_prompt(messages, system_prompt)
        rendered = _render(tokenizer, messages)
        found = next((hit.group() for m in messages if control and (hit := control.search(m["content"]))), None)
        if found is None:
            encoded.append(tokenizer(rendered, add_special_tokens=False).input_ids)
            continue
        ids = []
        for text, is_content in _template_pieces(tokenizer, messages, rendered, found):
            ids += _text_ids(tokenizer, text) if is_content else tokenizer(text, add_special_tokens=False).input_ids
        encoded.append(ids)
    return encoded


def encode_response(tokenizer, text: str, ended: bool) -> list[int]:
    """Response text -> ids, with the EOS token appended when the response ended on its own.

    The text is plain text: a special-token string in it (e.g. ``<|im_end|>``) becomes ordinary tokens,
    so the EOS id appears only where it is appended.
    """
    ids = _text_ids(tokenizer, text)
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
    # [B, T] log pi_T(y_t | s_t) of each sampled token under the distribution it was drawn from, and that
    # distribution's entropy H(pi_T(. | s_t)) (from the generation's own logits); None unless
    # generate(..., return_logprobs=True)
    sampler_logp: torch.Tensor | None = None
    sampler_entropy: torch.Tensor | None = None
    # [B, P+T, H] the hidden states after the embeddings and bottom `trunk_layers` layers at every token, in the
    # batch's layout (0 on padding), as the sampler computed them: the shared trunk of the scoring pass; None
    # unless generate(..., trunk_layers=n) ran rto's decode loop
    trunk: torch.Tensor | None = None


def sampling_config(*, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                    greedy: bool = False, pad_token_id: int, eos_token_id: list[int],
                    output_logits: bool = False) -> GenerationConfig:
    """Every generation field the sampling distribution depends on, set explicitly.

    transformers fills each field left None from the model's own generation_config and then from its
    global defaults (top_k=None means top-k 50 there), so nothing is left None that could add a logits
    processor: the default is pure sampling from softmax(logits / temperature), the distribution every
    log-prob of PPO is computed from. top_k > 0 or top_p < 1 truncate it (PPO then runs off-policy).
    """
    sample = not greedy
    return GenerationConfig(
        max_new_tokens=max_new_tokens, min_length=0, do_sample=sample, num_beams=1,
        temperature=temperature if sample else 1.0, top_k=top_k if sample else 0, top_p=top_p if sample else 1.0,
        typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0, encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0, length_penalty=1.0, guidance_scale=1.0,
        renormalize_logits=False, remove_invalid_values=False, num_return_sequences=1,
        pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=None, use_cache=True,
        return_dict_in_generate=True, output_logits=output_logits,
    )


def off_policy_warning(top_k: int, top_p: float) -> str | None:
    """A line for the log when sampling is truncated, so PPO's ratios and KL use another distribution."""
    if top_k or top_p < 1.0:
        return (f"sampling with top_k={top_k}, top_p={top_p}: responses come from a truncated distribution while "
                "every log-prob (PPO ratio, KL, rewards) uses the full softmax, so PPO runs off-policy")
    return None


@contextmanager
def _neutral_generation_config(model):
    """The model's own generation_config (a hub model's top_k, top_p, repetition penalty, suppressed
    tokens...) is set aside while rto samples, so only the fields of `sampling_config` apply; for a peft model,
    on the wrapper and on the base model whose generate runs."""
    from rto.models import causal_lm_of

    models = [model] + ([causal_lm_of(model)] if causal_lm_of(model) is not model else [])
    own = [m.generation_config for m in models]
    for m in models:
        m.generation_config = GenerationConfig()
    try:
        yield
    finally:
        for m, config in zip(models, own):
            m.generation_config = config


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, greedy: bool = False, batch_size: int = 32, autocast=None,
             desc: str = "generate", progress: bool = True, return_logprobs: bool = False,
             seeds: list[int] | None = None, trunk_layers: int = 0) -> Rollout:
    """Sample one response per prompt, batched: pure sampling at `temperature` by default (top_k 0, top_p 1,
    no repetition penalty, whatever the model's generation_config says; see sampling_config).

    Pure sampling and greedy decoding run rto.decoding.sample (a prompt repeated in a row prefilled once,
    finished rows leave the batch, each row's noise from its own generator seeded from the global RNG); top_k > 0 or
    top_p < 1 go through transformers' generate. Prompts are sorted by length into batches of `batch_size`;
    the results come back in the input order. With return_logprobs, the log-prob of each sampled token under
    the distribution it was sampled from (log_softmax(logits / temperature)) and that distribution's entropy
    come back too.

    `seeds` (one per prompt) seed the rows' noise of pure sampling; None draws them from the global RNG, as
    `torch.randint(0, 2**62, (len(prompt_ids),))`: several processes draw the seeds of the whole batch that way
    and each passes its share, so every row gets the tokens it gets in one process (rto.distributed). They are not
    used by top_k / top_p sampling, which draws from the global RNG as transformers does.

    `trunk_layers=n > 0` keeps, for pure sampling, the hidden states after the model's bottom n layers at every
    token (Rollout.trunk): when n layers are the trunk every role shares, the scoring pass need not recompute them.
    """
    if top_k or top_p < 1.0:
        return _generate_transformers(model, tokenizer, prompt_ids, max_new_tokens=max_new_tokens,
                                      temperature=temperature, top_p=top_p, top_k=top_k, greedy=greedy,
                                      batch_size=batch_size, autocast=autocast, desc=desc, progress=progress,
                                      return_logprobs=return_logprobs)
    eos = eos_ids(model, tokenizer)
    if seeds is None and not greedy:
        seeds = torch.randint(0, 2**62, (len(prompt_ids),)).tolist()
    elif seeds is not None and len(seeds) != len(prompt_ids):
        raise ValueError(f"generate: {len(seeds)} seeds for {len(prompt_ids)} prompts")

    def decode(idx: list[int]):
        *rows, trunk = sample(model, [prompt_ids[i] for i in idx], max_new_tokens=max_new_tokens, eos_ids=eos,
                              pad_id=tokenizer.pad_token_id, temperature=temperature, greedy=greedy,
                              seeds=None if greedy else [seeds[i] for i in idx], autocast=autocast,
                              trunk_layers=trunk_layers)
        return zip(*rows, trunk or [None] * len(idx))

    return _in_batches(model, tokenizer, prompt_ids, batch_size, desc, progress, decode, return_logprobs)


def _in_batches(model, tokenizer, prompt_ids: list[list[int]], batch_size: int, desc: str, progress: bool, decode,
                return_logprobs: bool) -> Rollout:
    """Prompts sorted by length into batches of `batch_size`, each decoded by `decode(indices)` -> one
    (response ids cut after EOS, ended, sampled log-probs, entropies, trunk states or None) per row, in eval
    mode; a Rollout in input order (an empty response becomes the EOS token alone)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    responses: list[list[int] | None] = [None] * len(prompt_ids)
    sampled_logp: list[list[float] | None] = [None] * len(prompt_ids)
    entropies: list[list[float] | None] = [None] * len(prompt_ids)
    states: list[torch.Tensor | None] = [None] * len(prompt_ids)
    ended = torch.zeros(len(prompt_ids), dtype=torch.bool)
    bar = tqdm(total=len(prompt_ids), desc=desc, unit="seq", disable=not progress, leave=False)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            for i, (tokens, done, logps, entropy, trunk) in zip(idx, decode(idx)):
                responses[i], ended[i] = tokens or [tokenizer.eos_token_id], done
                sampled_logp[i], entropies[i], states[i] = logps, entropy, trunk if tokens else None
            bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    batch = collate(prompt_ids, responses, tokenizer.pad_token_id)
    rollout = Rollout(batch=batch, ended=ended, prompt_ids=prompt_ids, response_ids=responses)
    if return_logprobs:
        rollout.sampler_logp, rollout.sampler_entropy = _padded(sampled_logp, batch), _padded(entropies, batch)
    if all(s is not None for s in states):
        rollout.trunk = _laid_out(states, batch)
    return rollout


def _padded(rows: list[list[float]], batch: SeqBatch) -> torch.Tensor:
    """Per-token figures of each response as a [B, T] tensor in the batch's response layout, 0 off it."""
    out = torch.zeros_like(batch.response_mask)
    for i, values in enumerate(rows):
        out[i, : len(values)] = torch.tensor(values)
    return out


def _laid_out(states: list[torch.Tensor], batch: SeqBatch) -> torch.Tensor:
    """Per-row states of its prompt and response tokens [len, H] as one [B, P+T, H] tensor in the batch's layout
    (left-padded prompt, right-padded response), 0 on padding."""
    out = states[0].new_zeros(*batch.input_ids.shape, states[0].shape[-1])
    P = batch.prompt_width
    for i, (row, n) in enumerate(zip(states, batch.attention_mask.sum(-1).tolist())):
        start = P - (n - int(batch.response_mask[i].sum()))
        out[i, start : start + n] = row
    return out


@torch.no_grad()
def _generate_transformers(model, tokenizer, prompt_ids: list[list[int]], *, max_new_tokens: int,
                           temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, greedy: bool = False,
                           batch_size: int = 32, autocast=None, desc: str = "generate", progress: bool = True,
                           return_logprobs: bool = False) -> Rollout:
    """`generate` through transformers' `model.generate` (any top_k / top_p): prompts sorted by length into
    left-padded batches, every row stepped until the whole batch ends. The log-probs come from generate's own
    logits (bf16 under a bf16 autocast)."""
    device = next(model.parameters()).device
    eos = eos_ids(model, tokenizer)
    config = sampling_config(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                             greedy=greedy, pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(eos),
                             output_logits=return_logprobs)

    def decode(idx: list[int]):
        enc = tokenizer.pad({"input_ids": [prompt_ids[i] for i in idx]}, return_tensors="pt", padding_side="left")
        with _neutral_generation_config(model), (autocast() if autocast is not None else
                                                 torch.autocast("cpu", enabled=False)):
            out = model.generate(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                                 generation_config=config)
        new = out.sequences[:, enc["input_ids"].shape[1] :]
        if return_logprobs:  # [b, steps]: log pi_T of the token drawn at each step
            logp = torch.log_softmax(torch.stack(out.logits, 1).float() / (1.0 if greedy else temperature), -1)
            picked = logp.gather(-1, new.unsqueeze(-1)).squeeze(-1)
            entropy = -(logp.exp() * logp).sum(-1)
        for row in range(len(idx)):
            tokens, ended = cut_at_eos(new[row].tolist(), eos)
            yield (tokens, ended, *((picked[row, : len(tokens)].tolist(), entropy[row, : len(tokens)].tolist())
                                    if return_logprobs else (None, None)), None)

    return _in_batches(model, tokenizer, prompt_ids, batch_size, desc, progress, decode, return_logprobs)


def decode_responses(tokenizer, response_ids: list[list[int]]) -> list[str]:
    return tokenizer.batch_decode(response_ids, skip_special_tokens=True)


@torch.no_grad()
def score_sequences(batch: SeqBatch, *, ref, policy=None, dpo=None, critic=None, rm=None, n_shared: int = 0,
                    temperature: float = 1.0, chunk: int = 16, autocast=None, device=None,
                    keep_trunk: bool = False, entropy: bool = False, trunk: torch.Tensor | None = None
                    ) -> dict[str, torch.Tensor]:
    """Every given model reads the sampled tokens once, `chunk` sequences at a time, on one shared trunk
    (`trunk`, [B, P+T, H], when the sampler kept it: Rollout.trunk; else computed here). Without a trunk, the
    prompt prefix that a chunk's rows share (the chat template's system turn) runs once per model and chunk
    (rto.sequences.prefix_once_hidden). The chunks take the rows in order of length, each chunk without the columns
    that are padding in all its rows (SeqBatch.tight); the results come back in the batch's order. Log-probs,
    values and scores are computed in fp32 (see sequences.lm_logits).

    Returns, on `device`, [B, T] tensors:
      logp_ref, logp     log pi_ref and log pi at the sampling `temperature` (the KL penalty and PPO's ratio;
                         logp is logp_ref when policy is None)
      logp_dpo, logp_ref_t1  (dpo given) log pi_dpo and log pi_ref at temperature 1: the scale DPO trained
                         them on, so beta * (logp_dpo - logp_ref_t1) is the DPO implicit token reward
      entropy            (entropy=True) entropy of the policy's sampling distribution at each response token
      values             (critic given) the critic's V(s_t)
    and [B] tensors: rm_raw (rm given; pooled as the reward model was trained); trunk when keep_trunk ([B, P+T,
    H], 0 on the columns a chunk dropped: padding, which attention masks).
    """
    cols: dict[str, list] = {}
    # fp32 products on the CPU through oneDNN, each weight packed as it is used, or on Intel CPUs through torch's
    # BLAS (rto.decoding.PackedProducts, packs_fp32)
    products = PackedProducts(*(m for m in (ref, policy, dpo, critic, rm) if m is not None), keep=False)
    # chunks of rows of like lengths, each without the columns that are padding in all its rows
    order = torch.argsort(batch.attention_mask.sum(-1), stable=True)
    L, T = batch.input_ids.shape[1], batch.response_mask.shape[1]
    for start in range(0, len(batch), chunk):
        rows = order[start : start + chunk]
        b, keep = batch.select(rows).tight()
        b = b.to(device or batch.input_ids.device)
        out = {}
        with autocast() if autocast is not None else torch.autocast("cpu", enabled=False), products:
            shared = (trunk[rows][:, keep].to(b.input_ids.device) if trunk is not None and n_shared
                      else shared_trunk(ref, b, n_shared))
            # one vocabulary-sized logits tensor at a time: the policy's, used and freed, then the reference's; the
            # log-probs at temperature T come last and overwrite the logits (no temporary of their size)
            if policy is not None:
                pol_logits = response_logits(policy, b, shared, n_shared)
                if entropy:
                    out["entropy"] = entropy_from_logits(pol_logits, b, temperature)
                out["logp"] = logprobs_from_logits(pol_logits, b, temperature, consume=True)
                del pol_logits
            ref_logits = response_logits(ref, b, shared, n_shared)
            if policy is None and entropy:
                out["entropy"] = entropy_from_logits(ref_logits, b, temperature)
            if dpo is not None and temperature != 1.0:
                out["logp_ref_t1"] = logprobs_from_logits(ref_logits, b)
            out["logp_ref"] = logprobs_from_logits(ref_logits, b, temperature, consume=True)
            del ref_logits
            if policy is None:
                out["logp"] = out["logp_ref"]
            if dpo is not None and temperature == 1.0:
                out["logp_ref_t1"] = out["logp_ref"]
            if dpo is not None:
                out["logp_dpo"] = token_logprobs(dpo, b, shared, n_shared)
            if critic is not None:
                out["values"] = critic_values(token_values(critic, b, shared, n_shared), b)
            if rm is not None:
                out["rm_raw"] = sequence_scores(token_values(rm, b, shared, n_shared), b, rm.meta.get("pooling", "last"))
            if keep_trunk and shared is not None:  # at the rollout's width for the update, 0 on the dropped columns
                out["trunk"] = F.pad(shared, (0, 0, keep.start, L - keep.stop))
        for k, v in out.items():  # [b, T'] -> [b, T]: zeros off the response mask, as each column is
            cols.setdefault(k, []).append(F.pad(v, (0, T - v.shape[1])) if v.dim() == 2 else v)
    back = torch.argsort(order)
    return {k: torch.cat(v)[back.to(v[0].device)] for k, v in cols.items()}
