"""Prefix caching: a request whose prompt starts with blocks an earlier request of the same identity computed
reuses them and gets the same logits as without them (base, adapters, mixtures, against PEFT); another adapter,
the base, or the same name with other weights never reads them; a conversation's next turn reuses the previous
turn's generated tokens; cached blocks are evicted least recently used when the pool needs them; no block leaks."""

from __future__ import annotations

import pytest
import torch
from engine_fixtures import make_engine
from test_engine import peft_greedy

from loraplex.server.engine.sampling import SamplingParams
from loraplex.server.lora.weights import LoraModule, LoraWeights

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)
PROMPT = [(7 * i) % 120 + 1 for i in range(45)]  # 2 full blocks of 16 and a partial one


def _run(engine, prompt, adapters):
    [seq] = engine.generate([prompt], GREEDY, [adapters])
    return seq


@pytest.mark.parametrize("adapters", [None, "qv4", [("qv4", 0.7), ("all8", -0.4)]], ids=["base", "lora", "mixture"])
def test_a_cache_hit_gives_the_logits_of_a_fresh_computation(folders, reference, adapters):
    engine = make_engine(folders)
    cold = _run(engine, PROMPT, adapters)
    queries, hits = engine.pool.queries, engine.pool.hits
    assert hits == 0 and engine.pool.cached_blocks >= 2
    warm = _run(engine, PROMPT, adapters)
    assert engine.pool.hits - hits == 32  # two full blocks; the partial block and the last token are computed
    assert warm.output_ids == cold.output_ids
    torch.testing.assert_close(torch.tensor(warm.logprobs), torch.tensor(cold.logprobs), atol=1e-5, rtol=0)
    if isinstance(adapters, str) or adapters is None:
        assert warm.output_ids == peft_greedy(reference, PROMPT, adapters, GREEDY.max_tokens)
    assert engine.pool.used_blocks == 0 and engine.pool.queries > queries


def test_a_prefix_cached_under_one_identity_is_never_read_by_another(folders, reference):
    engine = make_engine(folders)
    for adapters in ("qv4", "all8", None, [("qv4", 0.5)], [("qv4", 0.5), ("all8", 0.5)], [("all8", 0.5), ("qv4", 0.5)]):
        hits = engine.pool.hits
        seq = _run(engine, PROMPT, adapters)
        assert engine.pool.hits == hits, adapters  # each identity computes its own prefix
        if adapters in ("qv4", "all8", None):
            assert seq.output_ids == peft_greedy(reference, PROMPT, adapters, GREEDY.max_tokens)
    hits = engine.pool.hits
    _run(engine, PROMPT, "all8")
    assert engine.pool.hits == hits + 32  # while its own identity finds it
    assert engine.pool.used_blocks == 0


def test_identity_is_the_content_not_the_name(folders):
    engine = make_engine(folders)
    same = LoraWeights.load(folders["qv4"], "qv4-copy")
    other = LoraWeights("qv4-changed", {k: LoraModule(m.a, m.b * 2, m.scale) for k, m in same.modules.items()})
    engine.register_adapter("qv4-copy", lambda _n: same)
    engine.register_adapter("qv4-changed", lambda _n: other)
    _run(engine, PROMPT, "qv4")
    hits = engine.pool.hits
    _run(engine, PROMPT, "qv4-changed")  # e.g. a folder reloaded with new weights, or a version behind an alias
    assert engine.pool.hits == hits
    _run(engine, PROMPT, "qv4-copy")  # identical bytes compute identical keys and values: sharing is exact
    assert engine.pool.hits == hits + 32


def test_a_prefix_is_shared_only_under_the_same_cache_salt(folders, reference):
    """Two tenants on one adapter: each key's salt gives it its own cached blocks (no timing side channel), the
    same salt shares them, and a salted request computes exactly what an unsalted one does."""
    engine = make_engine(folders)

    def run(adapters, salt):
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0, cache_salt=salt)
        [seq] = engine.generate([PROMPT], params, [adapters])
        return seq

    plain = run("qv4", None)
    for salt in ("key:acme", "key:globex", "key:acme\x00conversation-7"):
        hits = engine.pool.hits
        seq = run("qv4", salt)
        assert engine.pool.hits == hits, salt  # nothing cached under another salt (or none) is read
        assert seq.output_ids == plain.output_ids
        torch.testing.assert_close(torch.tensor(seq.logprobs), torch.tensor(plain.logprobs), atol=1e-5, rtol=0)
    hits = engine.pool.hits
    assert run("qv4", "key:acme").output_ids == plain.output_ids
    assert engine.pool.hits == hits + 32  # the same key finds its own prefix
    hits = engine.pool.hits
    run(None, "key:acme")  # the same salt on the base: still its own identity
    assert engine.pool.hits == hits
    assert plain.output_ids == peft_greedy(reference, PROMPT, "qv4", GREEDY.max_tokens)
    assert engine.pool.used_blocks == 0


@pytest.mark.parametrize("salt", ["", "x" * 513, 7])
def test_a_cache_salt_is_a_bounded_string(salt):
    with pytest.raises(ValueError, match="cache_salt"):
        SamplingParams(cache_salt=salt)


def test_the_next_turn_reuses_the_generated_tokens(folders, reference):
    engine = make_engine(folders)
    first = _run(engine, PROMPT[:30], "all8")
    turn2 = PROMPT[:30] + first.output_ids + [5, 6, 7, 8, 9, 10]  # 44 tokens: 2 full blocks from turn one
    hits = engine.pool.hits
    second = _run(engine, turn2, "all8")
    assert engine.pool.hits - hits == 32  # past the first turn's prompt: its generated tokens were kept too
    assert second.output_ids == peft_greedy(reference, turn2, "all8", GREEDY.max_tokens)


def test_cached_blocks_are_evicted_least_recently_used_when_the_pool_needs_them(folders):
    per_block = make_engine(folders).cache.block_nbytes
    engine = make_engine(folders, kv_cache_gib=9 * per_block / (1 << 30))  # 8 blocks and the null block
    a = [1 + i % 50 for i in range(33)]
    b = [60 + i % 50 for i in range(33)]
    want_b = _run(engine, b, None).output_ids
    _run(engine, a, None)  # both prompts' 2 full blocks each are cached: 4 of 8
    assert engine.pool.cached_blocks == 4
    _run(engine, a, None)  # a is used again: b's blocks are now the least recently used
    long = [90 + i % 30 for i in range(100)]
    _run(engine, long, None)  # needs 7 blocks: 4 free + 3 evicted, b's first (LRU), then a's last block
    hits = engine.pool.hits
    _run(engine, a, None)
    assert engine.pool.hits - hits == 16  # a's first block survived, its second did not
    hits = engine.pool.hits
    assert _run(engine, b, None).output_ids == want_b and engine.pool.hits == hits  # b was evicted: computed again
    assert engine.pool.used_blocks == 0
