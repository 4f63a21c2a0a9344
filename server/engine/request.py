"""What a request asks of generation (``SamplingParams``) and what it gets back
(``RequestOutput``). Plain data, no torch: the HTTP API builds and reads these."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass

from loraplex.adapters.spec import MAX_ADAPTER_WEIGHT  # noqa: F401  (re-exported for the API's schemas)

_EPS = 1e-5  # temperatures below this are greedy (as in vLLM)
MAX_STOP = 16
MAX_STOP_CHARS = 256  # characters of one stop string
MAX_LOGPROBS = 20
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 1024  # entries of a request's logit_bias (each a token id and a bias in [-100, 100])
MAX_TOKEN_ID = 2**31 - 1  # ids and top_k fit int32 (the engine checks them against its vocabulary too)
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
MAX_MIXTURE = 8  # adapters in one mixture or merge
MAX_REPETITION_PENALTY = 10.0  # past this every seen token is all but excluded already
MAX_CACHE_SALT = 512  # characters of a prefix-cache salt (the API's is a key name and a client's salt)


def check_mixture(adapters: list[tuple[str, float]] | tuple[tuple[str, float], ...]) -> None:
    """Raise ValueError unless a mixture has at most MAX_MIXTURE distinct adapters with finite weights of
    magnitude at most MAX_ADAPTER_WEIGHT (a weight of 1e30 would overflow the delta into inf and NaN)."""
    if len(adapters) > MAX_MIXTURE:
        raise ValueError(f"a mixture takes at most {MAX_MIXTURE} adapters, got {len(adapters)}")
    names = [n for n, _ in adapters]
    if len(set(names)) != len(names):
        raise ValueError("an adapter appears twice in the mixture")
    for name, w in adapters:
        if not _num(w) or not math.isfinite(w) or abs(w) > MAX_ADAPTER_WEIGHT:
            raise ValueError(f"adapter weights must be finite numbers in [-{MAX_ADAPTER_WEIGHT:g}, "
                             f"{MAX_ADAPTER_WEIGHT:g}], got {w!r} for {name}")


def _num(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """The OpenAI/vLLM sampling knobs of one request, and its prefix-cache salt; invalid values raise
    ``ValueError``. ``cache_salt`` (vLLM's): cached KV blocks are shared only between requests with the same
    salt (and the same adapter content); the API sets it per API key, so tenants never share cached prefixes."""

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
    cache_salt: str | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit before sampling), OpenAI's
    prompt_logprobs: int | None = None  # vLLM's: each prompt token's logprob (and this many alternatives)

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "logit_bias", tuple(tuple(e) for e in self.logit_bias))
        checks = [
            ("max_tokens", _int(self.max_tokens) and 1 <= self.max_tokens <= MAX_TOKEN_ID,
             f"an integer in [1, {MAX_TOKEN_ID}]"),
            ("temperature", _num(self.temperature) and 0 <= self.temperature <= 2, "in [0, 2]"),
            ("top_p", _num(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", _int(self.top_k) and -1 <= self.top_k <= MAX_TOKEN_ID,
             f"-1 or 0 (off) or an integer in [1, {MAX_TOKEN_ID}]"),
            ("min_p", _num(self.min_p) and 0 <= self.min_p <= 1, "in [0, 1]"),
            ("seed", self.seed is None or (_int(self.seed) and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]),
             f"null or an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]"),
            ("stop", len(stop) <= MAX_STOP and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop),
             f"at most {MAX_STOP} non-empty strings of at most {MAX_STOP_CHARS} characters"),
            ("stop_token_ids", len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS
             and all(_int(t) and 0 <= t <= MAX_TOKEN_ID for t in self.stop_token_ids),
             f"at most {MAX_STOP_TOKEN_IDS} integers in [0, {MAX_TOKEN_ID}]"),
            ("ignore_eos", isinstance(self.ignore_eos, bool), "a boolean"),
            ("presence_penalty", _num(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             "in [-2, 2]"),
            ("frequency_penalty",
             _num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
            ("repetition_penalty", _num(self.repetition_penalty)
             and 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY, f"in (0, {MAX_REPETITION_PENALTY:g}]"),
            ("logprobs", self.logprobs is None or (_int(self.logprobs)
                                                   and 0 <= self.logprobs <= MAX_LOGPROBS),
             f"null or an integer in [0, {MAX_LOGPROBS}]"),
            ("logit_bias", len(self.logit_bias) <= MAX_LOGIT_BIAS and all(
                len(e) == 2 and _int(e[0]) and 0 <= e[0] <= MAX_TOKEN_ID and _num(e[1]) and -100 <= e[1] <= 100
                for e in self.logit_bias) and len({e[0] for e in self.logit_bias}) == len(self.logit_bias),
             f"at most {MAX_LOGIT_BIAS} distinct token ids, each with a bias in [-100, 100]"),
            ("prompt_logprobs", self.prompt_logprobs is None or (_int(self.prompt_logprobs)
                                                                 and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
             f"null or an integer in [0, {MAX_LOGPROBS}]"),
            ("cache_salt", self.cache_salt is None or (isinstance(self.cache_salt, str)
                                                       and 0 < len(self.cache_salt) <= MAX_CACHE_SALT),
             f"null or a non-empty string of at most {MAX_CACHE_SALT} characters"),
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
    cached_tokens: int = 0  # prompt tokens read from the prefix cache, not computed (usage's cached_tokens)
    # asked for (params.prompt_logprobs), in a request's first output: (logprob, rank, alternatives) of each
    # prompt token but the first, which nothing precedes (rank 1: the most likely token there)
    prompt_logprobs: list[tuple[float, int, list[tuple[int, float]]]] | None = None
    prompt_token_ids: list[int] | None = None  # with prompt_logprobs: the prompt's tokens


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
