"""One timed PPO run of TRL 1.12.0's PPOTrainer (`trl.experimental.ppo`), in TRL's own virtual environment.

Run by benchmarks/throughput.py as `<trl venv>/bin/python _trl_child.py SPEC.json OUT.json`; SPEC holds the
model folder, the prompt token ids, the rollout settings and which layers train. It trains `iterations`
PPO updates of `rollout_size` prompts and writes, per update, the wall time of each phase:
  generate  from the start of `batch_generation` to its end (sampling the rollout)
  score     from there to the first forward pass with gradients (reference log-probs, values, rewards, GAE)
  update    from there to the end of the step (`on_step_end`: minibatch passes, metrics)
This file imports only the standard library, torch, transformers, datasets and trl: it never imports rto.
"""

from __future__ import annotations

import json
import sys
import time

T_PROCESS = time.perf_counter()


def freeze_bottom(model, backbone, train_layers: int | None, head=None) -> None:
    """Train only the top `train_layers` decoder layers and the final norm (and `head`, a value head); the
    embeddings (tied to the LM head) and the bottom layers get requires_grad=False. None trains everything."""
    if train_layers is None:
        model.requires_grad_(True)
        return
    model.requires_grad_(False)
    for module in [*backbone.layers[len(backbone.layers) - train_layers:], backbone.norm]:
        module.requires_grad_(True)
    if head is not None:
        head.requires_grad_(True)


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    import trl
    import trl.experimental.ppo.ppo_trainer as ppo_trainer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.manual_seed(spec["seed"])
    folder, layers = spec["model"], spec["train_layers"]
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    # SmolLM2's pad token is its EOS (<|im_end|>), which TRL would take for padding inside the prompts (its masks
    # are `ids != pad_token_id`): pad with <|endoftext|> (id 0, absent from the prompts) instead. Same compute.
    tokenizer.pad_token = spec["pad_token"]
    policy = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=torch.float32)
    for m in (policy, ref, value, reward):
        m.config.pad_token_id = tokenizer.pad_token_id
    freeze_bottom(policy, policy.model, layers)
    freeze_bottom(value, value.model, layers, head=value.score)
    ref.requires_grad_(False)
    reward.requires_grad_(False)
    trainable = {"policy": sum(p.numel() for p in policy.parameters() if p.requires_grad),
                 "value": sum(p.numel() for p in value.parameters() if p.requires_grad)}

    n = spec["rollout_size"]
    config = PPOConfig(
        output_dir=spec["out_dir"], seed=spec["seed"], report_to="none", save_strategy="no", logging_steps=1,
        use_cpu=True, bf16=spec.get("bf16", False), fp16=False,  # fp32 unless asked (TRL's PPOConfig defaults to bf16)
        gradient_checkpointing=False,  # TRL defaults to True: recomputes activations, slower; off for speed
        per_device_train_batch_size=n, gradient_accumulation_steps=1,  # a rollout of n responses per update
        num_mini_batches=n // spec["minibatch_size"],  # -> optimizer steps on minibatches of minibatch_size
        num_ppo_epochs=spec["ppo_epochs"], total_episodes=n * spec["iterations"],
        local_rollout_forward_batch_size=spec["forward_batch_size"],
        response_length=spec["max_new_tokens"], stop_token=None,  # no stop token: every response runs to the budget
        temperature=1.0, learning_rate=spec["lr"], num_sample_generations=0, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    dataset = Dataset.from_dict({"input_ids": spec["prompt_ids"]})
    marks: list[tuple[str, float]] = []

    real_generation = ppo_trainer.batch_generation
    real_forward = ppo_trainer.forward

    def batch_generation(*args, **kwargs):
        marks.append(("generate", time.perf_counter()))
        out = real_generation(*args, **kwargs)
        marks.append(("score", time.perf_counter()))
        return out

    def forward(model, *args, **kwargs):
        if torch.is_grad_enabled() and marks and marks[-1][0] == "score":
            marks.append(("update", time.perf_counter()))
        return real_forward(model, *args, **kwargs)

    ppo_trainer.batch_generation, ppo_trainer.forward = batch_generation, forward

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append(("end", time.perf_counter()))

    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=dataset, callbacks=[StepEnd()])
    t_ready = time.perf_counter()
    trainer.train()
    iterations = []
    for i in range(0, len(marks), 4):
        names = [name for name, _ in marks[i:i + 4]]
        if names != ["generate", "score", "update", "end"]:
            raise RuntimeError(f"unexpected phase order {names}")
        t = [at for _, at in marks[i:i + 4]]
        iterations.append({"time_generate_s": t[1] - t[0], "time_score_s": t[2] - t[1], "time_update_s": t[3] - t[2],
                           "time_iteration_s": t[3] - t[0]})
    history = [h for h in trainer.state.log_history if "val/num_eos_tokens" in h]
    result = {"iterations": iterations, "load_s": t_ready - T_PROCESS, "trainable": trainable,
              "response_tokens": spec["max_new_tokens"], "optimizer": type(trainer.optimizer.optimizer).__name__
              if hasattr(trainer.optimizer, "optimizer") else type(trainer.optimizer).__name__,
              "eos_tokens_in_responses": [h["val/num_eos_tokens"] for h in history],
              "threads": torch.get_num_threads(),
              "versions": {"trl": trl.__version__, "torch": torch.__version__,
                           "transformers": __import__("transformers").__version__,
                           "accelerate": __import__("accelerate").__version__}}
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
