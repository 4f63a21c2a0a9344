from __future__ import annotations

import math

import pytest
import torch

from loraplex.server.engine.sampling import (
    Sampler,
    SampleOutput,
    SamplingParams,
    _truncate,
    apply_penalties,
    make_generator,
)

V = 64


def _run(sampler: Sampler, logits: torch.Tensor, params: list[SamplingParams],
         gens: list[torch.Generator | None] | None = None,
         prompt: list[list[int]] | None = None, output: list[list[int]] | None = None) -> SampleOutput:
    b = logits.shape[0]
    return sampler.sample(logits, params, gens if gens is not None else [None] * b,
                          prompt if prompt is not None else [[] for _ in range(b)],
                          output if output is not None else [[] for _ in range(b)])


def _logits(b: int, v: int = V, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * scale


def _from_probs(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().float().unsqueeze(0)


# --- SamplingParams -----------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("max_tokens", 1.5), ("max_tokens", True),
    ("temperature", -0.1), ("temperature", 2.01), ("temperature", float("nan")),
    ("temperature", "1"),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", -1.0),
    ("top_k", -2), ("top_k", 2.0),
    ("min_p", -0.1), ("min_p", 1.1),
    ("seed", 1.5), ("seed", "7"),
    ("stop", tuple(str(i) for i in range(17))), ("stop", ("",)), ("stop", (3,)),
    ("stop_token_ids", (-1,)), ("stop_token_ids", ("a",)),
    ("ignore_eos", 1),
    ("presence_penalty", 2.1), ("presence_penalty", -2.1),
    ("frequency_penalty", 2.5), ("frequency_penalty", -3),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.inf),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", 2.0),
    ("logit_bias", ((1, 101.0),)), ("logit_bias", ((1, math.nan),)), ("logit_bias", ((-1, 1.0),)),
    ("logit_bias", ((1, 1.0), (1, 2.0))), ("logit_bias", ((1,),)), ("logit_bias", ((True, 1.0),)),
    ("logit_bias", tuple((i, 1.0) for i in range(1025))),
])
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be ") as info:
        SamplingParams(**{field: value})
    assert "\n" not in str(info.value)


def test_valid_params_and_normalization():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.logprobs) == (16, 1.0, 1.0, 0, None)
    assert not p.greedy and not p.penalized and not p.truncated
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(stop="END").stop == ("END",)
    assert SamplingParams(stop=["a", "b"], stop_token_ids=[2]).stop_token_ids == (2,)
    for ok in (dict(top_k=-1), dict(top_k=1), dict(temperature=2), dict(top_p=1e-9),
               dict(presence_penalty=-2), dict(logprobs=0), dict(logprobs=20), dict(seed=-5),
               dict(seed=2**64 - 1), dict(seed=-(2**63)), dict(stop=tuple("x" * 16))):
        SamplingParams(**ok)
    for bad in (dict(seed=2**64), dict(seed=2**70), dict(seed=-(2**63) - 1)):  # past what a generator takes
        with pytest.raises(ValueError, match="seed"):
            SamplingParams(**bad)
    with pytest.raises(AttributeError):
        p.temperature = 0.5  # frozen


def test_make_generator():
    assert make_generator(None) is None
    a, b = make_generator(123), make_generator(123)
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))
    assert make_generator(-1) is not None and make_generator(2**64 + 3) is not None


# --- greedy and its limits ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_is_argmax(dtype):
    logits = _logits(8).to(dtype)
    out = _run(Sampler(seed=0), logits, [SamplingParams(temperature=0)] * 8)
    assert out.token_ids.dtype == torch.int64 and out.token_ids.shape == (8,)
    assert torch.equal(out.token_ids, logits.float().argmax(dim=1))


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1e-3),
    SamplingParams(top_k=1),
    SamplingParams(top_p=1e-6),
    SamplingParams(temperature=1.5, top_k=1, top_p=0.9),
    SamplingParams(min_p=1.0),
], ids=["low-temperature", "top_k=1", "tiny-top_p", "top_k=1+top_p", "min_p=1"])
def test_limits_equal_greedy(params):
    logits = _logits(16, scale=3.0)
    sampler = Sampler(seed=1)
    for _ in range(3):
        out = _run(sampler, logits, [params] * 16)
        assert torch.equal(out.token_ids, logits.argmax(dim=1))


