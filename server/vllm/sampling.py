"""loraplex's ``SamplingParams`` as vLLM's: the same knobs, one to one.

Both use the same conventions: temperatures below 1e-5 are greedy, ``top_k`` 0 or -1 is off, logprobs
are the model's raw log-probabilities (vLLM V1's default ``logprobs_mode``, and what the native sampler
reports), stop strings are cut from the text, and the stop token is not part of it.
"""

from __future__ import annotations

from ..engine.request import SamplingParams


def to_vllm(params: SamplingParams):
    """vLLM ``SamplingParams`` streaming deltas (each output carries only the new tokens and text)."""
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.sampling_params import RequestOutputKind

    return VllmSamplingParams(
        n=1,
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        min_p=params.min_p,
        seed=params.seed,
        stop=list(params.stop),
        stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty,
        logprobs=params.logprobs,
        logit_bias=dict(params.logit_bias) or None,
        prompt_logprobs=params.prompt_logprobs,
        skip_special_tokens=True,
        output_kind=RequestOutputKind.DELTA,
    )
