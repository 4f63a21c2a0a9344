"""A request cannot stop the engine: a failure inside a step ends that step's requests with an error (the API's
500) and the engine keeps serving; out-of-range values are refused before they reach a tensor."""

from __future__ import annotations

import pytest
import torch
from engine_fixtures import make_peft_adapters, tiny_llama

from loraplex.adapters.errors import EngineError
from loraplex.server.engine.engine import Engine, EngineConfig
from loraplex.server.engine.request import MAX_ADAPTER_WEIGHT, SamplingParams
from loraplex.server.lora.weights import LoraWeights

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
CFG = EngineConfig(max_loras=2, max_lora_rank=16, max_running=4, max_model_len=64)


def _engine(folders=None) -> Engine:
    model = tiny_llama()
    loader = (lambda n: LoraWeights.load(folders[n], n)) if folders else None
    return Engine(model, model.config, engine_config=CFG, loader=loader)


def _drain(engine: Engine) -> list:
    outs = []
    while engine.has_work():
        outs += engine.step()
        if not engine.scheduler.running and engine.scheduler.waiting:
            engine.adapters.wait_idle(30)
    return outs


def test_a_failing_step_ends_its_requests_and_the_engine_goes_on():
    want = _engine().generate([[1, 2, 3]], GREEDY)[0].output_ids
    engine = _engine()
    real, calls = engine.sampler.sample, {"n": 0}

    def faulty(*args, **kw):  # fault injection: the sampler fails on the second step
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected kernel failure")
        return real(*args, **kw)

    engine.sampler.sample = faulty
    engine.add_request([1, 2, 3], GREEDY, request_id="a")
    engine.add_request([4, 5], GREEDY, request_id="b")
    outs = _drain(engine)
    failed = {o.request_id: o for o in outs if o.error is not None}
    assert set(failed) == {"a", "b"}
    for o in failed.values():
        assert o.finished and o.finish_reason == "error" and isinstance(o.error, EngineError)
        assert "RuntimeError" in o.error.message and "injected" not in o.error.message  # no internals leak
    assert engine.pool.used_blocks == 0 and not engine.has_work()
    engine.sampler.sample = real
    assert engine.generate([[1, 2, 3]], GREEDY)[0].output_ids == want  # the same engine serves again


def test_a_failure_while_scheduling_ends_the_queue_too():
    engine = _engine()
    real = engine.scheduler.schedule

    def faulty():
        engine.scheduler.schedule = real
        raise RuntimeError("injected scheduler failure")

    engine.scheduler.schedule = faulty
    engine.add_request([1, 2, 3], GREEDY, request_id="q")
    outs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [("q", "error")]
    assert not engine.has_work() and engine.generate([[1, 2]], GREEDY)[0].output_ids


@pytest.mark.parametrize("field, value", [
    ("top_k", 2**63), ("top_k", 2**31), ("top_k", -2), ("max_tokens", 2**40), ("seed", 2**64), ("seed", -(2**63) - 1),
    ("stop_token_ids", (2**31,)), ("stop_token_ids", tuple(range(65))), ("stop", ("x" * 257,)),
    ("temperature", float("nan")), ("top_p", float("inf")), ("repetition_penalty", float("inf")),
])
def test_sampling_params_refuse_values_that_do_not_fit(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_the_engine_checks_values_against_its_model(tmp_path):
    engine = _engine(make_peft_adapters(tmp_path))
    vocab = engine.vocab_size
    with pytest.raises(ValueError, match="top_k"):
        engine.add_request([1, 2], SamplingParams(top_k=vocab + 1))
    with pytest.raises(ValueError, match="stop_token_ids"):
        engine.add_request([1, 2], SamplingParams(stop_token_ids=(vocab,)))
    for weight in (1e30, float("nan"), float("inf"), -MAX_ADAPTER_WEIGHT - 1):
        with pytest.raises(ValueError, match="weights"):
            engine.add_request([1, 2], GREEDY, adapters=[("qv4", weight), ("all8", 1.0)])
    with pytest.raises(ValueError, match="at most"):
        engine.add_request([1, 2], GREEDY, adapters=[(f"a{i}", 1.0) for i in range(9)])
    engine.add_request([1, 2], SamplingParams(top_k=vocab, max_tokens=2), request_id="edge")  # the largest that fits
    assert [o for o in _drain(engine) if o.error is not None] == []
    assert torch.isfinite(engine.cache.k[:, :, 1]).all()  # the block the edge request wrote
