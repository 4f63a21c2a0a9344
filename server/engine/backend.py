"""The native engine behind the API's ``EngineBackend`` protocol."""

from __future__ import annotations

from collections.abc import AsyncIterator

from .async_engine import AsyncEngine
from .engine import Engine
from .request import RequestOutput, SamplingParams


class NativeBackend:
    def __init__(self, engine: Engine, base_model: str) -> None:
        self.engine = engine
        self.base_model = base_model
        self.max_model_len = engine.config.max_model_len
        self.async_engine = AsyncEngine(engine)
        self._pinned: set[str] = set()

    def chat_prompt(self, messages: list[dict]) -> str:
        tok = self.engine.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise ValueError("this base model has no chat template: use /v1/completions")
        return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def generate(self, prompt: str | list[int], params: SamplingParams, adapters: list[tuple[str, float]],
                 request_id: str) -> AsyncIterator[RequestOutput]:
        return self.async_engine.generate(prompt, params, adapters=adapters or None, request_id=request_id)

    def token_text(self, token_id: int) -> str:
        tok = self.engine.tokenizer
        return tok.decode([token_id]) if tok is not None else str(token_id)

    def add_merge(self, sources: list[str], merge: dict) -> str:
        from ..lora.merge import MergeSpec

        spec = MergeSpec(merge["strategy"], tuple(merge["weights"]), density=merge.get("density"),
                         majority_sign_method=merge.get("majority_sign_method", "total"),
                         svd_rank=merge.get("svd_rank"), svd_clamp=merge.get("svd_clamp"), seed=merge.get("seed"))
        return self.engine.add_merge(sources, spec)

    def check_adapter(self, name: str) -> None:
        weights = self.engine.adapters.loader(name)
        self.engine.bank.check(weights)

    async def pin(self, name: str, pinned: bool) -> None:
        def run() -> None:
            if pinned and name not in self._pinned:
                self._pinned.add(name)
                self.engine.adapters.acquire(name)
                self.engine.adapters.slot_for(name)  # start loading it now
            elif not pinned and name in self._pinned:
                self._pinned.discard(name)
                self.engine.adapters.release(name)

        await self.async_engine.call(run)

    async def adapters(self) -> dict[str, dict]:
        def run() -> dict[str, dict]:
            out = self.engine.adapters.resident()
            for name, info in out.items():
                info["pinned"] = name in self._pinned
            return out

        return await self.async_engine.call(run)

    def stats(self) -> dict:
        s = self.async_engine.stats()
        a = self.engine.adapters.stats
        return {"running": s.running, "waiting": s.waiting, "kv_slots_used": s.kv_slots_used,
                "kv_slots_total": s.kv_slots_total, "batch_tokens": s.last_batch_tokens, "steps": s.steps,
                "cache_hits": a.hits, "cache_misses": a.misses, "loads": a.loads, "evictions": a.evictions,
                "load_seconds": list(a.load_seconds)}

    def close(self) -> None:
        self.async_engine.shutdown()
