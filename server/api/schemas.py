"""Request bodies of the OpenAI-compatible endpoints (pydantic), and the sampling parameters they
map to. Unknown fields are ignored, as OpenAI's API does; wrong types and ranges are 400s."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from ..engine.request import (MAX_ADAPTER_WEIGHT, MAX_LOGIT_BIAS, MAX_MIXTURE, MAX_REPETITION_PENALTY, MAX_STOP, MAX_STOP_CHARS, MAX_STOP_TOKEN_IDS,
                               MAX_TOKEN_ID, SEED_RANGE, SamplingParams)
from . import unserved
from .auth import Principal

TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]
Seed = Annotated[int, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])]
StopText = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
MAX_CHOICES = 16  # n: each choice is a generation (admission counts it as one request)
MAX_CLIENT_SALT = 256  # a request's cache_salt; the engine's salt adds the API key's name to it
MAX_MERGE_RANK = 1024  # svd_rank's ceiling here; the engine also holds it to its max_lora_rank


class AdapterWeight(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    weight: float = Field(default=1.0, ge=-MAX_ADAPTER_WEIGHT, le=MAX_ADAPTER_WEIGHT, allow_inf_nan=False)


class MergeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    strategy: Literal["linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                      "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd"]
    density: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    majority_sign_method: Literal["total", "frequency"] = "total"
    svd_rank: int | None = Field(default=None, ge=1, le=MAX_MERGE_RANK)
    svd_clamp: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=0, lt=2**63)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    UNSERVED: ClassVar[dict[str, tuple]] = unserved.COMMON  # fields refused unless neutral (see unserved.py)
    model: str = Field(min_length=1, max_length=300)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKEN_ID)
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES, description="choices to generate for each prompt")
    stop: StopText | list[StopText] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: Seed | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2, allow_inf_nan=False)
    user: str | None = Field(default=None, max_length=256)
    # vLLM-style extras
    top_k: int | None = Field(default=None, ge=-1, le=MAX_TOKEN_ID)
    min_p: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    repetition_penalty: float | None = Field(default=None, gt=0, le=MAX_REPETITION_PENALTY, allow_inf_nan=False)
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)
    cache_salt: str | None = Field(default=None, min_length=1, max_length=MAX_CLIENT_SALT)
    # vLLM's: each prompt token's logprob, with this many alternatives (lm-evaluation-harness style scoring)
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)
    # OpenAI's: token id (as a string, as JSON object keys are) -> bias added to its logit
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]] | None = \
        Field(default=None, max_length=MAX_LOGIT_BIAS)
    # loraplex extras (the openai client's extra_body)
    adapters: list[AdapterWeight] | None = Field(default=None, max_length=MAX_MIXTURE)
    merge: MergeRequest | None = None

    @model_validator(mode="before")
    @classmethod
    def _unserved(cls, data):
        unserved.check(data, cls.UNSERVED, set(cls.model_fields))
        return data

    @field_validator("cache_salt")
    @classmethod
    def _salt(cls, v):  # a lone surrogate ("\ud800" in JSON) would reach vLLM's block hasher in its engine core
        if v is not None:
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("cache_salt must be valid UTF-8 text") from None
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, v):
        for key in v or {}:
            if not (key.isascii() and key.isdigit() and len(key) <= 12):
                raise ValueError(f"logit_bias keys are token ids (decimal integers), got {key[:20]!r}")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if isinstance(v, list) and len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        return v

    def sampling(self, max_tokens: int, logprobs: int | None, who: Principal,
                 prompt_logprobs: int | None = None) -> SamplingParams:
        """The engine's parameters, with the prefix-cache salt of the key ``who`` (``Principal.cache_salt``)."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0, min_p=self.min_p or 0.0,
            seed=self.seed, stop=stop, stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty or 1.0, logprobs=logprobs,
            cache_salt=who.cache_salt(self.cache_salt),
            logit_bias=tuple((int(k), float(b)) for k, b in (self.logit_bias or {}).items()),
            prompt_logprobs=self.prompt_logprobs if prompt_logprobs is None else prompt_logprobs,
        )


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def as_template_input(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ChatCompletionRequest(_Common):
    UNSERVED: ClassVar[dict[str, tuple]] = unserved.CHAT
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKEN_ID)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class CompletionRequest(_Common):
    UNSERVED: ClassVar[dict[str, tuple]] = unserved.COMPLETION
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = Field(default=16, ge=0, le=MAX_TOKEN_ID)  # 0: score the prompt (with echo)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False

    @model_validator(mode="after")
    def _score_only(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 generates nothing: it scores the prompt, with echo true")
        return self

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be empty")
            if len(v) > 64 and not all(isinstance(t, int) for t in v):
                raise ValueError("at most 64 prompts per request")
        return v

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(t, int) for t in p):
            return [list(p)]
        return list(p)


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1, max_length=63)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1, max_length=63)


class _Tokenize(BaseModel):
    """vLLM's ``/tokenize`` bodies: ``model`` (the base or an adapter the caller may use; the tokenizer is the
    base's either way), and whether to return each token's text."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(default=None, min_length=1, max_length=300)
    return_token_strs: bool | None = False
    adapters: None = None  # (what the resolver reads: a model name only here)
    merge: None = None


class TokenizeCompletionRequest(_Tokenize):
    prompt: str
    add_special_tokens: bool = True


class TokenizeChatRequest(_Tokenize):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False

    @field_validator("continue_final_message")
    @classmethod
    def _one_of(cls, v, info):
        if v and info.data.get("add_generation_prompt"):
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        return v


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(default=None, min_length=1, max_length=300)
    tokens: list[TokenId] = Field(max_length=1 << 17)
    adapters: None = None
    merge: None = None


def _tokenize_kind(body: Any) -> str:
    return "chat" if isinstance(body, dict) and "messages" in body else "completion"


# /tokenize's body: chat messages when it has "messages", else a prompt (so that errors name the right fields)
TokenizeRequest = Annotated[Annotated[TokenizeChatRequest, Tag("chat")] | Annotated[TokenizeCompletionRequest,
                                                                                      Tag("completion")],
                            Discriminator(_tokenize_kind)]
