"""The native engine against PEFT: a batch mixing base and adapters of different ranks and module
sets matches PEFT run one request at a time (fp32, tight tolerance)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine_fixtures import make_engine, make_peft_adapters, peft_reference, tiny_llama
from loraplex.server.engine.batch import Work, build_step
from loraplex.server.engine.engine import Engine, EngineConfig
from loraplex.server.engine.sampling import SamplingParams
from loraplex.server.lora.weights import LoraWeights

PROMPTS = [[1, 5, 9, 13, 17, 21], [2, 4, 6, 8], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3], [7, 7, 7], [10, 20, 30, 40, 50]]
ASSIGN = [None, "qv4", "all8", "mlp16rs", "all8"]




def peft_logits(reference, prompt, adapter):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        if adapter is None:
            with reference.disable_adapter():
                return reference(ids).logits[0]
        reference.set_adapter(adapter)
        return reference(ids).logits[0]


def peft_greedy(reference, prompt, adapter, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(peft_logits(reference, ids, adapter)[-1].argmax()))
    return ids[len(prompt):]


def test_mixed_batch_logits_match_peft_at_every_position(folders, reference):
    engine = make_engine(folders)
    slots = {}
    for name in folders:
        while (slot := engine.adapters.slot_for(name)) is None:
            engine.adapters.wait_idle(30)
            engine.adapters.poll()
        slots[name] = slot
    work = [Work(p, 0, engine.pool.allocate(engine.pool.blocks_for(len(p))), [(slots[a], 1.0)] if a else [], True) for i, (p, a) in enumerate(zip(PROMPTS, ASSIGN))]
    batch, _, _ = build_step(work, engine.bank.ranks, torch.float32, "cpu", engine.cache.block_size)
    batch = dataclasses.replace(batch, logit_rows=torch.arange(batch.input_ids.numel()))
    logits = engine.decoder.forward(batch, engine.cache, engine.bank)
    row = 0
    for prompt, adapter in zip(PROMPTS, ASSIGN):
        ref = peft_logits(reference, prompt, adapter)
        torch.testing.assert_close(logits[row:row + len(prompt)], ref, atol=2e-5, rtol=1e-4)
        row += len(prompt)


@pytest.mark.slow
def test_greedy_generation_matches_peft_token_for_token(folders, reference):
    engine = make_engine(folders)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    seqs = engine.generate(PROMPTS, params, ASSIGN)
    for seq, prompt, adapter in zip(seqs, PROMPTS, ASSIGN):
        assert seq.output_ids == peft_greedy(reference, prompt, adapter, 12), adapter
        assert seq.finish_reason == "length"


def test_weighted_mixture_matches_peft_cat_merge(folders, reference):
    engine = make_engine(folders)
    mix = [("qv4", 0.7), ("all8", 0.3), ("mlp16rs", -0.5)]
    reference.add_weighted_adapter([n for n, _ in mix], [w for _, w in mix], adapter_name="mixcat", combination_type="cat")
    try:
        params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
        [seq] = engine.generate([PROMPTS[2]], params, [mix])
        assert seq.output_ids == peft_greedy(reference, PROMPTS[2], "mixcat", 10)
    finally:
        reference.delete_adapter("mixcat")


@pytest.mark.slow
def test_tokens_do_not_change_when_others_join_and_leave(folders):
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    alone = make_engine(folders).generate([PROMPTS[2]], params, ["all8"])[0].output_ids
    engine = make_engine(folders, prefill_chunk=4, max_batched_tokens=16)
    rid = engine.add_request(PROMPTS[2], params, adapters="all8")
    seq = engine._seqs[rid]
    step = 0
    while not seq.finished:
        if step == 2:
            engine.add_request(PROMPTS[0] * 3, params, adapters="qv4", request_id="joiner")
        if step == 4:
            engine.add_request(PROMPTS[1], dataclasses.replace(params, max_tokens=3), request_id="short")
        if step == 7:
            engine.abort("joiner")
        engine.step()
        engine.adapters.wait_idle(30)
        step += 1
    assert seq.output_ids == alone


@pytest.mark.slow
def test_chunked_prefill_equals_one_shot(folders):
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompt = list(range(1, 60))
    one = make_engine(folders).generate([prompt], params, ["mlp16rs"])[0].output_ids
    chunked = make_engine(folders, prefill_chunk=7, max_batched_tokens=9).generate([prompt], params, ["mlp16rs"])[0].output_ids
    assert one == chunked


@pytest.mark.slow
def test_more_adapters_than_slots_are_swapped_without_evicting_running_ones(folders):
    engine = make_engine(folders, max_loras=2)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    seqs = engine.generate(PROMPTS[1:4] * 2, params, ASSIGN[1:4] * 2)
    ref = make_engine(folders)
    for seq, a in zip(seqs, ASSIGN[1:4] * 2):
        assert seq.output_ids == ref.generate([seq.prompt_ids], params, [a])[0].output_ids
    assert engine.adapters.stats.evictions >= 1


def test_unknown_adapter_fails_only_its_request(folders):
    engine = make_engine(folders)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    engine.add_request(PROMPTS[0], params, adapters="nope", request_id="bad")
    engine.add_request(PROMPTS[1], params, adapters="qv4", request_id="good")
    results = {}
    for _ in range(50):
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out
        if len(results) == 2:
            break
        engine.adapters.wait_idle(30)
    assert results["bad"].finish_reason == "error" and isinstance(results["bad"].error, KeyError)
    assert results["good"].finish_reason == "length" and results["good"].completion_tokens == 4


def test_abort_frees_blocks_and_adapter_reference(folders):
    engine = make_engine(folders, max_running=2)
    params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    rid = engine.add_request(PROMPTS[0], params, adapters="all8")
    for _ in range(5):
        engine.step()
        engine.adapters.wait_idle(30)
    assert engine.pool.used_blocks > 0 and engine.adapters.refs("all8") == 1
    engine.abort(rid)
    assert engine.pool.used_blocks == 0 and engine.adapters.refs("all8") == 0 and not engine.has_work()


@pytest.mark.slow
def test_smollm2_mixed_batch_matches_peft(smol_bf16, smol_cache, tmp_path):
    """The real default base (fp32 here): base + two adapters of different ranks in one batch."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from loraplex.server.model.loader import ModelSpec, load_model

    loaded = load_model(ModelSpec(quantize="none", dtype="float32", cache_dir=smol_cache))
    specs = {"s8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
             "s16": dict(r=16, lora_alpha=16, use_rslora=True, target_modules="all-linear")}
    folders = {}
    for i, (name, kw) in enumerate(specs.items()):
        torch.manual_seed(10 + i)
        pm = get_peft_model(load_model(ModelSpec(quantize="none", dtype="float32", cache_dir=smol_cache)).model,
                            LoraConfig(**kw))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn_like(p) * 0.02)
        pm.save_pretrained(tmp_path / name)
        folders[name] = tmp_path / name
    tok = loaded.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
               for q in ("What is 2+2?", "Name a colour.", "Say hi.")]
    ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
    assign = [None, "s8", "s16"]
    engine = Engine(loaded.model, loaded.config, tok, engine_config=EngineConfig(max_loras=2, max_lora_rank=16, max_running=4,
                                                                                  max_model_len=256),
                    loader=lambda n: LoraWeights.load(folders[n], n))
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    seqs = engine.generate(ids, params, assign)
    ref = PeftModel.from_pretrained(load_model(ModelSpec(quantize="none", dtype="float32", cache_dir=smol_cache)).model,
                                    str(folders["s8"]), adapter_name="s8")
    ref.load_adapter(str(folders["s16"]), adapter_name="s16")
    for seq, p, a in zip(seqs, ids, assign):
        assert seq.output_ids == peft_greedy(ref.eval(), p, a, 8), a
    assert all(seq.text for seq in seqs)


