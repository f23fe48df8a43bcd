"""Never lose a run: SIGKILL mid-training then resume gives the weights of an uninterrupted run (bitwise),
a save that fails half-way keeps the previous checkpoint, and run folders are never silently replaced.

Every stage here runs on a tiny random model; the killed runs are real subprocesses killed with SIGKILL.
"""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rto.checkpoint import list_checkpoints
from rto.cli import main
from rto.runtime import read_metrics

from .conftest import make_tiny_model

KILLER = Path(__file__).with_name("kill_at_step.py")
WORDS = "tea cake rain sun book film song road cat dog lamp bread".split()


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_model):
    """A small preference file, a reward model folder and a second tiny model (the DPO model of RTO)."""
    from rto.models import ValueModel, load_tokenizer, save_model

    root = tmp_path_factory.mktemp("resume")
    rng = random.Random(0)
    rows = [{"prompt": f"Write about {rng.choice(WORDS)} and {rng.choice(WORDS)}.",
             "chosen": " ".join(rng.choices(WORDS, k=rng.randint(2, 8))) + " great",
             "rejected": " ".join(rng.choices(WORDS, k=rng.randint(2, 8))) + " awful"} for _ in range(26)]
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rm = save_model(ValueModel.from_pretrained(tiny_model), load_tokenizer(tiny_model), root / "rm")
    dpo = make_tiny_model(root / "dpo", seed=1)
    return {"pairs": str(pairs), "rm": str(rm), "dpo": dpo, "model": tiny_model}


def stage_args(stage: str, a: dict) -> list[str]:
    common = ["--seed", "3", "--train_layers", "2", "--progress", "false"]
    if stage in ("sft", "rm", "dpo"):
        data = ["--data" if stage == "sft" else "--pairs", a["pairs"]]
        return [stage, "--model", a["model"], *data, "--batch_size", "4", "--epochs", "2", "--checkpoint_every", "4",
                *common]
    reward = ["--reward", "rto", "--dpo_model", a["dpo"]] if stage.startswith("rto") else ["--reward", "sparse"]
    lora = ["--lora", "true"] if stage == "rto-lora" else []  # the policy an adapter (its checkpoint: the adapter)
    return ["ppo", *reward, *lora, "--policy", a["model"], "--reward_model", a["rm"], "--iterations", "3",
            "--rollout_size", "8", "--minibatch_size", "4", "--max_new_tokens", "6", "--checkpoint_every", "1", *common]


RESULTS = {"sft": ["model"], "rm": ["model"], "dpo": ["model"], "ppo": ["policy", "critic"], "rto": ["policy", "critic"],
           "rto-lora": ["policy", "critic"]}


def same_results(a: Path, b: Path, stage: str) -> None:
    for folder in RESULTS[stage]:
        for f in sorted((a / folder).glob("*.safetensors")):
            wa, wb = load_file(f), load_file(b / folder / f.name)
            assert wa.keys() == wb.keys()
            for k in wa:
                assert wa[k].equal(wb[k]), f"{stage}: {folder}/{f.name}:{k} differs after resume"
    if stage == "rm":  # reward statistics, taken over the final epoch's batches
        assert (a / "model" / "rto_model.json").read_text() == (b / "model" / "rto_model.json").read_text()
    # timings differ between runs; NaN (e.g. an explained variance of constant returns) compares as a string
    strip = lambda rows: [{k: (str(v) if v != v else v) for k, v in r.items()  # noqa: E731
                           if not k.startswith(("time", "tokens_per_s"))} for r in rows]
    assert strip(read_metrics(a)) == strip(read_metrics(b))
    if stage in ("ppo", "rto", "rto-lora"):
        assert (a / "rollouts.jsonl").read_text() == (b / "rollouts.jsonl").read_text()


def kill(argv: list[str], at: int) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(KILLER), str(at), *argv], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]  # died of SIGKILL, not of an error
    return proc


# stage -> metrics row after which it is killed: past a checkpoint, so the resume redoes some steps;
# rm in its final epoch (its reward statistics then mix remembered and re-encoded batches)
@pytest.mark.parametrize("stage, at", [("sft", 6), ("rm", 10), ("dpo", 5), ("ppo", 2), ("rto", 2), ("rto-lora", 2)])
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, assets, stage, at, capsys):
    argv = stage_args(stage, assets)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main([*argv, "--out", str(whole)]) == 0

    kill([*argv, "--out", str(killed)], at)
    assert not (killed / "DONE").exists()
    last = list_checkpoints(killed)[-1]
    assert 0 < int(last.name.split("-")[1]) < at
    capsys.readouterr()
    assert main([*argv, "--out", str(killed)]) == 0  # the same command continues
    assert f"resuming from {last}" in capsys.readouterr().out
    same_results(whole, killed, stage)
    if stage == "rto-lora":  # the results compared above are the adapter's weights
        assert list((whole / "policy").glob("adapter_model.safetensors"))
    assert (killed / "DONE").exists() and not list_checkpoints(killed)  # a finished run keeps only its results


