"""The plug point between the HTTP API and an engine: what the API needs, nothing more.

Implementations: the native engine in its own process (``server.engine.process.EngineProcess``) and
vLLM's async engine (``server.vllm.VllmBackend``). The API imports only this Protocol and the torch-free request types.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from ..engine.request import RequestOutput, SamplingParams


class EngineBackend(Protocol):
    base_model: str  # the base model's id, as listed by /v1/models
    max_model_len: int

    @property
    def ready(self) -> bool:
        """False while the engine is down or restarting (``/ready`` then answers 503, requests get 503s)."""

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True,
                    continue_final_message: bool = False) -> str:
        """The base model's chat template applied to OpenAI-style messages, ready to generate (or, with
        ``continue_final_message``, ending inside the last message)."""

    def token_text(self, token_id: int) -> str:
        """The text of one token (for logprobs)."""

    def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        """The base tokenizer's ids of ``text``."""

    def token_strs(self, ids: list[int]) -> list[str]:
        """Each id's token as the tokenizer's vocabulary spells it (``convert_ids_to_tokens``)."""

    def detokenize(self, ids: list[int]) -> str:
        """The text of ``ids``; raises ``ValueError`` for an id outside the vocabulary."""

    def generate(self, prompt: str | list[int], params: SamplingParams, adapters: list[tuple[str, float]],
                 request_id: str) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs; leaving the iterator early aborts the request."""

    def add_merge(self, sources: list[str], merge: dict) -> str:
        """Register the merge of sources (engine adapter names) and return its adapter name."""

    def check_adapter(self, name: str) -> None:
        """Raise if the engine cannot serve this adapter name (used by the admin load endpoint)."""

    async def pin(self, name: str, pinned: bool) -> None:
        """Keep an adapter resident (or stop keeping it)."""

    async def adapters(self) -> dict[str, dict]:
        """Adapters the engine holds: tier (device | host | loading), slot, references, load seconds."""

    def stats(self) -> dict:
        """running, waiting, kv_slots_used, kv_slots_total, batch_tokens, cache hits/misses/loads/evictions
        (cumulative), load_seconds, restarts (of the engine, cumulative); a value the engine cannot tell is None."""

    def close(self) -> None:
        """Stop the engine thread."""
