"""rto.checkpoint on a small module: round trip of weights, optimizer, scheduler and RNG; rotation; refusals."""

import random

import numpy as np
import pytest
import torch

from rto.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint


def setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    model[0].requires_grad_(False)  # frozen: not saved
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    return model, opt, sched


def train_step(model, opt, sched):
    loss = model(torch.randn(8, 4)).pow(2).mean()
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def test_round_trip_continues_exactly(tmp_path):
    model, opt, sched = setup()
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        train_step(model, opt, sched)
    path = save_checkpoint(tmp_path, 3, {"m": model}, {"opt": opt, "sched": sched}, {"step": 3, "note": [1.5]},
                           generators={"g": gen})
    assert path == latest_checkpoint(tmp_path) and path.name == "step-00000003"
    train_step(model, opt, sched)
    expected = ([p.detach().clone() for p in model.parameters()], random.random(), np.random.rand(),
                torch.rand(1, generator=gen))

    model2, opt2, sched2 = setup()
    gen2 = torch.Generator()
    random.random(), np.random.rand(), torch.rand(3)  # move every RNG away from the saved state
    state = load_checkpoint(path, {"m": model2}, {"opt": opt2, "sched": sched2}, generators={"g": gen2})
    assert state == {"step": 3, "note": [1.5]}
    assert sched2.last_epoch == 3
    train_step(model2, opt2, sched2)
    for a, b in zip(expected[0], model2.parameters()):
        assert a.equal(b)
    assert (random.random(), np.random.rand(), torch.rand(1, generator=gen2)) == expected[1:]


def test_keep_last_k(tmp_path):
    model, opt, sched = setup()
    for step in (2, 4, 6, 8):
        save_checkpoint(tmp_path, step, {"m": model}, {"opt": opt}, {"step": step}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000006", "step-00000008"]


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    import rto.checkpoint as ckpt

    model, opt, sched = setup()
    good = save_checkpoint(tmp_path, 1, {"m": model}, {"opt": opt}, {"step": 1})
    train_step(model, opt, sched)

    def full_disk(obj, path, *a, **k):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device.*step-00000001 is kept"):
        save_checkpoint(tmp_path, 2, {"m": model}, {"opt": opt}, {"step": 2})
    monkeypatch.undo()
    assert list_checkpoints(tmp_path) == [good]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [good.name]  # no temporary folder left
    model2, opt2, _ = setup(seed=1)
    assert load_checkpoint(good, {"m": model2}, {"opt": opt2}) == {"step": 1}


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    model, opt, _ = setup()
    with torch.no_grad():
        model[1].bias.fill_(float("nan"))
    with pytest.raises(CheckpointError, match="NaN/inf in m/1.bias"):
        save_checkpoint(tmp_path, 1, {"m": model}, {"opt": opt}, {})
    assert latest_checkpoint(tmp_path) is None


def test_a_checkpoint_of_other_trainable_parameters_is_refused(tmp_path):
    model, opt, _ = setup()
    path = save_checkpoint(tmp_path, 1, {"m": model}, {"opt": opt}, {})
    other, opt2, _ = setup()
    other[0].requires_grad_(True)
    with pytest.raises(CheckpointError, match="does not match the models"):
        load_checkpoint(path, {"m": other}, {"opt": opt2})


def test_a_damaged_checkpoint_names_the_way_out(tmp_path):
    model, opt, _ = setup()
    path = save_checkpoint(tmp_path, 1, {"m": model}, {"opt": opt}, {})
    (path / "trainer.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="--resume false"):
        load_checkpoint(path, {"m": model}, {"opt": opt})


class Payload:
    """Any object that is not plain data: unpickling it would run code of the pickle's choosing."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, capsys):
    model, opt, _ = setup()
    path = save_checkpoint(tmp_path, 1, {"m": model}, {"opt": opt}, {})
    torch.save({"stateful": {}, "rng": {}, "state": Payload()}, path / "trainer.pt")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(path, {"m": model}, {"opt": opt})
    assert "this must never run" not in capsys.readouterr().out


def test_remote_code_is_off_by_default_in_every_stage():
    import dataclasses

    from rto.cli import COMMANDS

    configs = [cls for cls, _, _ in COMMANDS.values()]
    with_field = [cls for cls in configs if "trust_remote_code" in {f.name for f in dataclasses.fields(cls)}]
    assert len(with_field) >= 6  # pairs, sft, rm, dpo, ppo, eval
    assert all(cls.__dataclass_fields__["trust_remote_code"].default is False for cls in with_field)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CUDA RNG states are checkpointed)")
def test_cuda_model_and_rng_round_trip(tmp_path):
    model, opt, sched = setup()
    model.cuda()
    path = save_checkpoint(tmp_path, 1, {"m": model}, {"opt": opt}, {})
    expected = torch.rand(3, device="cuda")
    torch.rand(5, device="cuda")
    load_checkpoint(path, {"m": model}, {"opt": opt})
    assert torch.rand(3, device="cuda").equal(expected)
