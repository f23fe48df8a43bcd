"""Peak memory of LoRA mode (one base for the policy, the reference and the DPO model) against full copies.

    python -m benchmarks.lora_memory --only smollm    # `rto dpo` and one `rto ppo --reward rto` iteration on the
                                                      # embedded SmolLM2-135M-Instruct, full and --lora true
    python -m benchmarks.lora_memory --only llama1b   # a 1B Llama (random weights, Llama-3.2-1B's shapes): the
                                                      # policy, reference and DPO roles loaded and updated once

Every measurement runs in a child process of its own, so measurements do not see each other's memory. Three figures
of that child, in MB of 2^20 bytes:
  peak_rss_mb    its ru_maxrss (os.wait4 when it ends): the most resident pages it ever had mapped
  peak_pss_mb    the largest proportional set size seen (/proc/PID/smaps_rollup, sampled every 0.5 s): a page
                 mapped n times counts 1/n each time, so this is the physical memory it held
  peak_anon_mb   the largest anonymous memory seen (same samples): what it allocated itself (activations, gradients,
                 optimizer states, weights it wrote to or converted)
They differ because transformers maps fp32 safetensors weights from the file (copy-on-write) instead of copying them:
two roles loaded from one file share their pages (RSS counts them twice, PSS once), and a weight becomes anonymous
memory only when written (the trained layers). On a GPU every role is copied to device memory instead.
`--only` takes run names or the two groups above; results merge into benchmarks/results/lora_memory.json, one entry
per run with its command, date and figures, beside the machine's description. Scratch files (pairs, reward model,
the 1B weights, run folders) go to benchmarks/.scratch/lora_memory/.

SmolLM2 runs (fp32, 2 threads): `rto dpo` on 8 pairs (batch 4, 1 epoch), then `rto ppo --reward rto` for 1 iteration
of 8 responses of at most 16 new tokens (one minibatch of 8), with its DPO model from the matching dpo run, a reward
model and a critic (separate models in both modes); with train_layers 6 (the default) and null (every layer).

1B runs (fp32): the roles loaded as `rto ppo` loads them (full: three load_causal_lm, the policy and the reference from
the base's folder and the DPO model from a folder of its own, as a trained DPO model is; LoRA: rto.lora.one_base_roles
with a DPO adapter saved on the same base), then one PPO-style update: reference, DPO model and policy score a batch
without gradients, then the policy's clipped loss, backward and an AdamW step on its trainable parameters. The reward
model and critic are left out (separate models either way).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = ROOT / "benchmarks" / ".scratch" / "lora_memory"
RESULTS = ROOT / "benchmarks" / "results" / "lora_memory.json"
THREADS = 2

# Llama-3.2-1B's shapes (its config.json): 16 layers, hidden 2048, 32 heads, 8 KV heads, MLP 8192, vocab 128256, tied
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)


def smollm_runs() -> dict[str, list[str]]:
    """Run name -> arguments of the `rto` command (dpo runs first: the ppo runs read their models)."""
    s = SCRATCH / "smollm"
    common = ["--precision", "fp32", "--progress", "false", "--threads", str(THREADS), "--report_to", "none"]
    dpo = ["dpo", "--pairs", str(s / "pairs.jsonl"), "--batch_size", "4", "--epochs", "1", "--eval_fraction", "0.0",
           *common]
    ppo = ["ppo", "--reward", "rto", "--reward_model", str(s / "rm"), "--rollout_size", "8", "--minibatch_size", "8",
           "--iterations", "1", "--max_new_tokens", "16", *common]
    runs = {
        "smollm/dpo/full/train_layers=6": [*dpo, "--out", str(s / "dpo-full")],
        "smollm/dpo/lora/train_layers=6": [*dpo, "--out", str(s / "dpo-lora"), "--lora", "true"],
    }
    for layers in ("6", "null"):
        runs[f"smollm/ppo/full/train_layers={layers}"] = [*ppo, "--train_layers", layers, "--out",
                                                          str(s / f"ppo-full-{layers}"), "--dpo_model",
                                                          str(s / "dpo-full" / "model")]
        runs[f"smollm/ppo/lora/train_layers={layers}"] = [*ppo, "--train_layers", layers, "--out",
                                                          str(s / f"ppo-lora-{layers}"), "--dpo_model",
                                                          str(s / "dpo-lora" / "model"), "--lora", "true"]
    return runs


LLAMA_RUNS = {  # name -> (mode, train_layers or None, gradient checkpointing)
    "llama1b/full/train_layers=2": ("full", 2, False),
    "llama1b/lora/train_layers=2": ("lora", 2, False),
    "llama1b/lora/train_layers=null": ("lora", None, False),
    "llama1b/lora/train_layers=null/gradient_checkpointing": ("lora", None, True),
}


def setup_smollm() -> None:
    """A preference file of 8 pairs (sentiment task prompts) and a reward model (SmolLM2 + a zero head)."""
    from rto.models import DEFAULT_MODEL, ValueModel, load_tokenizer
    from rto.tasks import get_task

    s = SCRATCH / "smollm"
    s.mkdir(parents=True, exist_ok=True)
    prompts = get_task("sentiment").prompts("train")[:8]
    (s / "pairs.jsonl").write_text("".join(
        json.dumps({"prompt": p, "chosen": "What a lovely, warm and happy day it was.", "rejected": "It was bad.",
                    "chosen_ended": True, "rejected_ended": True}) + "\n" for p in prompts))
    if not (s / "rm" / "value_head.safetensors").is_file():
        rm = ValueModel.from_pretrained(DEFAULT_MODEL)
        rm.meta = {"reward_mean": 0.0, "reward_std": 1.0}
        rm.save_pretrained(s / "rm")
        load_tokenizer(DEFAULT_MODEL).save_pretrained(s / "rm")


def setup_llama() -> None:
    """Random 1B weights (seed 0) saved as safetensors, a copy of them in another folder (the whole DPO model of the
    full-copies run) and a DPO adapter (rank 16, top 2 layers, non-zero B) saved on them with the record
    `rto dpo --lora true` writes; each skipped when already there."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rto.lora import LoraOptions, adapter_record, attach_adapter
    from rto.models import load_causal_lm, weights_fingerprint

    base, adapter = SCRATCH / "llama1b" / "base", SCRATCH / "llama1b" / "dpo-adapter"
    if not (base / "model.safetensors").is_file():
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**LLAMA_1B)).save_pretrained(base)
    if not (SCRATCH / "llama1b" / "dpo-full" / "model.safetensors").is_file():  # a whole DPO model: its own file
        shutil.copytree(base, SCRATCH / "llama1b" / "dpo-full", dirs_exist_ok=True)
    if not (adapter / "adapter_model.safetensors").is_file():
        model = load_causal_lm(str(base))
        fingerprint = weights_fingerprint(model)
        peft_model = attach_adapter(model, LoraOptions(lora=True), train_layers=2)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.01)
        peft_model.save_pretrained(adapter)
        (adapter / "rto_model.json").write_text(json.dumps({"stage": "dpo", **adapter_record(str(base), fingerprint)}))


