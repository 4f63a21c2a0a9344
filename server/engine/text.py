"""The text side of an engine backend, over the base's transformers tokenizer: the chat template, token texts,
``/tokenize`` and ``/detokenize``. Both backends (the native engine's process and vLLM's) hold the tokenizer in the
API process and mix this in; no torch here."""

from __future__ import annotations

from typing import Any


class TokenizerText:
    tokenizer: Any  # a transformers tokenizer, or None for an engine given token ids only

    def _tok(self):
        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer: pass token ids")
        return self.tokenizer

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True,
                    continue_final_message: bool = False) -> str:
        tok = self.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise ValueError("this base model has no chat template: use /v1/completions")
        if continue_final_message and (not messages or messages[-1]["role"] != "assistant"):
            raise ValueError("continue_final_message needs the last message to be the assistant's")
        return tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                       continue_final_message=continue_final_message, tokenize=False)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else str(token_id)

    def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self._tok().encode(text, add_special_tokens=add_special_tokens))

    def _known(self, ids: list[int]) -> list[int]:
        n = len(self._tok())
        bad = next((i for i in ids if not 0 <= i < n), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is not in the vocabulary (ids 0 to {n - 1})")
        return ids

    def token_strs(self, ids: list[int]) -> list[str]:
        return list(self._tok().convert_ids_to_tokens(self._known(ids)))

    def detokenize(self, ids: list[int]) -> str:
        return self._tok().decode(self._known(ids))