def test_input_logits_are_not_modified():
    logits = _logits(4)
    before = logits.clone()
    _run(Sampler(seed=0), logits,
         [SamplingParams(repetition_penalty=1.3, temperature=0.7, top_k=5, top_p=0.8)] * 4,
         output=[[1, 2, 3]] * 4, prompt=[[4]] * 4)
    assert torch.equal(logits, before)


# --- truncation ---------------------------------------------------------------------------------

def test_top_k_restricts_support():
    logits = _logits(1, scale=0.3).repeat(600, 1)  # flat-ish: without top-k most tokens appear
    top5 = set(logits[0].topk(5).indices.tolist())
    out = _run(Sampler(seed=2), logits, [SamplingParams(top_k=5)] * 600)
    assert set(out.token_ids.tolist()) == top5
    out = _run(Sampler(seed=2), logits, [SamplingParams()] * 600)
    assert len(set(out.token_ids.tolist())) > 30


def _kept(probs: list[float], **knobs) -> set[int]:
    masked = _truncate(_from_probs(probs), [SamplingParams(**knobs)])
    return set(torch.isfinite(masked[0]).nonzero().flatten().tolist())


def test_top_p_keeps_smallest_set_reaching_p():
    probs = [0.05, 0.5, 0.15, 0.3]  # sorted: 1 (.5), 3 (.3), 2 (.15), 0 (.05)
    assert _kept(probs, top_p=0.4) == {1}
    assert _kept(probs, top_p=0.75) == {1, 3}
    assert _kept(probs, top_p=0.9) == {1, 3, 2}
    assert _kept(probs, top_p=0.99) == {0, 1, 2, 3}
    assert _kept(probs, top_p=1.0) == {0, 1, 2, 3}
    masked = _truncate(_from_probs(probs), [SamplingParams(top_p=0.75)])
    assert masked[0, 1] == _from_probs(probs)[0, 1]  # kept logits are untouched
    out = _run(Sampler(seed=3), _from_probs(probs).repeat(400, 1), [SamplingParams(top_p=0.75)] * 400)
    assert set(out.token_ids.tolist()) == {1, 3}


def test_top_p_applies_to_the_renormalized_top_k():
    probs = [0.4, 0.3, 0.2, 0.1]
    assert _kept(probs, top_p=0.5) == {0, 1}
    assert _kept(probs, top_k=2, top_p=0.5) == {0}  # 0.4 / 0.7 > 0.5
    assert _kept(probs, top_k=3) == {0, 1, 2}
    assert _kept(probs, top_k=100) == {0, 1, 2, 3}


def test_min_p_is_relative_to_the_top_token():
    probs = [0.5, 0.3, 0.15, 0.05]
    assert _kept(probs, min_p=0.2) == {0, 1, 2}  # threshold 0.1
    assert _kept(probs, min_p=0.5) == {0, 1}  # threshold 0.25
    assert _kept(probs, min_p=0.7) == {0}
    assert _kept(probs, min_p=0.0) == {0, 1, 2, 3}
    out = _run(Sampler(seed=4), _from_probs(probs).repeat(400, 1), [SamplingParams(min_p=0.5)] * 400)
    assert set(out.token_ids.tolist()) == {0, 1}


# --- seeds --------------------------------------------------------------------------------------

def _seeded_run(seed: int, steps: int, position: int, others: list[SamplingParams],
                sampler_seed: int) -> list[int]:
    """Tokens of a seeded request at ``position`` among ``others``, feeding its tokens back."""
    params = SamplingParams(seed=seed, temperature=1.2, top_p=0.95, frequency_penalty=0.5)
    batch = others[:position] + [params] + others[position:]
    gens = [make_generator(p.seed) for p in batch]
    outputs: list[list[int]] = [[] for _ in batch]
    sampler = Sampler(seed=sampler_seed)
    for step in range(steps):
        logits = _logits(len(batch), seed=100 + step, scale=0.5)
        logits[position] = _logits(1, seed=100 + step, scale=0.5)[0]  # its logits: its history only
        out = _run(sampler, logits, batch, gens, [[1, 2]] * len(batch), outputs)
        for row, tok in zip(outputs, out.token_ids.tolist()):
            row.append(tok)
    return outputs[position]


def test_seeded_request_is_reproducible_and_independent_of_the_batch():
    alone = _seeded_run(42, 12, 0, [], sampler_seed=0)
    assert alone == _seeded_run(42, 12, 0, [], sampler_seed=99)
    assert len(set(alone)) > 3  # it really samples
    others = [SamplingParams(), SamplingParams(temperature=0), SamplingParams(seed=7, top_k=3),
              SamplingParams(temperature=0.3, min_p=0.1, repetition_penalty=1.2, logprobs=3)]
    for position in (0, 2, 4):
        assert _seeded_run(42, 12, position, others, sampler_seed=position) == alone
    assert _seeded_run(43, 12, 0, [], sampler_seed=0) != alone


