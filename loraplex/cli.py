"""The ``loraplex`` command: one parser over a table of subcommands, each a plain function of parsed arguments.

The registry's commands (``loraplex.adapters.cli``) are torch-free and always there. The others live in the
packages of the extras and are imported only when they run (or for ``--help``), so ``loraplex ls`` starts
without torch; on an install without their extra they answer with the ``pip install`` line that adds it.
Every failure a user can cause ends in one line on stderr (``loraplex: error: ...``) and a non-zero exit:
1 for a refused operation, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from loraplex.adapters.cli import COMMANDS as REGISTRY_COMMANDS
from loraplex.adapters.errors import LoraplexError

# name -> (module:attribute of a (function, help, argument adder) tuple, the extra that installs its dependencies)
EXTRA_COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("loraplex.server.commands:SERVE", "serve"),
    "bench": ("loraplex.server.commands:BENCH", "serve"),
    "train": ("loraplex.trainer.commands:TRAIN", "train"),
    "eval": ("loraplex.trainer.commands:EVAL", "train"),
}
# extra -> the modules it installs that its commands import when they run
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "serve": ("torch", "transformers", "fastapi", "uvicorn", "pydantic_settings", "prometheus_client"),
    "train": ("torch", "transformers", "peft", "trl", "datasets"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        self.exit(2, f"loraplex: error: {message} (see {self.prog} --help)\n")


class MissingExtraError(LoraplexError):
    """A subcommand whose extra is not installed."""


def _load(name: str) -> tuple:
    target, extra = EXTRA_COMMANDS[name]
    module, attr = target.split(":")
    absent = [m for m in EXTRA_MODULES[extra] if importlib.util.find_spec(m) is None]
    if absent:
        raise MissingExtraError(f"'loraplex {name}' needs the {extra} extra: pip install 'loraplex[{extra}]' "
                                f"(missing: {', '.join(absent)})")
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as exc:  # the extra's dependencies are missing
        raise MissingExtraError(f"'loraplex {name}' needs the {extra} extra: pip install 'loraplex[{extra}]' "
                                f"({exc})") from exc


def _wanted(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every command; of the extras' commands it loads only the one that runs (all for --help)."""
    parser = _Parser(prog="loraplex", description="loraplex: serve many LoRA adapters on one base model.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", help="registry URI: file:///path or s3://bucket/prefix (env LORAPLEX_REGISTRY)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands = dict(REGISTRY_COMMANDS)
    wanted = _wanted(argv or [])
    for name in EXTRA_COMMANDS:
        if wanted is None or wanted == name:
            try:
                commands[name] = _load(name)
            except MissingExtraError:
                pass
    for name, (fn, help_, add) in commands.items():
        p = sub.add_parser(name, help=help_, description=help_, parents=[common])
        add(p)
        p.set_defaults(fn=fn)
    for name, (_, extra) in EXTRA_COMMANDS.items():
        if name not in commands:
            sub.add_parser(name, help=f"(needs pip install 'loraplex[{extra}]')" if wanted is None
                           else f"(see loraplex {name} --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if _wanted(argv) in EXTRA_COMMANDS:
            _load(_wanted(argv))  # one line naming the extra, before any argument parsing
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        if not getattr(args, "fn", None):
            parser.print_help()
            return 0 if not argv else 2
        return args.fn(args)
    except LoraplexError as exc:
        print(f"loraplex: error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("loraplex: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
