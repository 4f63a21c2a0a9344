"""``loraplex`` subcommands that live in the server package (``loraplex.cli``'s command table names them and
imports this module only to run or describe them, so the registry CLI never imports the server).
Importing this module is cheap: each command imports what it needs when it runs; ``serve``'s flags, built
from the server settings, import pydantic-settings (and no more) when its parser is built."""

from __future__ import annotations

import argparse
import types
import typing


def cmd_bench(args: argparse.Namespace) -> int:
    if args.target == "engine":
        from .benchmark import main

        return main(args.options)
    if args.target == "serve":
        from .loadgen import main as serve_main

        return serve_main(args.options)
    raise AssertionError(args.target)


def _args_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", choices=["engine", "serve"],
                   help="what to measure: engine (the native engine against its peers), or serve (a load generator "
                        "for any OpenAI-compatible server)")
    p.add_argument("options", nargs=argparse.REMAINDER,
                   help="options of the benchmark (see loraplex bench engine --help, loraplex bench serve --help)")


BENCH = (cmd_bench, "measure loraplex against its peers on this machine", _args_bench)

def cmd_serve(args: argparse.Namespace) -> int:
    import logging
    import sys

    from .api.settings import ServerSettings
    from .server import build_server

    # what the command line gave (its --registry included); the rest comes from LORAPLEX_* or the defaults
    overrides = {name: v for name in ServerSettings.model_fields if (v := getattr(args, name, None)) is not None}
    try:
        settings = ServerSettings(**overrides)
    except Exception as exc:  # pydantic's ValidationError: one line per bad setting
        errs = getattr(exc, "errors", lambda: [])()
        first = errs[0] if errs else {"loc": ("?",), "msg": str(exc)}
        print(f"loraplex: error: setting {'.'.join(map(str, first['loc']))}: {first['msg']}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = build_server(settings)
    server.run()
    return 0


def _flag_type(annotation: object) -> dict:
    """argparse's type/choices/action for a setting's annotation (``X | None`` as ``X``)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is typing.Literal:
        choices = typing.get_args(annotation)
        return {"choices": list(choices), "type": type(choices[0])}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if annotation in (int, float):
        return {"type": annotation}
    return {}  # str, Path, ...: the string, converted by the settings class


def _args_serve(p: argparse.ArgumentParser) -> None:
    """One flag per server setting: ``--max-loras`` from ``ServerSettings.max_loras``, and so on. Each defaults
    to None (not given), so that LORAPLEX_* variables and the settings' defaults still apply."""
    from .api.settings import NOT_FLAGS, ServerSettings

    for name, field in ServerSettings.model_fields.items():
        if name in NOT_FLAGS:
            continue
        default = "" if field.default is None else f"default {field.default}; "
        help_ = f"{field.description or name.replace('_', ' ')} ({default}env LORAPLEX_{name.upper()})"
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=help_.replace("%", "%%"),
                       **_flag_type(field.annotation))


SERVE = (cmd_serve, "serve the base model and the registry's adapters over an OpenAI-compatible API", _args_serve)