def test_a_slow_load_gets_a_bounded_share_of_the_loop_at_nice_19(folders):
    """While an adapter loads, each step yields at most load_share of its time (capped) to the loader
    thread, which runs at nice 19; the loop never waits for the load itself."""
    import os
    import threading
    import time

    release, seen = threading.Event(), {}

    def slow_loader(name):
        if name == "slow":
            seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            release.wait(60)
            name = "qv4"
        return LoraWeights.load(folders[name], name)

    model = tiny_llama()
    engine = Engine(model, model.config, engine_config=EngineConfig(max_loras=4, max_lora_rank=16, max_model_len=128,
                                                                    load_share=0.5), loader=slow_loader)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    engine.add_request(PROMPTS[0], params, adapters="qv4")
    engine.adapters.slot_for("qv4")
    engine.adapters.wait_idle(30)
    engine.add_request(PROMPTS[1], params, adapters="slow")
    t = time.perf_counter()
    for _ in range(5):  # the load blocks until released; the running request keeps decoding
        engine.step()
    assert time.perf_counter() - t < 30 and engine.adapters.loading()
    assert sum(s.num_cached for s in engine.scheduler.running) >= len(PROMPTS[0]) + 4
    if hasattr(os, "getpriority"):
        assert seen["nice"] == 19
    # a yield ends as soon as the load does, not at its timeout
    threading.Timer(0.2, release.set).start()
    t = time.perf_counter()
    engine.adapters.yield_to_loads(30.0)
    assert time.perf_counter() - t < 20 and not engine.adapters.loading()
    engine.adapters.yield_to_loads(30.0)  # nothing left to wait for: returns at once
    with pytest.raises(ValueError, match="load_share"):
        EngineConfig(load_share=1.0)