def rollup(pid: int | str = "self") -> dict[str, float]:
    """Rss, Pss and Anonymous memory of a process now, in MB (/proc/PID/smaps_rollup; empty once it has ended)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return {}
    return {key.lower(): int(kb) / 1024 for key, kb in re.findall(r"^(Rss|Pss|Anonymous):\s+(\d+) kB", text, re.M)}


def llama_child(name: str, batch: int, prompt_tokens: int, response_tokens: int) -> dict:
    """One 1B measurement in this process: load the roles, one PPO-style update; figures in MB and seconds."""
    import torch

    from rto.lora import LoraOptions, enable_gradient_checkpointing, one_base_roles
    from rto.losses import policy_loss
    from rto.models import load_causal_lm, read_meta, set_trainable
    from rto.sequences import collate, shared_trunk, token_logprobs
    from rto.trunk import checked_trunk_layers

    torch.set_num_threads(THREADS)
    mode, train_layers, checkpointing = LLAMA_RUNS[name]
    base, adapter = str(SCRATCH / "llama1b" / "base"), str(SCRATCH / "llama1b" / "dpo-adapter")
    notes: list[str] = []
    start = time.perf_counter()
    load = lambda path, role: load_causal_lm(path, role=role)  # noqa: E731
    if mode == "lora":
        opts = LoraOptions(lora=True, gradient_checkpointing=checkpointing)
        roles, _ = one_base_roles(base, None, adapter, read_meta(adapter), opts, train_layers, load, notes.append)
    else:  # what `rto ppo` loads without --lora: three models (the DPO model a full model of the same shapes)
        roles = {"policy": load(base, "policy"), "ref": load(base, "reference").eval().requires_grad_(False),
                 "dpo": load(str(SCRATCH / "llama1b" / "dpo-full"), "DPO model").eval().requires_grad_(False)}
    policy = roles["policy"].eval()
    set_trainable(policy, train_layers)
    if checkpointing:
        enable_gradient_checkpointing(policy)
    load_s, loaded = time.perf_counter() - start, rollup()
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for m in roles.values()
                for p in m.parameters()}
    trainable = [p for p in policy.parameters() if p.requires_grad]

    gen = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(0, LLAMA_1B["vocab_size"], (n,), generator=gen).tolist()  # noqa: E731
    seqs = collate([ids(prompt_tokens) for _ in range(batch)], [ids(response_tokens) for _ in range(batch)], 0)
    n_shared = checked_trunk_layers(list(roles.values()), train_layers, seqs.select(slice(0, 2)), notes.append)
    start = time.perf_counter()
    with torch.no_grad():  # scoring: every role reads the batch once, on the shared trunk
        trunk = shared_trunk(roles["ref"], seqs, n_shared)
        logp_old = token_logprobs(policy, seqs, trunk, n_shared)
        logp_ref = token_logprobs(roles["ref"], seqs, trunk, n_shared)
        advantages = token_logprobs(roles["dpo"], seqs, trunk, n_shared) - logp_ref  # any dense signal
    score_s = time.perf_counter() - start
    start = time.perf_counter()
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    loss, _ = policy_loss(token_logprobs(policy, seqs, trunk, n_shared), logp_old, advantages, seqs.response_mask,
                          0.2, "token_mean")
    loss.backward()
    optimizer.step()
    update_s = time.perf_counter() - start
    return {"mode": mode, "train_layers": train_layers, "gradient_checkpointing": checkpointing,
            "batch": f"{batch} x ({prompt_tokens} prompt + {response_tokens} response) tokens",
            "weights_held_mb": sum(storages.values()) / 2**20, "trainable_params": sum(p.numel() for p in trainable),
            "after_load_mb": loaded, "after_update_mb": rollup(),
            "peak_rss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "shared_trunk_layers": n_shared, "load_s": load_s, "score_s": score_s, "update_s": update_s,
            "loss": float(loss), "notes": notes}


def measure(command: list[str], figures_file: Path | None = None, every: float = 0.5) -> dict:
    """Run `command` as a child process: its exit code, wall time, peak RSS (ru_maxrss) and the peaks of its PSS and
    anonymous memory sampled every `every` seconds, in MB."""
    SCRATCH.mkdir(parents=True, exist_ok=True)
    log = SCRATCH / "child.log"
    start = time.perf_counter()
    with open(log, "w") as out:
        child = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        peaks: dict[str, float] = {}
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                child.returncode = os.waitstatus_to_exitcode(status)
                break
            for key, mb in rollup(child.pid).items():
                peaks[key] = max(peaks.get(key, 0.0), mb)
            time.sleep(every)
    result = {"command": " ".join(command), "exit_code": child.returncode, "wall_s": time.perf_counter() - start,
              "peak_rss_mb": usage.ru_maxrss / 1024, "peak_pss_mb": peaks.get("pss"),
              "peak_anon_mb": peaks.get("anonymous"),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if result["exit_code"]:
        result["output_tail"] = log.read_text()[-2000:]
    if figures_file is not None and figures_file.is_file():
        result.update(json.loads(figures_file.read_text()))
    return result


def machine() -> dict:
    import torch
    import transformers

    from benchmarks._machine import cpu_info

    cpu = cpu_info(Path("/proc/cpuinfo").read_text()) if Path("/proc/cpuinfo").exists() else {}
    mem = {line.split(":")[0]: int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()[:3]}
    import peft

    return {"cpu": cpu.get("model"), "logical_cpus": cpu.get("logical_cpus"), "machine": platform.machine(),
            "memory_total_gb": mem.get("MemTotal", 0) / 2**20, "threads": THREADS, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="smollm,llama1b", help="run names or groups (smollm, llama1b), with commas")
    parser.add_argument("--batch", type=int, default=4, help="1B runs: sequences in the update")
    parser.add_argument("--prompt_tokens", type=int, default=64)
    parser.add_argument("--response_tokens", type=int, default=64)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # a 1B run in this process
    parser.add_argument("--figures", help=argparse.SUPPRESS)
    parser.add_argument("--setup_llama", action="store_true", help=argparse.SUPPRESS)  # the 1B files, in this process
    args = parser.parse_args(argv)
    if args.setup_llama:
        return setup_llama()
    if args.child:
        figures = llama_child(args.child, args.batch, args.prompt_tokens, args.response_tokens)
        Path(args.figures).write_text(json.dumps(figures))
        return figures

    smollm = smollm_runs()
    wanted = [name for part in args.only.split(",")
              for name in ((list(smollm) if part == "smollm" else list(LLAMA_RUNS) if part == "llama1b" else [part]))]
    unknown = [name for name in wanted if name not in smollm and name not in LLAMA_RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; runs: {', '.join([*smollm, *LLAMA_RUNS])}")
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"runs": {}}
    results["description"] = __doc__
    results["machine"] = machine()
    for name in wanted:
        if name in smollm:
            setup_smollm()
            shutil.rmtree(SCRATCH / "smollm" / Path(smollm[name][smollm[name].index("--out") + 1]).name,
                          ignore_errors=True)
            result = measure([sys.executable, "-m", "rto", *smollm[name]])
        else:
            # the 1B files are written by a process of their own, so that this one never holds the weights
            subprocess.run([sys.executable, "-m", "benchmarks.lora_memory", "--setup_llama"], cwd=ROOT, check=True)
            figures = SCRATCH / "llama1b" / "figures.json"
            figures.unlink(missing_ok=True)
            result = measure([sys.executable, "-m", "benchmarks.lora_memory", "--child", name, "--figures",
                              str(figures), "--batch", str(args.batch), "--prompt_tokens", str(args.prompt_tokens),
                              "--response_tokens", str(args.response_tokens)], figures)
        results["runs"][name] = result
        print(f"{name}: exit {result['exit_code']}, peak RSS {result['peak_rss_mb']:.0f} MB, PSS "
              f"{result['peak_pss_mb'] or 0:.0f} MB, anonymous {result['peak_anon_mb'] or 0:.0f} MB, "
              f"{result['wall_s']:.0f} s", flush=True)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
