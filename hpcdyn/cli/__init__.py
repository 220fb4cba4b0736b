"""The command line, ``hpcdyn COMMAND``: one module per subcommand, each a thin wrapper over library calls.

``main`` parses and dispatches (``hpcdyn.cli.main``); the options every command shares live in
``hpcdyn.cli.options``. Nothing below this package imports it.
"""

from hpcdyn.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
