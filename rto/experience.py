"""The rollout record that flows through PPO: tokens -> scores -> token rewards -> advantages.

Dense tensors ([B, T], one entry per response token) and per-sequence tensors ([B]) are kept apart
in two records so a shape mistake cannot mix them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from rto.sequences import SeqBatch


@dataclass
class TokenTensors:
    """[B, T]; zero outside `SeqBatch.response_mask`."""

    logp: torch.Tensor  # log pi_old(y_t|s_t) at the sampling temperature
    logp_ref: torch.Tensor  # log pi_ref(y_t|s_t) at the sampling temperature (KL penalty)
    values: torch.Tensor  # V_old(s_t) from the critic (zeros for an estimator without one, see ADVANTAGE_ESTIMATORS)
    logp_dpo: torch.Tensor | None = None  # log pi_dpo(y_t|s_t) at temperature 1 (RTO's dense reward)
    logp_ref_t1: torch.Tensor | None = None  # log pi_ref(y_t|s_t) at temperature 1 (the DPO term's reference)
    entropy: torch.Tensor | None = None  # entropy of the policy's sampling distribution at s_t
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None


@dataclass
class SequenceTensors:
    """[B]; one entry per response."""

    rm_raw: torch.Tensor  # reward-model score as the head outputs it
    rm_score: torch.Tensor  # normalised (r - mu) / sigma, minus the no-EOS penalty where it applies
    ended: torch.Tensor  # bool: the response emitted EOS
    length: torch.Tensor  # response tokens (EOS included)
    gold: torch.Tensor | None = None  # the task's gold score (logged, never used for training)
    group: torch.Tensor | None = None  # int: responses with the same id were sampled from the same prompt


def _select(record, index):
    return replace(record, **{f.name: getattr(record, f.name)[index] for f in fields(record)
                              if getattr(record, f.name) is not None})


def _pick(items: list | None, index: torch.Tensor) -> list | None:
    return None if items is None else [items[i] for i in index.tolist()]


@dataclass
class Experience:
    batch: SeqBatch
    tokens: TokenTensors
    seqs: SequenceTensors
    trunk: torch.Tensor | None = None  # frozen shared hidden states [B, L, H], reused by the update
    texts: list[str] | None = None  # decoded responses (reward sources, logs and reports may read them)
    rows: list[dict] | None = None  # each response's prompt row from the data file (e.g. a task's constraints)

    def __len__(self) -> int:
        return len(self.batch)

    def select(self, index: torch.Tensor) -> "Experience":
        return Experience(
            batch=self.batch.select(index),
            tokens=_select(self.tokens, index),
            seqs=_select(self.seqs, index),
            trunk=None if self.trunk is None else self.trunk[index],
            texts=_pick(self.texts, index),
            rows=_pick(self.rows, index),
        )

    def tight(self) -> "Experience":
        """This record without the columns that are padding in every one of its responses (SeqBatch.tight): the
        batch, the dense tensors (zero there) and the trunk lose them; a minibatch drawn from the rollout then
        runs at its own rows' widths, with every masked sum and mean unchanged."""
        batch, keep = self.batch.tight()
        tokens = _select(self.tokens, (slice(None), slice(0, batch.response_mask.shape[1])))
        trunk = None if self.trunk is None else self.trunk[:, keep]
        return Experience(batch=batch, tokens=tokens, seqs=self.seqs, trunk=trunk, texts=self.texts, rows=self.rows)

    def split(self, size: int):
        """Consecutive pieces of at most `size` sequences (micro-batches of a minibatch)."""
        for start in range(0, len(self), size):
            yield self.select(torch.arange(start, min(start + size, len(self))))

    def minibatches(self, size: int, generator: torch.Generator):
        """A random partition of the rollout into minibatches of `size` sequences."""
        perm = torch.randperm(len(self), generator=generator)
        for start in range(0, len(self), size):
            yield self.select(perm[start : start + size])
