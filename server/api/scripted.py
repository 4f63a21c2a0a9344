"""``ScriptedBackend``: a real, deterministic ``EngineBackend`` with no model and no torch, for fast API
tests and for trying the API out.

The "tokenizer" is bytes: a prompt's tokens are its UTF-8 bytes (token ids 0-255), and a token's text
is its character. Each next token is drawn from a small alphabet by a hash of the prompt, the adapters
and their weights (so each adapter, mixture and merge writes its own text), the seed when sampling,
and the position. It honours ``max_tokens``, stop strings (cut from the text, finish ``stop``),
``stop_token_ids``, EOS (token 0, after ``eos_after`` tokens unless ``ignore_eos``) and
``max_model_len``; counts prompt and completion tokens; gives logprobs; streams its outputs one token
at a time, ``token_delay`` seconds apart; runs at most ``kv_slots_total`` requests at once (the rest
wait); and raises what the engine raises: a prompt longer than the model takes is a ``ValueError``.
Every request that ends before finishing is an abort: its id goes to ``aborted``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from collections.abc import AsyncIterator
from pathlib import Path

from loraplex.adapters.errors import EngineError, InvalidAdapterError

from ..engine.request import RequestOutput, SamplingParams

EOS = 0  # the end-of-sequence token id
ALPHABET = b"abcdefghijklmnopqrstuvwxyz ,."  # the bytes generated text is made of
TEMPLATE = "<|{role}|>{content}\n"  # one chat message; the prompt ends with "<|assistant|>"


class ScriptedBackend:
    """A byte-level toy engine behind the ``EngineBackend`` Protocol (see the module docstring)."""

    def __init__(self, base_model: str = "scripted-base", *, max_model_len: int = 512, kv_slots_total: int = 4,
                 max_loras: int = 4, token_delay: float = 0.0, eos_after: int | None = None,
                 broken: frozenset[str] = frozenset()) -> None:
        self.base_model = base_model  # the base model's id, as listed by /v1/models
        self.max_model_len = max_model_len  # prompt + output tokens per request
        self.kv_slots_total = kv_slots_total  # requests generating at once; more wait
        self.max_loras = max_loras  # adapters in "device" slots; later ones are "host"
        self.token_delay = token_delay  # seconds before each token
        self.eos_after = eos_after  # completion tokens after which EOS comes (None: never)
        self.broken = broken  # adapter names whose requests fail mid-generation (EngineError)
        self.running: dict[str, tuple[tuple[str, float], ...]] = {}  # request id -> its adapters, while generating
        self.waiting = 0  # requests waiting for a slot
        self.started: list[str] = []  # request ids, in the order they were accepted
        self.finished: list[str] = []  # request ids that ran to a finish reason (stop | length | error)
        self.aborted: list[str] = []  # request ids left before they finished
        self.merges: dict[str, tuple[list[str], dict]] = {}  # merge name -> (sources, merge spec)
        self.pinned: set[str] = set()
        self._resident: dict[str, dict] = {}  # adapter name -> tier, slot, refs, load_seconds
        self._hits = self._misses = 0
        self._closed = False
        self.ready = True  # the engine serves; a test sets it False to stand for an engine that is restarting

    # ---- text -----------------------------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True,
                    continue_final_message: bool = False) -> str:
        if continue_final_message and (not messages or messages[-1]["role"] != "assistant"):
            raise ValueError("continue_final_message needs the last message to be the assistant's")
        text = "".join(TEMPLATE.format(role=m["role"], content=m["content"]) for m in messages)
        if continue_final_message:
            return text[:-1]  # the last message left open (without its newline)
        return text + ("<|assistant|>" if add_generation_prompt else "")

    def token_text(self, token_id: int) -> str:
        return "</s>" if token_id == EOS else chr(token_id)

    def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(text.encode("utf-8"))  # (no special tokens to add: EOS only ends)

    def _known(self, ids: list[int]) -> list[int]:
        bad = next((i for i in ids if not 0 <= i < 256), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is not in the vocabulary (ids 0 to 255)")
        return ids

    def token_strs(self, ids: list[int]) -> list[str]:
        return [self.token_text(i) for i in self._known(ids)]

    def detokenize(self, ids: list[int]) -> str:
        return bytes(self._known(ids)).decode("utf-8", errors="replace")

    def _encode(self, prompt: str | list[int]) -> list[int]:
        ids = list(prompt.encode("utf-8")) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < 256 for t in ids):
            raise ValueError("prompt token ids must be in [0, 256)")
        if len(ids) + 1 > self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; this engine allows at most {self.max_model_len - 1}")
        return ids

    def _next(self, key: bytes, step: int) -> tuple[int, float, list[tuple[int, float]]]:
        """Token ``step`` of the text ``key`` names: (token id, its logprob, the alternatives by logprob)."""
        digest = hashlib.blake2b(key + step.to_bytes(4, "little"), digest_size=8).digest()
        order = sorted(range(len(ALPHABET)), key=lambda i: (digest[i % 8] * 31 + i * digest[(i + 3) % 8]) % 257)
        ranked = [(ALPHABET[i], -0.1 - 0.25 * rank) for rank, i in enumerate(order)]
        return ranked[0][0], ranked[0][1], ranked

    def _score(self, ids: list[int], mix, k: int) -> list[tuple[float, int, list[tuple[int, float]]]]:
        """Prompt logprobs: token j + 1 scored by the ranked alphabet the prompt's first j + 1 tokens name (a
        token outside the alphabet: logprob -10, ranked after it), with the k best alternatives."""
        out = []
        for j in range(len(ids) - 1):
            _, _, ranked = self._next(json.dumps([ids[:j + 1], mix, None]).encode(), 0)
            values = dict(ranked)
            tid = ids[j + 1]
            rank = next((r + 1 for r, (t, _) in enumerate(ranked) if t == tid), len(ranked) + 1)
            out.append((values.get(tid, -10.0), rank, ranked[:k]))
        return out

    # ---- generation -----------------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams, adapters: list[tuple[str, float]],
                       request_id: str) -> AsyncIterator[RequestOutput]:
        if self._closed:
            raise EngineError("the engine is stopped")
        if request_id in self.running:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = self._encode(prompt)
        if any(t >= 256 for t, _ in params.logit_bias):
            raise ValueError("logit_bias token ids must be in [0, 256)")
        mix = tuple((str(n), float(w)) for n, w in adapters)
        if any(not math.isfinite(w) for _, w in mix):
            raise ValueError("adapter weights must be finite")
        seed = None if params.greedy else (params.seed or 0)
        key = json.dumps([ids, mix, seed]).encode()
        out_ids: list[int] = []
        lps: list[float] = []
        tops: list[list[tuple[int, float]]] = []
        scored = self._score(ids, mix, params.prompt_logprobs) if params.prompt_logprobs is not None else None
        emitted = emitted_tokens = 0
        reason: str | None = None
        self.started.append(request_id)
        self.waiting += 1
        try:
            while len(self.running) >= self.kv_slots_total:
                await asyncio.sleep(max(self.token_delay, 0.001))
            self.waiting -= 1
            self.running[request_id] = mix
            self._touch(mix, +1)
            text = ""
            while reason is None:
                await asyncio.sleep(self.token_delay)
                failed = next((n for n, _ in mix if n in self.broken), None)
                if failed is not None:
                    reason = "error"
                    self.finished.append(request_id)
                    yield RequestOutput(request_id, [], "", [], None, True, "error", len(ids), len(out_ids), mix,
                                        error=EngineError(f"adapter {failed} failed in the engine"))
                    return
                tid, lp, ranked = self._next(key, len(out_ids))
                if params.logit_bias:  # the toy model's logits are its ranked alphabet's (others: -inf)
                    bias = dict(params.logit_bias)
                    tid = max(ranked, key=lambda e: e[1] + bias.get(e[0], 0.0))[0]
                    lp = dict(ranked)[tid]
                if self.eos_after is not None and len(out_ids) >= self.eos_after and not params.ignore_eos:
                    tid, lp = EOS, -0.05
                out_ids.append(tid)
                lps.append(lp)
                tops.append(ranked[:params.logprobs or 0])
                if tid == EOS or tid in params.stop_token_ids:
                    reason = "stop"
                else:
                    text += chr(tid)
                    if len(out_ids) >= params.max_tokens or len(ids) + len(out_ids) >= self.max_model_len:
                        reason = "length"
                for stop in params.stop:
                    at = text.find(stop, max(0, emitted - len(stop)))
                    if at != -1:
                        text, reason = text[:at], "stop"
                hold = 0 if reason else max((len(s) - 1 for s in params.stop), default=0)
                visible = max(emitted, len(text) - hold)
                new_text, emitted = text[emitted:visible], visible
                new_ids, emitted_tokens = out_ids[emitted_tokens:], len(out_ids)
                first = len(out_ids) - len(new_ids)
                if reason is not None:
                    self.finished.append(request_id)
                yield RequestOutput(request_id, new_ids, new_text, lps[first:],
                                    tops[first:] if params.logprobs is not None else None, reason is not None,
                                    reason, len(ids), len(out_ids), mix, prompt_logprobs=scored,
                                    prompt_token_ids=list(ids) if scored is not None else None)
                scored = None  # (in the first output only)
        finally:
            if request_id not in self.running:
                self.waiting -= 1
            else:
                del self.running[request_id]
                self._touch(mix, -1)
            if reason is None:
                self.aborted.append(request_id)

    # ---- adapters -------------------------------------------------------------------------------------
    def _touch(self, mix: tuple[tuple[str, float], ...], delta: int) -> None:
        """Count a reference to each adapter (making it resident on first use) or drop one."""
        for name, _ in mix:
            info = self._resident.get(name)
            if info is None:
                self._misses += delta > 0
                slot = len([i for i in self._resident.values() if i["tier"] == "device"])
                info = self._resident[name] = {"tier": "device" if slot < self.max_loras else "host",
                                               "slot": slot if slot < self.max_loras else None, "refs": 0,
                                               "load_seconds": 0.0}
            elif delta > 0:
                self._hits += 1
            info["refs"] += delta

    def add_merge(self, sources: list[str], merge: dict) -> str:
        if not sources:
            raise InvalidAdapterError("a merge needs at least one adapter")
        digest = hashlib.sha256(json.dumps([list(sources), merge], sort_keys=True).encode()).hexdigest()
        name = f"merge-{digest[:20]}"
        self.merges[name] = (list(sources), dict(merge))
        return name

    def check_adapter(self, name: str) -> None:
        """A folder (an admin-loaded adapter) must hold a PEFT adapter config; a merge must be known."""
        if "/" in name or Path(name).is_absolute():
            if not (Path(name) / "adapter_config.json").is_file():
                raise InvalidAdapterError(f"{name} holds no adapter_config.json")
        elif name.startswith("merge-") and name not in self.merges:
            raise InvalidAdapterError(f"unknown merge {name}")

    async def pin(self, name: str, pinned: bool) -> None:
        if pinned:
            self.pinned.add(name)
            self._touch(((name, 1.0),), 0)
        else:
            self.pinned.discard(name)

    async def adapters(self) -> dict[str, dict]:
        return {n: {**info, "pinned": n in self.pinned} for n, info in self._resident.items()}

    def stats(self) -> dict:
        return {"running": len(self.running), "waiting": self.waiting, "kv_slots_used": len(self.running),
                "kv_slots_total": self.kv_slots_total, "batch_tokens": len(self.running), "cache_hits": self._hits,
                "cache_misses": self._misses, "loads": self._misses, "evictions": 0,
                "load_seconds": [0.0] * self._misses, "restarts": 0}

    def close(self) -> None:
        self._closed = True