def test_greedy_rows_consume_no_randomness():
    logits = _logits(3)
    gen = make_generator(5)
    state = gen.get_state()
    _run(Sampler(seed=0), logits[:1], [SamplingParams(temperature=0, seed=5)], [gen])
    assert torch.equal(gen.get_state(), state)
    lone = _run(Sampler(seed=8), logits[2:], [SamplingParams()]).token_ids
    mixed = _run(Sampler(seed=8), logits, [SamplingParams(temperature=0)] * 2 + [SamplingParams()])
    assert mixed.token_ids[2] == lone[0]


def test_length_mismatch_is_rejected():
    with pytest.raises(ValueError):
        Sampler().sample(_logits(2), [SamplingParams()], [None], [[]], [[]])


# --- penalties ----------------------------------------------------------------------------------

RAW = torch.tensor([[2.0, -1.0, 0.5, -0.5, 3.0]])


def _pen(prompt: list[int], output: list[int], **knobs) -> list[float]:
    return apply_penalties(RAW, [SamplingParams(**knobs)], [prompt], [output])[0].tolist()


def test_repetition_penalty_divides_positive_multiplies_negative_on_prompt_and_output():
    assert _pen([0], [1, 1, 2], repetition_penalty=2.0) == [1.0, -2.0, 0.25, -0.5, 3.0]
    assert _pen([3], [], repetition_penalty=0.5) == [2.0, -1.0, 0.5, -0.25, 3.0]


def test_frequency_and_presence_use_output_tokens_only():
    assert _pen([0, 3], [1, 1, 2], frequency_penalty=0.5) == pytest.approx([2.0, -2.0, 0.0, -0.5, 3.0])
    assert _pen([0, 3], [1, 1, 2], presence_penalty=0.3) == pytest.approx([2.0, -1.3, 0.2, -0.5, 3.0])
    assert _pen([0], [4, 4, 4], frequency_penalty=-1.0) == pytest.approx([2.0, -1.0, 0.5, -0.5, 6.0])


def test_penalties_compose_in_vllm_order():
    got = _pen([0], [1, 1, 2], repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.3)
    assert got == pytest.approx([1.0, -3.3, -0.55, -0.5, 3.0])


def test_penalties_per_row_and_out_of_range_ids_ignored():
    raw = RAW.repeat(2, 1)
    params = [SamplingParams(presence_penalty=1.0), SamplingParams(repetition_penalty=2.0)]
    got = apply_penalties(raw, params, [[], [4, 99, -1]], [[0, 5], []])
    assert got[0].tolist() == [1.0, -1.0, 0.5, -0.5, 3.0]
    assert got[1].tolist() == [2.0, -1.0, 0.5, -0.5, 1.5]


def test_sampler_applies_penalties_only_where_asked():
    logits = torch.tensor([[3.0, 2.9, 0.0]] * 2)
    params = [SamplingParams(temperature=0, repetition_penalty=1.2), SamplingParams(temperature=0)]
    out = _run(Sampler(), logits, params, output=[[0], [0]])
    assert out.token_ids.tolist() == [1, 0]


# --- logprobs -----------------------------------------------------------------------------------

def test_logprobs_are_raw_model_logprobs_of_the_chosen_token():
    logits = _logits(4, scale=2.0).to(torch.bfloat16)
    params = [SamplingParams(temperature=0.5, repetition_penalty=1.5, top_k=4, logprobs=0),
              SamplingParams(temperature=0, logprobs=5), SamplingParams(logprobs=20),
              SamplingParams(top_p=0.5)]
    out = _run(Sampler(seed=0), logits, params, output=[[0, 1, 2]] * 4)
    ref = torch.log_softmax(logits.float(), dim=1)
    assert out.logprobs.dtype == torch.float32 and out.logprobs.shape == (4,)
    torch.testing.assert_close(out.logprobs[:3], ref.gather(1, out.token_ids[:, None])[:3, 0])
    assert out.logprobs[3].isnan()  # the last row did not ask
    top = out.top_logprobs
    assert top is not None and [len(t) for t in top] == [0, 5, 20, 0]
    for row, alts in enumerate(top):
        values = [lp for _, lp in alts]
        assert values == sorted(values, reverse=True)
        for tok, lp in alts:
            assert lp == pytest.approx(ref[row, tok].item(), abs=1e-6)
    assert top[1][0][0] == out.token_ids[1].item()  # greedy picks the top alternative


