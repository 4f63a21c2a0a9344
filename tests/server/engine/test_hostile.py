"""Engine hygiene (issue 12): no request reaches another's output, and adapter slots cannot deadlock.

The hostile request here is one whose activations overflow: an in-memory adapter with values of 1e30 (finite,
so it loads; validation refuses such a folder, and it stands for any request that drives its activations to
inf) turns its queries, keys, values and hidden states into inf and NaN. The requests beside it in the batch,
and the one that gets its KV slot after it, must still get PEFT's logits.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine_fixtures import make_engine, make_peft_adapters, peft_reference, tiny_llama
from loraplex.server.engine.batch import Work, build_step
from loraplex.server.engine.engine import Engine, EngineConfig
from loraplex.server.engine.sampling import SamplingParams
from loraplex.server.lora.weights import LoraModule, LoraWeights

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)




def random_adapter(engine: Engine, name: str, seed: int, magnitude: float = 0.1, rank: int = 4) -> None:
    """Register an in-memory adapter on every projection: random factors of the given magnitude."""
    shapes = engine.decoder.module_shapes()

    def load(_name: str) -> LoraWeights:
        g = torch.Generator().manual_seed(seed)
        return LoraWeights(name, {k: LoraModule(torch.randn(rank, i, generator=g) * magnitude,
                                                torch.randn(o, rank, generator=g) * magnitude, 1.0)
                                  for k, (i, o) in sorted(shapes.items())})

    engine.register_adapter(name, load)


def peft_logits(reference, ids, adapter):
    with torch.no_grad():
        if adapter is None:
            with reference.disable_adapter():
                return reference(torch.tensor([ids])).logits[0]
        reference.set_adapter(adapter)
        return reference(torch.tensor([ids])).logits[0]


def spy_logits(engine: Engine) -> dict[tuple[int, ...], list[tuple[list[int], torch.Tensor]]]:
    """Record every sampled row's logits: prompt -> [(tokens generated before, logits)]."""
    seen: dict[tuple[int, ...], list] = {}
    sample = engine.sampler.sample

    def spy(logits, params, generators, prompts, outputs):
        for i, (prompt, out) in enumerate(zip(prompts, outputs)):
            seen.setdefault(tuple(prompt), []).append((list(out), logits[i].clone()))
        return sample(logits, params, generators, prompts, outputs)

    engine.sampler.sample = spy
    return seen


def assert_matches_peft(reference, seen, prompt, adapter, steps):
    rows = seen[tuple(prompt)]
    assert len(rows) == steps
    for out, logits in rows:
        torch.testing.assert_close(logits, peft_logits(reference, list(prompt) + out, adapter)[-1], atol=2e-5, rtol=1e-4)


def resident(engine: Engine, name: str) -> int:
    while (slot := engine.adapters.slot_for(name)) is None:
        engine.adapters.wait_idle(30)
        engine.adapters.poll()
    return slot


def test_a_hostile_adapter_in_the_batch_leaves_every_other_row_as_peft_computes_it(folders, reference):
    """One prefill step: the hostile segment is shorter than the longest, so it is padded. A pad that read row 0
    (the victim's first token) through the hostile adapter got an inf delta, and 0 * inf = NaN went back into
    the victim's row; a pad must never touch another request's row."""
    engine = make_engine(folders)
    random_adapter(engine, "hostile", seed=7, magnitude=1e30)
    slots = {name: resident(engine, name) for name in ("qv4", "hostile", "all8")}
    requests = [([3, 1, 4], "qv4"), ([9, 9], "hostile"), ([2, 7, 1, 8, 2, 8], "all8"), ([5, 6, 7, 8], None)]
    work = [Work(p, 0, engine.pool.allocate(engine.pool.blocks_for(len(p))), [(slots[a], 1.0)] if a else [], True) for i, (p, a) in enumerate(requests)]
    batch, _, _ = build_step(work, engine.bank.ranks, torch.float32, "cpu", engine.cache.block_size)
    assert batch.lora.gather is not None and batch.lora.seg_len == 6  # the hostile segment has 4 pads
    batch = dataclasses.replace(batch, logit_rows=torch.arange(batch.input_ids.numel()))
    logits = engine.decoder.forward(batch, engine.cache, engine.bank)
    row = 0
    for prompt, adapter in requests:
        got = logits[row:row + len(prompt)]
        if adapter == "hostile":
            assert not got.isfinite().all()  # it really overflowed
        else:
            torch.testing.assert_close(got, peft_logits(reference, prompt, adapter), atol=2e-5, rtol=1e-4)
        row += len(prompt)


