"""``loraplex`` subcommands that live in the server package (registered through the
``loraplex.commands`` entry point group, so the registry CLI never imports the server).
Importing this module is cheap: each command imports what it needs when it runs."""

from __future__ import annotations

import argparse


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

_SERVE_FLAGS = ("host", "port", "engine", "model", "quantize", "dtype", "device", "api_keys_file", "max_loras",
                "max_lora_rank", "max_cpu_loras", "max_running", "max_model_len", "max_batched_tokens", "max_queue",
                "max_tokens", "request_timeout", "load_share", "tensor_parallel_size", "pipeline_parallel_size", "kv_cache_gib")


def cmd_serve(args: argparse.Namespace) -> int:
    import logging
    import sys

    from .api.settings import ServerSettings
    from .server import build_server

    overrides = {k: v for k in _SERVE_FLAGS if (v := getattr(args, k, None)) is not None}
    if args.registry:
        overrides["registry"] = args.registry
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


def _args_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="address to bind (default 127.0.0.1; env LORAPLEX_HOST)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--engine", choices=["native", "vllm"],
                   help="native (default): loraplex's engine; vllm: vLLM's async engine (pip install 'loraplex[vllm]')")
    p.add_argument("--model", help="base model: smollm2-135m-instruct (default) or a local HF folder")
    p.add_argument("--quantize", choices=["nf4", "int8", "none"],
                   help="base quantization (default: nf4 on the native engine, none on vllm)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--api-keys-file", help="YAML file of API keys, scopes and adapter patterns")
    for name in ("max_loras", "max_lora_rank", "max_cpu_loras", "max_running", "max_model_len", "max_batched_tokens",
                 "max_queue", "max_tokens"):
        p.add_argument("--" + name.replace("_", "-"), type=int, dest=name)
    p.add_argument("--request-timeout", type=float, help="seconds a request may take")
    p.add_argument("--load-share", type=float,
                   help="native engine: share of each step's time given to adapter loads while one runs (default 0.15)")
    p.add_argument("--tensor-parallel-size", type=int, help="vllm engine: GPUs to shard each layer over")
    p.add_argument("--pipeline-parallel-size", type=int, help="vllm engine: GPUs to split the layers over")
    p.add_argument("--kv-cache-gib", type=float, help="vllm engine: KV cache size in GiB (default 4 on CPU, vLLM's own on GPUs)")


SERVE = (cmd_serve, "serve the base model and the registry's adapters over an OpenAI-compatible API", _args_serve)
