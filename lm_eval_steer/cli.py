"""``lm-eval-steer``: the harness CLI with ``steered-hf`` registered, plus our own subcommands.

    lm-eval-steer --model steered-hf --model_args ... --tasks ...   # same as lm_eval
    lm-eval-steer run --model steered-hf ...                         # lm_eval's own subcommands too
    lm-eval-steer build   ...   # vector_builder: build vectors, choose layers and strengths
    lm-eval-steer anti-looping ... # an entry against looping, from the model's own answers
    lm-eval-steer validate ...  # vector files side by side on validation questions a build did not use
    lm-eval-steer compare ...   # leaderboard from results files
    lm-eval-steer check   ...   # CI regression gate (exit 0 ok, 1 regression, 2 not comparable)
    lm-eval-steer quality ...   # output quality: unsteered perplexity of steered responses
    lm-eval-steer gguf    ...   # llama.cpp control-vector GGUF export / import
    lm-eval-steer merge   ...   # merge vector files (keep the best entries of several builds)
    lm-eval-steer models  ...   # list the known models; fetch one (prints its --model_args)
    lm-eval-steer vectors ...   # list the packaged vector files; show what a vector file holds; keep entries off other instructions

Each subcommand lives in its own module exposing ``configure_parser(parser)`` and ``run(args) -> int``;
modules are imported only when their subcommand is used. An input error
(:class:`~lm_eval_steer.core.errors.UserError`) that reaches here is printed as one line, exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from lm_eval_steer.core.console import fail
from lm_eval_steer.core.errors import UserError

SUBCOMMANDS = {
    "build": ("vector_builder.cli", "build steering vectors and choose their layers on validation data"),
    "anti-looping": ("vector_builder.antiloop", "build an entry against looping from the model's own answers; choose its layer and strength on held-out requests"),
    "validate": ("vector_builder.validate", "compare vector files' entries for one instruction on validation questions a build did not use"),
    "compare": ("lm_eval_steer.analysis.compare", "leaderboard (Markdown, CSV, PNG) from lm-eval results"),
    "check": ("lm_eval_steer.analysis.check", "fail when instruction following regressed against a baseline"),
    "quality": ("lm_eval_steer.analysis.quality", "what steering costs: the unsteered model's perplexity of logged responses"),
    "gguf": ("lm_eval_steer.tools.gguf", "export to / import from llama.cpp control-vector GGUF"),
    "merge": ("lm_eval_steer.tools.merge", "merge vector files: a later file's entry replaces an earlier one of the same name"),
    "models": ("lm_eval_steer.tools.models", "list the known models; fetch one and print its --model_args"),
    "vectors": ("lm_eval_steer.tools.vectors", "list the packaged vector files; show what a vector file holds; keep entries off other instructions"),
}


def run_harness(argv: Sequence[str]) -> int:
    """Runs the lm-eval CLI with our model and tasks registered."""
    from lm_eval_steer.runtime.registration import register

    register()
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0


def run_subcommand(name: str, argv: Sequence[str]) -> int:
    module = importlib.import_module(SUBCOMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"lm-eval-steer {name}", description=SUBCOMMANDS[name][1])
    module.configure_parser(parser)
    return int(module.run(parser.parse_args(argv)) or 0)


def usage() -> str:
    """``lm-eval-steer --help``: our subcommands first, then where the harness's options are described."""
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: lm-eval-steer SUBCOMMAND [options]   (lm-eval-steer SUBCOMMAND --help for its options)", "       lm-eval-steer [lm_eval options]        (anything else runs lm_eval with steered-hf registered)", "", "subcommands:"]
    lines += [f"  {name:<{width}}  {description}" for name, (_, description) in SUBCOMMANDS.items()]
    lines += ["", "For lm_eval's own options (--model, --model_args, --tasks, ...): lm_eval --help"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv[0] if argv and argv[0] in SUBCOMMANDS else ""
    if not name and argv[:1] in (["-h"], ["--help"], []):
        print(usage())
        return 0
    try:
        return run_subcommand(name, argv[1:]) if name else run_harness(argv)
    except UserError as error:
        return fail(name, error)
    except BrokenPipeError:
        # The reader went away (`lm-eval-steer vectors show ... | head`): stop quietly, as other
        # command-line tools do. Python's recipe: point stdout at devnull so that the final flush at
        # exit cannot raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