def test_nothing_a_hostile_request_leaves_in_its_kv_blocks_reaches_the_next_one(folders, reference):
    """The hostile request fills its KV blocks with inf/NaN beside a bystander, then finishes; the victim gets
    its first block and decodes beside a longer request, so it reads that block's tail under the mask every step."""
    engine = make_engine(folders)
    random_adapter(engine, "hostile", seed=7, magnitude=1e30)
    resident(engine, "hostile")
    seen = spy_logits(engine)
    hostile_prompt, bystander = list(range(1, 41)), [2, 4, 6, 8]
    rid = engine.add_request(hostile_prompt, dataclasses.replace(GREEDY, max_tokens=3), adapters="hostile")
    engine.add_request(bystander, GREEDY)
    hostile = engine._seqs[rid]
    engine.step()
    blocks = list(hostile.blocks)
    assert not engine.cache.k[:, :, blocks].isfinite().all()  # its keys overflowed
    while engine.has_work():
        engine.step()
    assert_matches_peft(reference, seen, bystander, None, GREEDY.max_tokens)

    victim, longer = [1, 5, 9, 13], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3] * 3
    vid = engine.add_request(victim, GREEDY, adapters="qv4")
    engine.add_request(longer, GREEDY, adapters="all8")
    v = engine._seqs[vid]
    while not v.finished:
        engine.step()
        engine.adapters.wait_idle(30)
        if v.blocks:  # its partial last block (not kept for reuse) is the lowest free block: the victim's first
            assert v.blocks[0] == blocks[-1]  # the victim decodes in a block the hostile request filled
    assert_matches_peft(reference, seen, victim, "qv4", GREEDY.max_tokens)
    assert_matches_peft(reference, seen, longer, "all8", GREEDY.max_tokens)


def test_concurrent_mixtures_with_more_distinct_adapters_than_slots_all_finish(folders):
    """Three mixtures of 3 distinct adapters each and single-adapter requests on 4 slots: each set is placed
    whole or not at all, so no mixture pins a part of its set while it waits; every request finishes with the
    tokens it gets alone."""
    def engine_with_adapters() -> Engine:
        engine = make_engine(folders, max_loras=4)
        for i in range(9):
            random_adapter(engine, f"m{i}", seed=100 + i, rank=2 + i % 3)
        return engine

    requests = [
        ([1, 2, 3], [("m0", 0.5), ("m1", 0.3), ("m2", -0.4)]),
        ([4, 5, 6, 7], [("m3", 1.0), ("m4", 0.7), ("m5", 0.2)]),
        ([8, 9], [("m6", 0.6), ("m7", 0.6), ("m8", 0.6)]),
        ([10, 11, 12], "qv4"), ([13, 14], "m4"), ([15, 16, 17], "all8"), ([18, 19], None),
        ([20, 21, 22], [("m8", 1.0), ("m0", 0.5), ("qv4", 0.5)]),
    ]
    engine = engine_with_adapters()
    ids = [engine.add_request(p, GREEDY, adapters=a) for p, a in requests]
    seqs = [engine._seqs[i] for i in ids]
    for _ in range(500):
        if not engine.has_work():
            break
        engine.step()
        if not engine.scheduler.running:
            engine.adapters.wait_idle(30)
    assert all(s.finished and s.finish_reason == "length" for s in seqs), [s.request_id for s in seqs if not s.finished]
    for seq, (prompt, adapters) in zip(seqs, requests):
        [alone] = engine_with_adapters().generate([prompt], GREEDY, [adapters])
        assert seq.output_ids == alone.output_ids, adapters
    assert all(engine.adapters.refs(f"m{i}") == 0 for i in range(9))


def test_a_mixture_with_more_adapters_than_slots_is_refused_at_add_request(folders):
    engine = make_engine(folders, max_loras=2)
    with pytest.raises(ValueError, match=r"needs 3 distinct adapters at once but the engine has 2 adapter slots"):
        engine.add_request([1, 2], GREEDY, adapters=[("qv4", 0.5), ("all8", 0.5), ("mlp16rs", 0.5)])
    assert not engine.has_work()
