"""Request fields of OpenAI's and vLLM's chat and completions schemas that loraplex does not serve: never dropped
in silence. A request that sets one to anything but its neutral value (the value that asks for nothing: ``None``,
``false``, an empty list, ``{"type": "text"}``...) is a 400 naming the field, so a client that relies on it learns
at once instead of reading an answer made without it. Fields in neither schema are ignored, as OpenAI does, and
logged at debug level. Fields that only label a request (``metadata``, ``service_tier``, ``prompt_cache_key``,
``request_id``...) change nothing in the answer and are accepted."""

from __future__ import annotations

import logging
from typing import Any

from pydantic_core import PydanticCustomError

log = logging.getLogger("loraplex.api")

_NONE = (None,)
_FALSE = (None, False)
_EMPTY = (None, [], {})

# field -> its neutral values (what a client may send without asking for the feature)
COMMON: dict[str, tuple] = {
    "response_format": (None, {"type": "text"}), "structured_outputs": _NONE,
    "guided_json": _NONE, "guided_regex": _NONE, "guided_choice": _NONE, "guided_grammar": _NONE,
    "guided_decoding_backend": _NONE, "guided_whitespace_pattern": _NONE, "use_beam_search": _FALSE,
    "length_penalty": (None, 1, 1.0), "include_stop_str_in_output": _FALSE, "min_tokens": (None, 0),
    "skip_special_tokens": (None, True), "spaces_between_special_tokens": (None, True),
    "truncate_prompt_tokens": _NONE, "allowed_token_ids": _NONE, "bad_words": _EMPTY,
    "logits_processors": _EMPTY, "return_tokens_as_token_ids": _FALSE, "return_token_ids": _FALSE,
    "logprob_token_ids": _NONE, "vllm_xargs": _EMPTY, "kv_transfer_params": _NONE, "ec_transfer_params": _NONE,
    "priority": (None, 0), "thinking_token_budget": _NONE, "repetition_detection": _NONE,
    "watermarking": _FALSE, "store": _FALSE, "mm_payload": _NONE,
}
CHAT: dict[str, tuple] = {
    **COMMON, "tools": _EMPTY, "tool_choice": (None, "none", "auto"), "functions": _EMPTY,
    "function_call": (None, "none", "auto"), "audio": _NONE, "modalities": (None, ["text"]),
    "prediction": _NONE, "web_search_options": _NONE, "reasoning_effort": _NONE, "verbosity": _NONE,
    "add_special_tokens": _FALSE, "documents": _EMPTY, "chat_template": _NONE, "chat_template_kwargs": _EMPTY,
    "mm_processor_kwargs": _EMPTY, "media_io_kwargs": _EMPTY, "echo": _FALSE,
}
COMPLETION: dict[str, tuple] = {
    **COMMON, "best_of": (None, 1), "suffix": (None, ""), "prompt_embeds": _NONE,
    "add_special_tokens": (None, False),
}
# fields of the two schemas that label or route a request and change nothing in its answer
LABELS = frozenset({"metadata", "service_tier", "prompt_cache_key", "safety_identifier", "request_id", "session_id",
                    "stream_interval", "truncation_side", "parallel_tool_calls", "include_reasoning",
                    "routed_experts_prompt_start", "return_token_offsets", "return_prompt_text", "return_mm_kwargs"})


def check(body: Any, table: dict[str, tuple], served: set[str]) -> None:
    """Raise a 400 (``unsupported_field``, naming it) for the first field of ``table`` set to a value that asks for
    something; log the names in neither schema. ``served``: the fields the request model declares."""
    if not isinstance(body, dict):
        return
    for name, value in body.items():
        if name in served:
            continue
        neutral = table.get(name)
        if neutral is not None:
            if not any(value == v and type(value) is type(v) or value is v for v in neutral):
                raise PydanticCustomError("unsupported_field", "`{field}` is not supported by this server",
                                          {"field": name})
        elif name not in LABELS:
            log.debug("ignored an unknown request field %r", name[:100])
