"""The paged KV cache inside the engine: forced preemption leaves greedy outputs as they are (and as PEFT's);
a request that could not fit even alone is refused at admission; a 6,000-token prompt is served with the
model's full context; every block comes back when the work is done."""

from __future__ import annotations

import pytest
import torch
from engine_fixtures import make_engine, tiny_llama
from test_engine import ASSIGN, PROMPTS, peft_greedy

from loraplex.server.engine.engine import Engine, EngineConfig
from loraplex.server.engine.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


def _pool_gib(blocks: int, folders) -> float:
    """A kv_cache_gib that holds exactly ``blocks`` blocks (and the null block) of the tiny model."""
    per_block = make_engine(folders).cache.block_nbytes
    return (blocks + 1) * per_block / (1 << 30)


def test_preemption_under_a_small_pool_keeps_every_greedy_output(folders, reference):
    roomy = make_engine(folders)
    want = [s.output_ids for s in roomy.generate(PROMPTS, GREEDY, ASSIGN)]
    assert roomy.scheduler.preemptions == 0 and roomy.pool.used_blocks == 0
    # 5 requests of up to 50 tokens need up to 4 blocks of 16 each: 10 blocks make them take turns mid-flight
    tight = make_engine(folders, kv_cache_gib=_pool_gib(10, folders))
    assert tight.pool.total_blocks == 10
    # adapters load in the background: have them in host memory first, so that all five are admitted on the
    # first step whatever the machine's speed (otherwise a slow load staggers them and nobody is preempted)
    tight.adapters.prefetch({a for a in ASSIGN if a})
    tight.adapters.wait_idle()
    tight.adapters.poll()
    seqs = tight.generate(PROMPTS, GREEDY, ASSIGN)
    assert tight.scheduler.preemptions > 0 and sum(s.preemptions for s in seqs) == tight.scheduler.preemptions
    assert [s.output_ids for s in seqs] == want
    for seq, prompt, adapter in zip(seqs[:2], PROMPTS, ASSIGN):  # and they are PEFT's
        assert seq.output_ids == peft_greedy(reference, prompt, adapter, GREEDY.max_tokens)
    assert tight.pool.used_blocks == 0 and all(a["refs"] == 0 for a in tight.adapters.resident().values())


def test_a_request_that_cannot_fit_even_alone_is_refused_at_admission(folders):
    engine = make_engine(folders, kv_cache_gib=_pool_gib(3, folders))  # 48 tokens
    with pytest.raises(ValueError, match="KV cache"):
        engine.add_request(list(range(1, 30)), SamplingParams(max_tokens=20))
    [seq] = engine.generate([list(range(1, 30))], SamplingParams(max_tokens=19, temperature=0, ignore_eos=True))
    assert len(seq.output_ids) == 19 and seq.finish_reason == "length"  # 48 tokens: exactly the pool
    assert engine.pool.used_blocks == 0


def test_a_6000_token_prompt_with_the_models_full_context():
    model = tiny_llama(dims={"max_position_embeddings": 8192})
    engine = Engine(model, model.config, engine_config=EngineConfig(max_running=2, prefill_chunk=512))
    assert engine.config.max_model_len == 8192  # the model's own context, by default
    prompt = [int(t) for t in torch.randint(1, 128, (6000,), generator=torch.Generator().manual_seed(3))]
    [seq] = engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(4):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert seq.output_ids == ids[len(prompt):]
    assert engine.pool.used_blocks == 0


def test_the_engine_decodes_the_same_with_the_kernel_and_with_the_gather_path(folders):
    """On CPU decodes read the pool in place (the paged kernel); the gather + SDPA path (CUDA, or no compiler)
    gives the same greedy tokens and logprobs."""
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=0)
    engine = make_engine(folders)
    assert engine.decoder.paged
    paged = engine.generate(PROMPTS, params, ASSIGN)
    engine.decoder.paged = False
    gathered = engine.generate(PROMPTS, params, ASSIGN)
    for a, b in zip(paged, gathered):
        assert a.output_ids == b.output_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)
