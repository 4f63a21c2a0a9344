"""``loraplex`` subcommands that live in the server package (registered through the
``loraplex.commands`` entry point group, so the registry CLI never imports the server).
Importing this module is cheap: each command imports what it needs when it runs."""

from __future__ import annotations

import argparse


def cmd_bench(args: argparse.Namespace) -> int:
    if args.target == "engine":
        from .benchmark import main

        return main(args.options)
    raise AssertionError(args.target)


def _args_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", choices=["engine"], help="what to measure: engine (the native engine against its peers)")
    p.add_argument("options", nargs=argparse.REMAINDER, help="options of the benchmark (see loraplex bench engine --help)")


BENCH = (cmd_bench, "measure loraplex against its peers on this machine", _args_bench)
