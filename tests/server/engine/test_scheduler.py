"""The scheduler as a table: sequences in given states and a config in, one step's plan out.

Real parts throughout: a tiny KV cache, and an AdapterManager with a one-layer bank whose loader waits on an
event (so an adapter can be "still loading") or fails. Each case lists the sequences (request id, prompt length,
tokens already cached, tokens generated, adapter name or None, where it is: running or waiting), and the plan:
(request id, tokens this step) in order.
"""

from __future__ import annotations

import threading

import pytest
import torch

from loraplex.server.engine.request import SamplingParams
from loraplex.server.engine.scheduler import Scheduler, SchedulerConfig
from loraplex.server.engine.sequence import Sequence, Status
from loraplex.server.lora.bank import LoraBank
from loraplex.server.lora.manager import AdapterManager
from loraplex.server.lora.weights import LoraModule, LoraWeights, ModuleKey
from loraplex.server.engine.block_pool import BlockPool
from loraplex.server.model.kv_cache import CacheShape, KVCache

KEY = ModuleKey(0, "q_proj")
BLOCK = 4  # tokens per KV block


def _weights(name: str) -> LoraWeights:
    gen = torch.Generator().manual_seed(len(name))
    return LoraWeights(name, {KEY: LoraModule(torch.randn(4, 8, generator=gen), torch.randn(8, 4, generator=gen), 1.0)})


class World:
    """A scheduler over a real cache and adapter manager; adapters named 'slow*' load only after ``release``,
    'bad*' fail to load, others load at once."""

    def __init__(self, config: SchedulerConfig, kv_blocks: int = 256, lora_slots: int = 2) -> None:
        self.gate = threading.Event()

        def load(name: str) -> LoraWeights:
            if name.startswith("bad"):
                raise ValueError(f"{name} is corrupt")
            if name.startswith("slow"):
                self.gate.wait(10)
            return _weights(name)

        bank = LoraBank({KEY: (8, 8)}, lora_slots, 8, torch.float32)
        self.manager = AdapterManager(bank, load)
        self.cache = BlockPool(KVCache(CacheShape(1, kv_blocks + 1, BLOCK, 1, 2), torch.float32))  # + the null block
        self.scheduler = Scheduler(config, self.cache, self.manager)

    def add(self, rid: str, prompt: int, cached: int = 0, generated: int = 0, adapter: str | None = None,
            running: bool = False) -> Sequence:
        seq = Sequence(rid, list(range(1, prompt + 1)), SamplingParams(max_tokens=32), ((adapter, 1.0),) if adapter
                       else (), None)
        self.scheduler.add(seq)
        if adapter and not adapter.startswith(("slow", "bad")):  # resident before the step under test
            while self.manager.slot_for(adapter) is None:
                self.manager.wait_idle(10)
                self.manager.poll()
        if running:
            self.scheduler.admit(seq)
            seq.num_cached, seq.output_ids = cached, list(range(generated))
            assert self.scheduler._grow(seq, cached)  # the blocks its cached tokens are in
        return seq

    def plan(self) -> list[tuple[str, int]]:
        return [(s.seq.request_id, s.num_tokens) for s in self.scheduler.schedule()]


