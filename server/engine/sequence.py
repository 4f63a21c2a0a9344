"""One request inside the engine: its tokens, adapters, sampling state and text so far."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from .request import RequestOutput, SamplingParams  # noqa: F401  (re-exported)


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapters: tuple[tuple[str, float], ...]  # (adapter name, weight); empty for the base model
    generator: torch.Generator | None
    arrival: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose keys/values are in the cache
    cached_prompt: int = 0  # prompt tokens found in the prefix cache when it was first admitted
    blocks: list[int] = field(default_factory=list)  # KV block table while running: position p in blocks[p // size]
    block_hashes: list[bytes] = field(default_factory=list)  # of its full blocks so far (prefix caching)
    identity: bytes = b""  # what computes its keys and values (block_pool.identity), set when admitted
    preemptions: int = 0  # times it gave its blocks back to let older sequences go on
    finish_reason: str | None = None
    text: str = ""  # decoded output (stop strings removed)
    emitted_text: int = 0  # characters of text already returned
    emitted_tokens: int = 0
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    first_token_at: float | None = None
    prompt_logprobs: list[tuple[float, int, list[tuple[int, float]]]] = field(default_factory=list)  # tokens 1...
    prompt_logprobs_sent: bool = False

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def prefill_len(self) -> int:
        """Tokens to compute before the next decode: the prompt; after a preemption, all but the last token
        (which the next decode feeds)."""
        return self.num_tokens - 1 if self.output_ids else len(self.prompt_ids)

    @property
    def prefilling(self) -> bool:
        return self.num_cached < self.prefill_len

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
