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
    slot: int | None = None  # KV slot while running
    finish_reason: str | None = None
    text: str = ""  # decoded output (stop strings removed)
    emitted_text: int = 0  # characters of text already returned
    emitted_tokens: int = 0
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    first_token_at: float | None = None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def prefilling(self) -> bool:
        return self.num_cached < len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