C = SchedulerConfig
CASES = {
    # name: (config, KV blocks of 4 tokens, sequences, expected plan)
    "decodes first, then prefill chunks, then admissions": (
        C(max_running=8, max_batched_tokens=512, prefill_chunk=256), 256,
        [dict(rid="chunking", prompt=400, cached=100, running=True), dict(rid="decoding", prompt=5, cached=6,
         generated=2, running=True), dict(rid="new", prompt=400)],
        [("decoding", 1), ("chunking", 256), ("new", 255)]),
    "the token budget caps admissions": (
        C(max_running=8, max_batched_tokens=10, prefill_chunk=256), 256,
        [dict(rid="a", prompt=6), dict(rid="b", prompt=6), dict(rid="c", prompt=6)],
        [("a", 6), ("b", 4)]),
    "max_running holds the queue": (
        C(max_running=1, max_batched_tokens=512, prefill_chunk=256), 256,
        [dict(rid="r", prompt=3, cached=4, generated=1, running=True), dict(rid="w", prompt=3)],
        [("r", 1)]),
    "no free KV block holds the queue": (
        C(max_running=8, max_batched_tokens=512, prefill_chunk=256), 2,
        [dict(rid="r", prompt=4, cached=4, generated=1, running=True), dict(rid="w", prompt=3)],
        [("r", 1)]),  # r's 5th token takes the second block
    "the pool runs out mid-flight: the newest running sequence goes back to the queue": (
        C(max_running=8, max_batched_tokens=512, prefill_chunk=256), 3,
        [dict(rid="old", prompt=4, cached=4, generated=1, running=True),
         dict(rid="new", prompt=4, cached=4, generated=1, running=True)],
        [("old", 1)]),
    "a prefill that needs blocks preempts a newer decode already planned, and nobody is admitted": (
        C(max_running=8, max_batched_tokens=512, prefill_chunk=256), 4,
        [dict(rid="chunking", prompt=12, cached=4, running=True),
         dict(rid="dec", prompt=3, cached=4, generated=2, running=True), dict(rid="w", prompt=2)],
        [("chunking", 8)]),
    "a loading adapter does not block the requests behind it": (
        C(max_running=8, max_batched_tokens=512, prefill_chunk=256), 256,
        [dict(rid="cold", prompt=3, adapter="slow-a"), dict(rid="base", prompt=2), dict(rid="warm", prompt=2,
         adapter="warm-a")],
        [("base", 2), ("warm", 2)]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_plan(name):
    config, kv_blocks, seqs, want = CASES[name]
    world = World(config, kv_blocks)
    try:
        for s in seqs:
            world.add(**s)
        assert world.plan() == want
        planned = {rid for rid, _ in want}
        assert all(s.blocks for s in world.scheduler.running)
        for s in world.scheduler.running:  # every planned sequence has the blocks for this step's tokens
            n = dict(want).get(s.request_id, 0)
            assert len(s.blocks) * BLOCK >= s.num_cached + n
        held = sum(len(s.blocks) for s in world.scheduler.running + list(world.scheduler.waiting))
        assert held == world.cache.used_blocks and all(not s.blocks for s in world.scheduler.waiting)
        assert {s.request_id for s in world.scheduler.waiting} == {s["rid"] for s in seqs} - planned
    finally:
        world.gate.set()
        world.manager.shutdown()


def test_the_cold_adapter_runs_once_loaded():
    world = World(C())
    try:
        world.add("cold", 3, adapter="slow-a")
        assert world.plan() == []
        world.gate.set()
        world.manager.wait_idle(10)
        assert world.plan() == [("cold", 3)]
    finally:
        world.manager.shutdown()


def test_a_failed_load_finishes_its_request_and_frees_its_references():
    world = World(C())
    try:
        seq = world.add("broken", 3, adapter="bad-a")
        assert world.plan() == []
        world.manager.wait_idle(10)
        assert world.plan() == []
        (failed, exc), = world.scheduler.failed
        assert failed is seq and "corrupt" in str(exc) and seq.finished
        assert world.manager.refs("bad-a") == 0 and not world.scheduler.has_work()
        assert world.cache.used_blocks == 0
    finally:
        world.manager.shutdown()


def test_finish_releases_the_kv_blocks_and_the_adapter():
    world = World(C(), kv_blocks=2)
    try:
        seq = world.add("r", 3, adapter="warm-a")
        assert world.plan() == [("r", 3)] and world.cache.free_blocks == 1 and world.manager.refs("warm-a") == 1
        world.scheduler.finish(seq)
        assert world.cache.free_blocks == 2 and world.manager.refs("warm-a") == 0 and seq.finished
    finally:
        world.manager.shutdown()


def _mixture(world: World, rid: str, names: list[str], prompt: int = 3) -> Sequence:
    seq = Sequence(rid, list(range(1, prompt + 1)), SamplingParams(max_tokens=32), tuple((n, 0.5) for n in names), None)
    world.scheduler.add(seq)
    return seq


def _loaded(world: World, *names: str) -> None:
    """In host memory, not in a slot."""
    while not world.manager.prefetch(names):
        world.manager.wait_idle(10)
        world.manager.poll()


def test_a_set_is_placed_whole_or_not_at_all_and_the_oldest_blocked_set_goes_first():
    world = World(C(), lora_slots=2)
    try:
        r = world.add("r", 3, cached=4, generated=1, adapter="a", running=True)  # holds one of the two slots
        m = _mixture(world, "m", ["b", "c"])
        world.add("base", 2)  # needs no slot
        single = _mixture(world, "single", ["d"])
        _loaded(world, "b", "c", "d")
        # m's set does not fit (one free slot): nothing of it is placed, and the younger single request may not
        # take the free slot either (m would wait for ever behind a stream of them); the base request runs
        assert world.plan() == [("r", 1), ("base", 2)]
        assert set(world.manager.resident()) >= {"b", "c", "d"}
        assert {n for n, info in world.manager.resident().items() if info["tier"] == "device"} == {"a"}
        assert world.manager.refs("b") == world.manager.refs("c") == world.manager.refs("d") == 0  # waiting pins nothing
        world.scheduler.finish(r)  # a becomes evictable: m's set fits (a is evicted), single still has no room
        assert [rid for rid, _ in world.plan()] == ["base", "m"]
        assert world.manager.refs("b") == world.manager.refs("c") == 1 and world.manager.refs("a") == 0
        world.scheduler.finish(m)
        assert [rid for rid, _ in world.plan()] == ["base", "single"] and single.status is Status.RUNNING
    finally:
        world.manager.shutdown()


def test_a_set_the_pinned_slots_leave_no_room_for_fails_its_request():
    world = World(C(), lora_slots=2)
    try:
        world.manager.pin("p")
        seq = _mixture(world, "m", ["b", "c"])
        assert world.plan() == []
        (failed, exc), = world.scheduler.failed
        assert failed is seq and seq.finished and "only 1 of 2 are not pinned" in str(exc)
        world.manager.wait_idle(10)
        world.manager.poll()
        assert world.manager.resident()["p"]["tier"] == "device" and world.manager.refs("p") == 1
        world.manager.unpin("p")
        assert world.manager.refs("p") == 0
    finally:
        world.manager.shutdown()
