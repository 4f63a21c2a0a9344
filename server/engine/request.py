"""What a request asks of generation (``SamplingParams``) and what it gets back
(``RequestOutput``). Plain data, no torch: the HTTP API builds and reads these."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass

_EPS = 1e-5  # temperatures below this are greedy (as in vLLM)
MAX_STOP = 16
MAX_LOGPROBS = 20


def _num(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """The OpenAI/vLLM sampling knobs of one request; invalid values raise ``ValueError``."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        checks = [
            ("max_tokens", _int(self.max_tokens) and self.max_tokens >= 1, "an integer >= 1"),
            ("temperature", _num(self.temperature) and 0 <= self.temperature <= 2, "in [0, 2]"),
            ("top_p", _num(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", _int(self.top_k) and self.top_k >= -1, "-1 or 0 (off) or an integer >= 1"),
            ("min_p", _num(self.min_p) and 0 <= self.min_p <= 1, "in [0, 1]"),
            ("seed", self.seed is None or _int(self.seed), "an integer or null"),
            ("stop", len(stop) <= MAX_STOP and all(isinstance(s, str) and s for s in stop),
             f"at most {MAX_STOP} non-empty strings"),
            ("stop_token_ids", all(_int(t) and t >= 0 for t in self.stop_token_ids),
             "a list of integers >= 0"),
            ("ignore_eos", isinstance(self.ignore_eos, bool), "a boolean"),
            ("presence_penalty", _num(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             "in [-2, 2]"),
            ("frequency_penalty",
             _num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
            ("repetition_penalty", _num(self.repetition_penalty) and 0 < self.repetition_penalty
             and math.isfinite(self.repetition_penalty), "a finite number > 0"),
            ("logprobs", self.logprobs is None or (_int(self.logprobs)
                                                   and 0 <= self.logprobs <= MAX_LOGPROBS),
             f"null or an integer in [0, {MAX_LOGPROBS}]"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < _EPS

    @property
    def penalized(self) -> bool:
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1.0)

    @property
    def truncated(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0


@dataclass(slots=True)
class RequestOutput:
    """What a step produced for one request: the new piece, and the totals so far."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[float]
    new_top_logprobs: list[list[tuple[int, float]]] | None
    finished: bool
    finish_reason: str | None  # stop | length | abort | error
    prompt_tokens: int
    completion_tokens: int
    adapters: tuple[tuple[str, float], ...]
    error: Exception | None = None
    arrived: float | None = None  # when the API received it (monotonic seconds), for latency metrics


async def drain(queue) -> AsyncIterator[RequestOutput]:
    """One request's outputs from its asyncio queue, as both engine backends fill it: ``RequestOutput``s up to
    and including the finished one; an exception put on the queue is raised here."""
    while True:
        item = await queue.get()
        if isinstance(item, BaseException):
            raise item
        yield item
        if item.finished:
            return
