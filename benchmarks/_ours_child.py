"""One timed `rto ppo` run (RTO or sparse PPO), in its own process.

Run by benchmarks/throughput.py as `python _ours_child.py SPEC.json OUT.json`, with PYTHONPATH naming the
source tree to measure (this checkout, or an older commit extracted with `git archive`). It runs
`rto.cli.main(["ppo", *SPEC["argv"]])` and records, per iteration, the stage's own phase times
(time_generate_s, time_score_s, time_update_s from metrics.jsonl) and the wall time of the whole iteration
(from the start of one rollout to the start of the next, or to the final checkpoint for the last one).

Fixed response length: with SPEC["no_eos"], `rto.rollout.eos_ids` is replaced in this process by a function
that returns no id, so generation never stops early and no response is cut: every response has exactly
max_new_tokens tokens. The sampled distribution is unchanged (EOS can still be drawn; it just does not end
the response). The run checks the recorded mean length and EOS rate afterwards.
"""

from __future__ import annotations

import json
import sys
import time

T_PROCESS = time.perf_counter()


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    import torch
    import transformers

    import rto
    import rto.rollout
    import rto.stages.ppo as ppo
    from rto.cli import main as rto_main

    if spec["no_eos"]:
        rto.rollout.eos_ids = lambda model, tokenizer: set()
    marks: list[float] = []
    ends: list[float] = []
    real_generate, real_save = ppo.generate, ppo.save_checkpoint

    def generate(*args, **kwargs):
        marks.append(time.perf_counter())
        return real_generate(*args, **kwargs)

    def save_checkpoint(*args, **kwargs):
        ends.append(time.perf_counter())
        return real_save(*args, **kwargs)

    ppo.generate, ppo.save_checkpoint = generate, save_checkpoint
    code = rto_main(["ppo", *spec["argv"]])
    if code:
        raise SystemExit(f"rto ppo exited with status {code}")
    out = spec["argv"][spec["argv"].index("--out") + 1]
    history = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    bounds = marks + ends[-1:]
    iterations = []
    for i, h in enumerate(history):
        iterations.append({"time_generate_s": h["time_generate_s"], "time_score_s": h["time_score_s"],
                           "time_update_s": h["time_update_s"], "time_iteration_s": bounds[i + 1] - bounds[i],
                           "length": h["length"], "eos_rate": h["eos_rate"]})
    result = {"iterations": iterations, "load_s": marks[0] - T_PROCESS, "rto_file": rto.__file__,
              "threads": torch.get_num_threads(),
              "log": open(f"{out}/log.txt").read()[-4000:],
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "accelerate": __import__("accelerate").__version__}}
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
