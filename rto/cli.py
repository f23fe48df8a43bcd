"""The `rto` command: one subcommand per stage; each takes --config FILE.yaml and --field overrides.

    rto pairs | sft | rm | dpo | ppo | eval | report   one stage (see `rto STAGE --help`)
    rto pipeline RECIPE.yaml                           stages in order, skipping finished ones
    rto demo                                           the pipeline on the embedded default
    rto data check FILE --kind prompts|preferences     validate a data file
"""

from __future__ import annotations

import functools
import sys

from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser, set_parsing_settings

from rto.checkpoint import CheckpointError
from rto.data import MAX_ROW_BYTES, DataError, check
from rto.distributed import broadcast, close, is_main, leave
from rto.runtime import NonFiniteError, finished_summary
from rto.stages import pipeline
from rto.stages.registry import STAGES, build_config, one_line

COMMANDS = {
    **STAGES,  # the one list of stages, shared with `rto pipeline`
    "pipeline": (pipeline.PipelineConfig, pipeline.run, "run a recipe of stages, skipping finished ones"),
    "demo": (pipeline.DemoConfig, pipeline.demo, "the whole pipeline on the embedded default, then the report"),
}


@functools.lru_cache(maxsize=1)
def build_parser() -> ArgumentParser:
    """The `rto` parser, built once per process (reading every config's field docs takes a while)."""
    # a field's help text is the docstring under it in its config dataclass (those of base classes included)
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(prog="rto", description="RLHF with Reinforced Token Optimization (DPO meets PPO).",
                            exit_on_error=False)
    subcommands = parser.add_subcommands(dest="command")
    for name, (config_cls, _, help_text) in COMMANDS.items():
        sub = ArgumentParser(description=help_text, exit_on_error=False)
        sub.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the fields below")
        if name == "pipeline":
            sub.add_argument("recipe", type=str, help="path of the recipe YAML (rto/recipes/demo.yaml shows the format)")
        sub.add_class_arguments(config_cls, nested_key=None, skip={"recipe"} if name == "pipeline" else None)
        subcommands.add_subcommand(name, sub, help=help_text)
    data = ArgumentParser(description="data files", exit_on_error=False)
    subcommands.add_subcommand("data", data, help="validate data files")
    checker = ArgumentParser(description="validate a prompt or preference file", exit_on_error=False)
    checker.add_argument("file", type=str)
    checker.add_argument("--kind", type=str, choices=["prompts", "preferences"], required=True)
    checker.add_argument("--split", type=str, default="train", help="split of a saved DatasetDict folder")
    checker.add_argument("--max_row_bytes", type=int, default=MAX_ROW_BYTES,
                         help="largest row accepted, in bytes (a JSON Lines line; the text of another row)")
    data.add_subcommands(dest="action").add_subcommand("check", checker, help="validate a prompt or preference file")
    return parser


def _config(config_cls, ns) -> object:
    return build_config(config_cls, vars(ns))  # each field's range is checked here (rto.config)


def main(argv: list[str] | None = None) -> int:
    """Run one `rto` command; returns its exit status (0 done, 1 stopped, 2 bad input, 130 interrupted). A launched
    process of several exits here instead (rto.distributed.leave)."""
    try:
        code = _command(argv)
    except BaseException:
        close()  # several processes: an error that escapes leaves the process group all the same
        raise
    return leave(code)


def _command(argv: list[str] | None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # rto shows its own bars; hide the per-file loading bars
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except ArgumentError as e:  # a value of the wrong type, an unknown option: one line, as for every bad input
        given = list(sys.argv[1:] if argv is None else argv)
        command = next((a for a in given if a in COMMANDS or a == "data"), "")
        print(f"rto{' ' + command if command else ''}: error: {one_line(str(e))} (see rto {command} --help)",
              file=sys.stderr)
        return 2
    command = args.command
    try:
        if command == "data":
            opts = args.data.check
            print(check(opts.file, opts.kind, opts.split, max_row_bytes=opts.max_row_bytes))
            return 0
        config_cls, run, _ = COMMANDS[command]
        cfg = _config(config_cls, getattr(args, command))
        # process 0 reads the run folder and decides for all (several processes: rto.distributed)
        if hasattr(cfg, "resume") and broadcast(is_main() and finished_summary(cfg) is not None):
            if is_main():
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