@pytest.mark.parametrize("chunk", [256, 3])
def test_prompt_logprobs_equal_pefts_with_adapters_chunks_and_a_warm_prefix_cache(folders, reference, chunk):
    """prompt_logprobs (the scoring lm-evaluation-harness asks for): each prompt token's logprob under the
    model and adapter given everything before it, equal to PEFT's in float32; the same in prefill chunks of 3
    tokens and when the prompt's blocks are already cached (a scoring request computes every token anyway);
    asked alternatives are the top ones; a request that did not ask gets none."""
    engine = make_engine(folders, prefill_chunk=chunk, block_size=4)
    warm = engine.generate(PROMPTS, SamplingParams(max_tokens=1, temperature=0), ASSIGN)  # fills the prefix cache
    assert all(s.prompt_logprobs == [] for s in warm)
    seqs = engine.generate(PROMPTS, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3), ASSIGN)
    for seq, prompt, adapter in zip(seqs, PROMPTS, ASSIGN):
        ref = torch.log_softmax(peft_logits(reference, prompt, adapter).float(), dim=-1)  # [len, V]
        want = [float(ref[j, prompt[j + 1]]) for j in range(len(prompt) - 1)]
        got = [lp for lp, _, _ in seq.prompt_logprobs]
        assert got == pytest.approx(want, abs=5e-5), adapter
        for j, (_, rank, top) in enumerate(seq.prompt_logprobs):
            vals, ids = ref[j].topk(3)
            assert [t for t, _ in top] == ids.tolist() and [v for _, v in top] == pytest.approx(vals.tolist(), abs=5e-5)
            assert rank == int((ref[j] > ref[j, prompt[j + 1]]).sum()) + 1
        assert seq.cached_prompt == 0


def test_scoring_requests_of_a_step_share_one_bounded_block_of_logits(folders, reference, monkeypatch):
    """Several requests scoring long prompts at once: no step computes logits for more than SCORED_CHUNK of their
    prompt tokens together (a hostile batch cannot make the [tokens, vocab] block large), and each still gets
    every prompt token's logprob, equal to PEFT's."""
    from loraplex.server.engine import scheduler as sched

    monkeypatch.setattr(sched, "SCORED_CHUNK", 10)
    engine = make_engine(folders, prefill_chunk=64, max_model_len=128)
    rows: list[int] = []
    score = engine._score
    monkeypatch.setattr(engine, "_score", lambda logits, seqs, works: (rows.append(logits.shape[0]),
                                                                        score(logits, seqs, works)))
    prompts = [[(7 * i + 3 * j) % 50 + 1 for j in range(23)] for i in range(3)]
    seqs = engine.generate(prompts, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0), ["all8", None, "qv4"])
    assert rows and max(rows) <= 10 and sum(rows) == 3 * 22
    for seq, prompt, adapter in zip(seqs, prompts, ["all8", None, "qv4"]):
        ref = torch.log_softmax(peft_logits(reference, prompt, adapter).float(), dim=-1)
        want = [float(ref[j, prompt[j + 1]]) for j in range(len(prompt) - 1)]
        assert [lp for lp, _, _ in seq.prompt_logprobs] == pytest.approx(want, abs=5e-5)
