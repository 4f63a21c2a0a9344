"""The registry's ``loraplex`` subcommands (push, ls, show, pull, tag, rollback, rm, route): a table of plain
functions of parsed arguments, which ``loraplex.cli`` puts under one parser. Torch-free: they run on the bare
install (``pip install loraplex``). ``--json`` prints machine-readable results on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

PROGRESS_MIN_BYTES = 4 * 1024 * 1024


# ---- helpers ---------------------------------------------------------------------------------
def _registry(args):
    from .cache import AdapterCache
    from .config import load_settings
    from .registry import AdapterRegistry

    settings = load_settings(registry=args.registry)
    return AdapterRegistry(settings.registry, cache=AdapterCache(settings.cache))


@contextmanager
def _bar(label: str, total: int) -> Iterator[Callable[[int], None]]:
    if total < PROGRESS_MIN_BYTES or os.environ.get("LORAPLEX_PROGRESS") == "0":
        yield lambda n: None
        return
    from tqdm import tqdm

    force = os.environ.get("LORAPLEX_PROGRESS") == "1"
    with tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
              disable=False if force else None, leave=False) as bar:
        yield bar.update


def _emit(args, data, text: str) -> None:
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else text)


def _manifest_dict(m) -> dict:
    return {**json.loads(m.to_json()), "ref": m.ref}


def _table(rows: list[list[str]], header: list[str]) -> str:
    if not rows:
        return ""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*map(str, r)).rstrip() for r in [header, *rows])


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# ---- commands --------------------------------------------------------------------------------
def cmd_push(args) -> int:
    reg = _registry(args)
    res = reg.push(args.dir, args.name, alias=args.alias, base_model=args.base_model, message=args.message or "",
                   force=args.force, progress=_bar)
    m = res.manifest
    if res.created:
        text = f"pushed {m.ref} ({_size(m.size)}, r={m.rank}, {m.modules} modules) to {reg.uri}"
        if res.alias:
            text += f"; {args.alias} -> {m.version}"
    else:
        text = f"identical to {m.ref}; nothing pushed (use --force to add a new version anyway)"
    _emit(args, {"created": res.created, **_manifest_dict(m)}, text)
    return 0


def cmd_ls(args) -> int:
    reg = _registry(args)
    if args.name is None:
        rows, data = [], []
        for name in reg.names():
            aliases = reg.aliases(name)
            m = reg.manifest(name, aliases["latest"])
            data.append({"name": name, "latest": m.version, "aliases": aliases, "base_model": m.base_model,
                         "updated_at": m.created_at})
            rows.append([name, m.version, ",".join(sorted(a for a in aliases if a != "latest")) or "-",
                         m.base_model or "?", m.created_at])
        _emit(args, data, _table(rows, ["NAME", "LATEST", "ALIASES", "BASE", "UPDATED"]) or f"no adapters in {reg.uri}")
        return 0
    from .reference import check_name
    from .errors import NotFoundError

    versions = reg.versions(check_name(args.name))
    if not versions:
        raise NotFoundError(f"adapter {args.name!r} not found in {reg.uri}")
    by_version: dict[int, list[str]] = {}
    for alias, v in reg.aliases(args.name).items():
        by_version.setdefault(v, []).append(alias)
    rows = [[m.version, ",".join(sorted(by_version.get(m.version, []))) or "-", _size(m.size), m.rank,
             m.created_at, m.creator or "", m.message] for m in versions]
    data = [{**_manifest_dict(m), "aliases": sorted(by_version.get(m.version, []))} for m in versions]
    _emit(args, data, _table(rows, ["VERSION", "ALIASES", "SIZE", "RANK", "CREATED", "BY", "MESSAGE"]))
    return 0


def cmd_show(args) -> int:
    reg = _registry(args)
    m = reg.resolve(args.ref)
    aliases = sorted(a for a, v in reg.aliases(m.name).items() if v == m.version)
    history = {}
    for alias in aliases:
        if alias != "latest":
            history[alias] = [asdict(e) for e in reg.alias_history(m.name, alias)]
    data = {**_manifest_dict(m), "aliases": aliases, "alias_history": history}
    lines = [f"{m.ref}  ({', '.join(aliases) or 'no aliases'})",
             f"  base model   {m.base_model or 'unknown'}" + (f"  [{m.base_fingerprint['fingerprint']}]" if m.base_fingerprint else ""),
             f"  lora         r={m.rank} alpha={m.alpha:g} rslora={m.use_rslora} dora={m.use_dora} modules={m.modules} params={m.num_params:,} {m.dtype}",
             f"  targets      {m.target_modules if isinstance(m.target_modules, str) else ','.join(m.target_modules)}",
             f"  created      {m.created_at} by {m.creator}",
             f"  message      {m.message or '-'}"]
    lines += [f"  file         {name}  {_size(e.size)}  sha256:{e.sha256}" for name, e in sorted(m.files.items())]
    if m.training:
        lines.append(f"  training     {json.dumps(m.training, sort_keys=True)[:200]}")
    for alias, events in history.items():
        for e in events:
            lines.append(f"  {alias:<12} {e['at']}  {e['previous'] or '-'} -> {e['version'] or '-'}  ({e['action']} by {e['by']})")
    _emit(args, data, "\n".join(lines))
    return 0


def cmd_pull(args) -> int:
    reg = _registry(args)
    m = reg.pull(args.ref, args.dir, progress=_bar)
    _emit(args, _manifest_dict(m), f"pulled {m.ref} into {args.dir} (verified sha256 and validated)")
    return 0


def cmd_tag(args) -> int:
    reg = _registry(args)
    e = reg.tag(args.ref, args.alias)
    name = args.ref.partition("@")[0]
    _emit(args, asdict(e), f"{name}@{e.alias}: {e.previous or '-'} -> {e.version}")
    return 0


def cmd_rollback(args) -> int:
    reg = _registry(args)
    e = reg.rollback(args.name, args.alias)
    _emit(args, asdict(e), f"{args.name}@{e.alias}: rolled back {e.previous} -> {e.version}")
    return 0


def cmd_rm(args) -> int:
    from .reference import AdapterRef

    reg = _registry(args)
    m = reg.remove(args.ref, force=args.force)
    ref = m.ref if m is not None else str(AdapterRef.parse(args.ref))  # None: an invalid manifest, removed by --force
    _emit(args, {"removed": ref}, f"removed {ref}")
    return 0


def cmd_route(args) -> int:
    from .routes import RouteStore, parse_split

    reg = _registry(args)
    store = RouteStore(reg)
    if args.name == "show" and args.route is not None:  # loraplex route show NAME --server URL
        return _route_stats(args, store)
    if args.route is not None:
        from .errors import ConfigError

        raise ConfigError(f"unexpected argument {args.route!r} (did you mean: loraplex route show {args.route})")
    if args.delete:
        t = store.delete(args.name)
        _emit(args, t.to_dict(), f"deleted route {args.name} (entry {t.seq})")
        return 0
    if args.split is not None:
        r = store.set(args.name, parse_split(args.split))
        arms = ", ".join(f"{a.ref} {100 * r.shares[a.ref]:.4g}%" for a in r.arms)
        _emit(args, r.to_dict(), f"route {r.name}: {arms} (entry {r.seq})")
        return 0
    history = store.history(args.name)
    if not history:
        from .errors import NotFoundError

        raise NotFoundError(f"no route {args.name!r} in {reg.uri}")
    current = None if history[-1].deleted else history[-1]
    data = {"name": args.name, "route": current.to_dict() if current else None,
            "shares": current.shares if current else {}, "history": [e.to_dict() for e in history]}
    if current:
        lines = [f"route {args.name}  (entry {current.seq}, set {current.created_at} by {current.by})",
                 _table([[a.ref, f"{100 * current.shares[a.ref]:.4g}%", f"{a.weight:g}"] for a in current.arms],
                        ["ARM", "SHARE", "WEIGHT"])]
    else:
        lines = [f"route {args.name}: deleted {history[-1].created_at} by {history[-1].by}"]
    lines += ["", "history:", _table([[e.seq, e.created_at, e.action, e.split_text() or "-", e.by or ""] for e in history],
                                     ["ENTRY", "AT", "ACTION", "SPLIT", "BY"])]
    _emit(args, data, "\n".join(lines))
    return 0


def _route_stats(args, store) -> int:
    """Requests, errors, tokens and latency per arm, from a running server's metrics."""
    import httpx

    from .armstats import per_arm
    from .errors import ConfigError, NotFoundError, StorageError

    name = args.route
    route = store.get(name)
    if route is None:
        raise NotFoundError(f"no route {name!r} in {store.registry.uri}")
    if not args.server:
        raise ConfigError("route show needs --server URL (a loraplex server whose /metrics to read)")
    key = os.environ.get("LORAPLEX_API_KEY")  # a key with the metrics scope, for a server that guards /metrics
    headers = {"authorization": f"Bearer {key}"} if key else {}
    try:
        r = httpx.get(args.server.rstrip("/") + "/metrics", timeout=10, headers=headers)
        if r.status_code in (401, 403):
            raise ConfigError(f"{args.server} refused /metrics ({r.status_code}): set LORAPLEX_API_KEY to a key with "
                              "the metrics scope")
        r.raise_for_status()
    except httpx.HTTPError as exc:
        raise StorageError(f"cannot read metrics from {args.server}: {exc}") from None
    rows, data = [], []
    for arm in route.arms:
        stats = per_arm(r.text, arm.name).get(str(arm.version), {})
        item = {"arm": arm.ref, "share": route.shares[arm.ref], **stats}
        data.append(item)
        p50 = stats.get("e2e_p50")
        rows.append([arm.ref, f"{100 * route.shares[arm.ref]:.4g}%", stats.get("requests", 0), stats.get("errors", 0),
                     stats.get("generation_tokens", 0), "-" if p50 is None else f"{p50:.3f}s"])
    _emit(args, {"name": name, "server": args.server, "arms": data},
          _table(rows, ["ARM", "SHARE", "REQUESTS", "ERRORS", "TOKENS", "E2E P50"]))
    return 0


