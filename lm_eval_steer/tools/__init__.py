"""One module per ``lm-eval-steer`` tool subcommand (``models``, ``merge``, ``gguf``, ``vectors``), each
exposing ``configure_parser(parser)`` and ``run(args) -> int``."""
