"""vLLM's streamed ``RequestOutput`` deltas as loraplex's ``RequestOutput`` (what the API consumes)."""

from __future__ import annotations

from ..engine.request import RequestOutput


class OutputStream:
    """Turns one request's vLLM delta outputs into loraplex outputs, keeping the running totals."""

    def __init__(self, request_id: str, prompt_tokens: int, adapters: tuple[tuple[str, float], ...],
                 logprobs: int | None, prompt_logprobs: int | None = None) -> None:
        self.request_id = request_id
        self.prompt_logprobs = prompt_logprobs  # alternatives asked for per prompt token, None if not asked
        self.prompt_sent = False
        self.prompt_tokens = prompt_tokens
        self.adapters = adapters
        self.logprobs = logprobs  # top logprobs asked for per token, None if none
        self.completion_tokens = 0
        self.cached_tokens = 0

    def convert(self, out) -> RequestOutput:
        """One ``vllm.outputs.RequestOutput`` (``RequestOutputKind.DELTA``) -> loraplex's."""
        done = bool(out.finished)
        comp = out.outputs[0] if out.outputs else None
        ids = list(comp.token_ids) if comp is not None else []
        self.completion_tokens += len(ids)
        values: list[float] = []
        tops: list[list[tuple[int, float]]] | None = None
        if self.logprobs is not None and comp is not None and comp.logprobs:
            # One dict per new token: token id -> Logprob(logprob, rank); the sampled token is always
            # there, besides the top ``logprobs`` ones (ranks 1..k).
            tops = []
            for tid, per_token in zip(ids, comp.logprobs):
                values.append(float(per_token[tid].logprob))
                best = sorted((lp.rank, t, lp.logprob) for t, lp in per_token.items() if lp.rank is not None
                              and lp.rank <= self.logprobs)
                tops.append([(t, float(v)) for _, t, v in best[:self.logprobs]])
        reason = comp.finish_reason if (comp is not None and done) else None
        if done and reason is None:
            reason = "abort"
        if out.num_cached_tokens is not None:  # vLLM's prefix-cache hit, with the first output
            self.cached_tokens = int(out.num_cached_tokens)
        prompt = None
        if self.prompt_logprobs is not None and not self.prompt_sent and out.prompt_logprobs is not None:
            # One dict per prompt token past the first (None): the token's Logprob and the top ``prompt_logprobs``.
            self.prompt_sent = True
            prompt = []
            for tid, per_token in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
                best = sorted((lp.rank, t, lp.logprob) for t, lp in per_token.items() if lp.rank is not None
                              and lp.rank <= self.prompt_logprobs)
                prompt.append((float(per_token[tid].logprob), int(per_token[tid].rank),
                               [(t, float(v)) for _, t, v in best[:self.prompt_logprobs]]))
        return RequestOutput(self.request_id, ids, comp.text if comp is not None else "", values, tops, done,
                             reason, self.prompt_tokens, self.completion_tokens, self.adapters,
                             cached_tokens=self.cached_tokens, prompt_logprobs=prompt,
                             prompt_token_ids=list(out.prompt_token_ids) if prompt is not None else None)