# name -> (function, help, argument adder)
def _args_push(p):
    p.add_argument("dir", help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--name", required=True, help="adapter name: a-z 0-9 . _ -, at most 63 characters")
    p.add_argument("--alias", help="also point this alias at the new version (e.g. candidate)")
    p.add_argument("--base-model", help="base model id or local HF folder (default: adapter_config's)")
    p.add_argument("--message", "-m", help="a note stored with the version")
    p.add_argument("--force", action="store_true", help="add a version even if identical to an existing one")


def _args_ls(p):
    p.add_argument("name", nargs="?", help="list this adapter's versions (default: list adapters)")


def _args_ref(p):
    p.add_argument("ref", help="NAME, NAME@VERSION or NAME@ALIAS")


def _args_pull(p):
    _args_ref(p)
    p.add_argument("dir", help="destination folder")


def _args_tag(p):
    p.add_argument("ref", help="NAME@VERSION (or NAME@ALIAS) to point at")
    p.add_argument("alias", help="alias to move, e.g. prod")


def _args_rollback(p):
    p.add_argument("name")
    p.add_argument("alias")


def _args_rm(p):
    p.add_argument("ref", help="NAME@VERSION")
    p.add_argument("--force", action="store_true",
                   help="also remove the aliases and A/B route arms pointing at it (a route left without arms is deleted)")


def _args_route(p):
    p.add_argument("name", help="route name: what clients ask for, e.g. support-bot (or: show NAME)")
    p.add_argument("route", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("--server", help="with 'route show NAME': a loraplex server URL whose /metrics to read "
                                    "(env LORAPLEX_API_KEY: a key with the metrics scope, if the server asks for one)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--split", metavar="REF=W,REF=W",
                      help="set the route: pinned versions and relative weights, e.g. support-bot@3=90,support-bot@4=10 "
                           "(aliases are resolved now and pinned)")
    what.add_argument("--delete", action="store_true", help="delete the route (its history is kept)")


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str, Callable]] = {
    "push": (cmd_push, "validate an adapter folder and register it as a new version", _args_push),
    "ls": (cmd_ls, "list adapters, or one adapter's versions", _args_ls),
    "show": (cmd_show, "show a version's manifest and aliases", _args_ref),
    "pull": (cmd_pull, "download a version into a folder (verified)", _args_pull),
    "tag": (cmd_tag, "point an alias at a version", _args_tag),
    "rollback": (cmd_rollback, "move an alias back to where it pointed before", _args_rollback),
    "rm": (cmd_rm, "remove a version (refused while an alias or a route arm points at it)", _args_rm),
    "route": (cmd_route, "set, show or delete an A/B route: a name split over pinned adapter versions", _args_route),
}
