"""A live loraplex server on a tiny in-process model: real uvicorn, real HTTP, real registry."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import torch

from ports import free_port  # noqa: F401  (re-exported for the server tests)

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=512)
# vLLM's CPU attention takes head sizes of 32 and up (TINY's are 16): its servers' bases have 2 query
# heads and 1 KV head of 32, the other sizes as TINY.
VLLM_HEADS = dict(num_attention_heads=2, num_key_value_heads=1)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system"]
    words += [f"w{i}" for i in range(128 - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def save_tiny_base(folder: Path, dims: dict | None = None) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**TINY, **(dims or {})}, tie_word_embeddings=False)).eval().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def engine_dims(engine: str) -> dict:
    """The tiny base's overrides for an engine backend (see VLLM_HEADS)."""
    return VLLM_HEADS if engine == "vllm" else {}


def vllm_settings(engine: str) -> dict:
    """Server settings a test server on this engine needs: vLLM gets a small KV cache (the machines
    running the tests have little memory to spare)."""
    return {"engine": engine, "kv_cache_gib": 0.25} if engine == "vllm" else {"engine": engine}


class LiveServer:
    def __init__(self, settings) -> None:
        import socket

        import uvicorn

        from loraplex.server.server import build_server

        # Bound before the engine starts: vLLM's processes take free ports of their own while starting.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", settings.port))
        try:
            self.server = build_server(settings)
        except BaseException:
            sock.close()
            raise
        self.url = f"http://127.0.0.1:{settings.port}"
        self._uv = uvicorn.Server(uvicorn.Config(self.server.app, host="127.0.0.1", port=settings.port,
                                                 log_level="warning", lifespan="off"))
        self._thread = threading.Thread(target=self._uv.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("server did not start")

    @property
    def backend(self):
        return self.server.backend

    def stop(self) -> None:
        self._uv.should_exit = True
        self._thread.join(10)
        self.server.backend.close()
