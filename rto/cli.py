"""The `rto` command: one subcommand per stage; each takes --config FILE.yaml and --field overrides.

    rto pairs | sft | rm | dpo | ppo | eval | report   one stage (see `rto STAGE --help`)
    rto pipeline RECIPE.yaml                           stages in order, skipping finished ones
    rto demo                                           the pipeline on the embedded default
    rto data check FILE --kind prompts|preferences     validate a data file
"""

from __future__ import annotations

import dataclasses
import sys

from jsonargparse import ActionConfigFile, ArgumentParser

from rto.checkpoint import CheckpointError
from rto.data import DataError, check
from rto.runtime import NonFiniteError, finished_summary
from rto.stages import dpo, eval as eval_stage, pairs, pipeline, ppo, report, rm, sft

COMMANDS = {
    "pairs": (pairs.PairsConfig, pairs.run, "sample k responses per prompt and write gold-ranked preference pairs"),
    "sft": (sft.SFTConfig, sft.run, "supervised fine-tuning on the chosen responses of a preference file"),
    "rm": (rm.RMConfig, rm.run, "train a Bradley-Terry reward model"),
    "dpo": (dpo.DPOConfig, dpo.run, "train a DPO model (RTO's dense reward source)"),
    "ppo": (ppo.PPOConfig, ppo.run, "PPO with the RTO token reward (--reward rto) or the sparse RM reward"),
    "eval": (eval_stage.EvalConfig, eval_stage.run, "score models on held-out prompts against a baseline"),
    "report": (report.ReportConfig, report.run, "write report.md / report.html from eval and PPO runs"),
    "pipeline": (pipeline.PipelineConfig, pipeline.run, "run a recipe of stages, skipping finished ones"),
    "demo": (pipeline.DemoConfig, pipeline.demo, "the whole pipeline on the embedded default, then the report"),
}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="rto", description="RLHF with Reinforced Token Optimization (DPO meets PPO).")
    subcommands = parser.add_subcommands(dest="command")
    for name, (config_cls, _, help_text) in COMMANDS.items():
        sub = ArgumentParser(description=help_text)
        sub.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the fields below")
        if name == "pipeline":
            sub.add_argument("recipe", type=str, help="recipe YAML")
        sub.add_class_arguments(config_cls, nested_key=None, skip={"recipe"} if name == "pipeline" else None)
        subcommands.add_subcommand(name, sub, help=help_text)
    data = ArgumentParser(description="data files")
    subcommands.add_subcommand("data", data, help="validate data files")
    checker = ArgumentParser(description="validate a prompt or preference file")
    checker.add_argument("file", type=str)
    checker.add_argument("--kind", type=str, choices=["prompts", "preferences"], required=True)
    checker.add_argument("--split", type=str, default="train", help="split of a saved DatasetDict folder")
    data.add_subcommands(dest="action").add_subcommand("check", checker, help="validate a prompt or preference file")
    return parser


def _config(config_cls, ns) -> object:
    names = {f.name for f in dataclasses.fields(config_cls)}
    values = {k: v for k, v in vars(ns).items() if k in names}
    return config_cls(**values)


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # rto shows its own bars; hide the per-file loading bars
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command
    try:
        if command == "data":
            print(check(args.data.check.file, args.data.check.kind, args.data.check.split))
            return 0
        config_cls, run, _ = COMMANDS[command]
        cfg = _config(config_cls, getattr(args, command))
        if hasattr(cfg, "resume") and finished_summary(cfg) is not None:
            print(f"rto {command}: {cfg.out} already holds this run, finished; nothing to do "
                  "(--resume false runs it again)")
            return 0
        run(cfg)
        return 0
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"rto {command}: error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, NonFiniteError) as e:
        print(f"rto {command}: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"rto {command}: interrupted; run the same command again to continue from the last checkpoint",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