def test_no_top_logprobs_unless_asked():
    out = _run(Sampler(seed=0), _logits(2), [SamplingParams()] * 2)
    assert out.top_logprobs is None and out.logprobs.shape == (2,)
    assert out.logprobs.isnan().all()  # not computed for rows that did not ask
    logits = _logits(3)
    out = _run(Sampler(seed=0), logits, [SamplingParams(), SamplingParams(logprobs=2), SamplingParams()])
    ref = torch.log_softmax(logits.float(), dim=1)
    assert out.logprobs[[0, 2]].isnan().all()
    assert out.logprobs[1].item() == pytest.approx(ref[1, out.token_ids[1]].item(), abs=1e-6)
    assert out.top_logprobs is not None and [len(t) for t in out.top_logprobs] == [0, 2, 0]
    assert [t for t, _ in out.top_logprobs[1]] == ref[1].topk(2).indices.tolist()


# --- a mixed batch ------------------------------------------------------------------------------

def test_mixed_batch_in_one_call():
    logits = _logits(6, scale=2.0)
    params = [SamplingParams(temperature=0), SamplingParams(seed=1, top_k=2),
              SamplingParams(top_p=1e-6), SamplingParams(presence_penalty=2.0, temperature=0),
              SamplingParams(min_p=1.0, temperature=2.0), SamplingParams(logprobs=2, top_k=3)]
    gens = [make_generator(p.seed) for p in params]
    out = _run(Sampler(seed=0), logits, params, gens, output=[[int(logits[3].argmax())]] * 6)
    tok = out.token_ids.tolist()
    assert tok[0] == logits[0].argmax() and tok[2] == logits[2].argmax()
    assert tok[1] in logits[1].topk(2).indices.tolist()
    penalized = logits[3].clone()
    penalized[logits[3].argmax()] -= 2.0
    assert tok[3] == penalized.argmax()
    assert tok[4] == logits[4].argmax()
    assert tok[5] in logits[5].topk(3).indices.tolist()
    assert out.top_logprobs is not None and [len(t) for t in out.top_logprobs] == [0] * 5 + [2]


# --- statistics ---------------------------------------------------------------------------------

PROBS = [0.35, 0.25, 0.15, 0.12, 0.08, 0.05]


def _chi_square(tokens: list[int]) -> float:
    n = len(tokens)
    counts = torch.bincount(torch.tensor(tokens), minlength=len(PROBS)).tolist()
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, PROBS))


def test_temperature_one_follows_the_distribution_batched():
    out = _run(Sampler(seed=11), _from_probs(PROBS).repeat(2000, 1), [SamplingParams()] * 2000)
    assert _chi_square(out.token_ids.tolist()) < 25  # df = 5; p < 1e-4 for a correct sampler


def test_temperature_one_follows_the_distribution_seeded():
    gen, sampler, logits = make_generator(2024), Sampler(), _from_probs(PROBS)
    params = [SamplingParams(seed=2024)]
    tokens = [_run(sampler, logits, params, [gen]).token_ids.item() for _ in range(2000)]
    assert _chi_square(tokens) < 25


def test_logit_bias_moves_only_its_rows_and_leaves_logprobs_raw():
    """+100 forces the token in greedy and sampled rows, -100 bans the argmax; rows without a bias are unchanged;
    the reported logprobs stay the raw model's (as OpenAI's: the bias is a knob, not the model)."""
    logits = _logits(4)
    top = int(logits[1].argmax())
    params = [SamplingParams(temperature=0, logit_bias=((7, 100.0),), logprobs=0),
              SamplingParams(temperature=0, logit_bias=((top, -100.0),)),
              SamplingParams(temperature=0.8, seed=3, logit_bias=((9, 100.0),)),
              SamplingParams(temperature=0, logprobs=0)]
    out = _run(Sampler(seed=0), logits, params, gens=[None, None, make_generator(3), None])
    tokens = out.token_ids.tolist()
    assert tokens[0] == 7 and tokens[2] == 9 and tokens[3] == int(logits[3].argmax())
    assert tokens[1] != top and tokens[1] == int(logits[1].topk(2).indices[1])
    raw = torch.log_softmax(logits.float(), dim=1)
    assert out.logprobs[0].item() == pytest.approx(raw[0, 7].item(), abs=1e-5)
