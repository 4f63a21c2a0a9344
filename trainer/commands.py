"""``loraplex train`` and ``loraplex eval`` (registered through the ``loraplex.commands`` entry point group).
Importing this module is cheap: torch, PEFT and TRL load only when a command runs."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _registry(args):
    from loraplex.adapters.cli import _registry as registry

    return registry(args)


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config

    cfg, base = load_config(args.config, args.overrides)  # bad config or override: one line, before anything loads
    if args.push:
        from loraplex.adapters.reference import check_alias, check_name

        check_name(args.push)
        if args.alias:
            check_alias(args.alias)
        registry = _registry(args)  # an unreachable registry fails now, not after training
        registry.names()
    elif args.alias:
        from loraplex.adapters.errors import LoraplexError

        raise LoraplexError("--alias needs --push NAME")
    from .recipe import train

    progress = not args.json and os.environ.get("LORAPLEX_PROGRESS") != "0"
    result = train(cfg, base, resume=args.resume, progress=progress)
    rec = result.record
    summary = {"adapter": str(result.adapter_dir), "record": str(result.record_path), "steps": rec["steps"],
               "final_train_loss": rec["final_train_loss"], "final_eval_loss": rec["final_eval_loss"],
               "train_seconds": rec["train_seconds"]}
    text = (f"trained {rec['steps']} steps in {rec['train_seconds']:.0f} s: train loss {rec['final_train_loss']}, "
            f"eval loss {rec['eval_loss'][0]['loss'] if rec['eval_loss'] else '-'} -> {rec['final_eval_loss']}; "
            f"adapter in {result.adapter_dir}")
    if args.push:
        res = registry.push(result.adapter_dir, args.push, alias=args.alias, training=rec,
                            message=args.message or f"loraplex train {Path(args.config).name if args.config else ''}".strip())
        summary["pushed"] = res.manifest.ref
        text += f"\npushed {res.manifest.ref}" + (f"; {args.alias} -> {res.manifest.version}" if args.alias else "")
        if not res.created:
            text += " (identical to an existing version; nothing new stored)"
    print(json.dumps(summary, indent=2) if args.json else text)
    return 0


def _args_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="training config YAML (every key and default: examples/train.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. train.max_steps=50 lora.r=8")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    p.add_argument("--push", metavar="NAME", help="publish the adapter as a new version of NAME, with the training record")
    p.add_argument("--alias", help="with --push: point this alias (e.g. candidate) at the new version")
    p.add_argument("--message", help="with --push: the version's message")


def cmd_eval(args: argparse.Namespace) -> int:
    from loraplex.adapters.reference import AdapterRef

    from .evaluation import BASE, evaluate

    refs = [args.ref] + ([args.against] if args.against else [])
    for r in refs:
        if r != BASE:
            AdapterRef.parse(r)  # a malformed ref is a one-line error before anything loads
    data = Path(args.data)
    if not data.is_file():
        from .data import DataError

        raise DataError(f"cannot read {data}: no such file")
    results = evaluate(refs, data, _registry(args), model=args.model, quantize=args.quantize,
                       max_new_tokens=args.max_tokens)
    if args.json:
        print(json.dumps([{"ref": r.ref, "resolved": r.resolved, "rows": r.rows, "eval_loss": r.eval_loss,
                           "exact_match": r.exact_match, "answers": r.answers} for r in results], indent=2))
        return 0
    print(table(results))
    return 0


def table(results) -> str:
    """Evaluation results side by side, one column per version."""
    width = max(len(r.resolved) for r in results) + 2
    return "\n".join([
        f"{'':14s}" + "".join(f"{r.resolved:>{width}s}" for r in results),
        f"{'eval loss':14s}" + "".join(f"{r.eval_loss:>{width}.4f}" for r in results),
        f"{'exact match':14s}" + "".join(f"{r.exact_match:>{width}.1%}" for r in results),
        f"{'rows':14s}" + "".join(f"{r.rows:>{width}d}" for r in results),
    ])


def _args_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("ref", help="adapter version to evaluate: NAME, NAME@7, NAME@alias, or base")
    p.add_argument("--data", required=True, help="JSONL of chat or alpaca rows; the last answer is the reference")
    p.add_argument("--against", help="a second version (or base) to print side by side")
    p.add_argument("--model", default="smollm2-135m-instruct", help="base model (default: the embedded SmolLM2)")
    p.add_argument("--quantize", choices=["nf4", "int8", "none"], default="nf4", help="base quantization (default nf4)")
    p.add_argument("--max-tokens", type=int, default=64, help="longest greedy answer (default 64)")


TRAIN = (cmd_train, "fine-tune an adapter (QLoRA) from a config and optionally publish it as a new version", _args_train)
EVAL = (cmd_eval, "eval loss and exact match of adapter versions on a JSONL file, side by side", _args_eval)

if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: loraplex train | loraplex eval")
