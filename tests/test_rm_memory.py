"""The reward model's statistics pass streams: running float64 sums, one batch's activations at a time."""

from __future__ import annotations

import json
import weakref

import torch

from rto.stages import rm


def test_streamed_statistics_equal_the_two_pass_ones():
    gen = torch.Generator().manual_seed(0)
    # float32 scores far from 0, where a naive sum of squares in float32 would lose most digits of the variance
    batches = [(1e4 + torch.randn(n, generator=gen), 1e4 + torch.randn(n, generator=gen) - 0.5)
               for n in [64] * 40 + [7]]
    stats = rm.reward_statistics(iter(batches))
    everything = torch.cat([torch.cat([c, r]) for c, r in batches]).double()
    assert abs(stats["reward_mean"] - float(everything.mean())) <= 1e-9 * abs(float(everything.mean()))
    assert abs(stats["reward_std"] - float(everything.std())) <= 1e-6 * float(everything.std())
    wins = sum(int((c > r).sum()) for c, r in batches) / sum(len(c) for c, _ in batches)
    assert stats["train_accuracy"] == wins
    assert rm.reward_statistics([(torch.tensor([1.0]), torch.tensor([1.0]))])["reward_std"] == 1e-6  # floor


def test_the_stage_keeps_no_activations_of_the_epoch_and_stores_the_two_pass_statistics(tmp_path, tiny_model,
                                                                                          monkeypatch):
    pairs = tmp_path / "pairs.jsonl"
    with open(pairs, "w") as f:
        for i in range(2048):
            f.write(json.dumps({"prompt": f"note {i}", "chosen": "good " * (1 + i % 3),
                                "rejected": "bad " * (1 + i % 2)}) + "\n")
    alive: list[weakref.ref] = []
    most_alive = [0]
    shared_trunk = rm.shared_trunk

    def counted_trunk(model, batch, n_frozen):
        """The frozen trunk's hidden states, counting how many of those computed so far are still held."""
        trunk = shared_trunk(model, batch, n_frozen)
        alive.append(weakref.ref(trunk))
        most_alive[0] = max(most_alive[0], sum(ref() is not None for ref in alive))
        return trunk

    seen: list[torch.Tensor] = []
    sequence_scores = rm.sequence_scores

    def recorded_scores(*args):
        """The scores, with a copy of those of the statistics pass (the only one without gradients here)."""
        scores = sequence_scores(*args)
        if not torch.is_grad_enabled():
            seen.append(scores.detach().clone())
        return scores

    monkeypatch.setattr(rm, "shared_trunk", counted_trunk)
    monkeypatch.setattr(rm, "sequence_scores", recorded_scores)
    summary = rm.run(rm.RMConfig(out=str(tmp_path / "rm"), model=tiny_model, pairs=str(pairs), epochs=1,
                                 batch_size=64, eval_fraction=0.0, train_layers=2, precision="fp32",
                                 checkpoint_every=0, progress=False, lr=1e-3, head_lr=1e-2))

    # the old pass kept every batch of the final epoch (32 trunks); streaming holds at most the batch in flight and
    # the one whose loss is still referenced
    assert most_alive[0] <= 2, most_alive[0]
    assert all(ref() is None for ref in alive)
    steps = 2048 // 64
    assert len(alive) == 2 * steps  # the trunk was shared (2 frozen layers): computed once in training, once after

    scores = torch.cat(seen).double()  # chosen and rejected halves of each batch: every training response once
    assert scores.numel() == 2 * 2048 and float(scores.std()) > 0
    assert abs(summary["reward_mean"] - float(scores.mean())) <= 1e-6 * max(abs(float(scores.mean())), 1e-12)
    assert abs(summary["reward_std"] - float(scores.std())) <= 1e-6 * float(scores.std())
    meta = json.loads((tmp_path / "rm" / "model" / "rto_model.json").read_text())
    assert meta["reward_mean"] == summary["reward_mean"] and meta["reward_std"] == summary["reward_std"]