def test_sigkill_during_a_checkpoint_save_resumes_from_the_one_before(tmp_path, assets, capsys):
    argv = stage_args("sft", assets)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main([*argv, "--out", str(whole)]) == 0
    kill([*argv, "--out", str(killed)], -2)  # killed inside the second save (step 8), before its rename
    assert [p.name for p in list_checkpoints(killed)] == ["step-00000004"]
    assert any(p.name.startswith(".tmp-step-00000008") for p in (killed / "checkpoints").iterdir())
    assert main([*argv, "--out", str(killed), "--resume", "true"]) == 0
    assert "resuming from" in capsys.readouterr().out
    same_results(whole, killed, "sft")


def test_a_save_that_fails_half_way_keeps_the_last_good_checkpoint(tmp_path, assets, capsys, monkeypatch):
    import rto.checkpoint as ckpt

    argv = [*stage_args("dpo", assets), "--checkpoint_every", "2", "--keep_checkpoints", "2"]
    whole, failed = tmp_path / "whole", tmp_path / "failed"
    assert main([*argv, "--out", str(whole)]) == 0

    real_save, calls = ckpt.torch.save, []

    def disk_full(obj, path, *args, **kwargs):  # the third save writes half a file, then the disk is full
        calls.append(path)
        if len(calls) == 3:
            Path(path).write_bytes(b"\0" * 1000)
            raise OSError(28, "No space left on device")
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    capsys.readouterr()
    assert main([*argv, "--out", str(failed)]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "step-00000004" in err and "re-run the same command" in err
    assert [p.name for p in list_checkpoints(failed)] == ["step-00000002", "step-00000004"]  # keep-last-2
    assert not [p for p in (failed / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert not (failed / "DONE").exists() and not (failed / "model").exists()

    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert main([*argv, "--out", str(failed)]) == 0
    assert "resuming from" in capsys.readouterr().out
    same_results(whole, failed, "dpo")


def test_run_folders_are_not_replaced_unless_asked(tmp_path, assets, capsys):
    out = tmp_path / "run"
    argv = [*stage_args("sft", assets), "--out", str(out), "--epochs", "1"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 0  # the same command again: nothing to do
    assert "already holds this run, finished" in capsys.readouterr().out
    assert main([*argv, "--threads", "1"]) == 0  # how it runs is not what it computes
    assert "already holds this run" in capsys.readouterr().out

    assert main([*argv, "--lr", "1e-3"]) == 2  # another config would replace this run's results
    err = capsys.readouterr().err
    assert "different config" in err and "lr: 2e-05 -> 0.001" in err and "--overwrite true" in err
    assert main([*argv, "--lr", "1e-3", "--overwrite", "true"]) == 0
    assert "lr: 0.001" in (out / "config.yaml").read_text()

    assert main([*argv, "--lr", "1e-3", "--resume", "false"]) == 0  # runs the same config again, from scratch
    assert "already holds" not in capsys.readouterr().out
    assert main([*argv, "--lr", "1e-3", "--resume", "true", "--out", str(tmp_path / "new")]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err


def test_a_failed_start_does_not_block_a_corrected_command(tmp_path, assets, capsys):
    out = tmp_path / "run"
    argv = [*stage_args("sft", assets), "--out", str(out), "--epochs", "1"]
    missing = str(tmp_path / "nope.jsonl")
    assert main([*argv, "--data", missing]) == 2  # stops before any training: nothing of value to protect
    assert main(argv) == 0


def test_resume_refuses_a_reward_model_that_changed(tmp_path, assets, capsys):
    import shutil

    rm = tmp_path / "rm"
    shutil.copytree(assets["rm"], rm)
    argv = [*stage_args("ppo", {**assets, "rm": str(rm)}), "--out", str(tmp_path / "p")]
    kill(argv, 2)
    meta = json.loads((rm / "rto_model.json").read_text()) if (rm / "rto_model.json").exists() else {}
    (rm / "rto_model.json").write_text(json.dumps({**meta, "reward_mean": 1.0, "reward_std": 2.0}))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{rm} changed since" in err and "(1.0, 2.0) now" in err
