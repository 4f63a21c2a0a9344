"""The engine as the server uses it: registry-sourced adapters, merges, quantized bases, async streaming."""

from __future__ import annotations

import asyncio

import pytest
import torch

from loraplex.adapters import AdapterCache, AdapterRegistry, IncompatibleBaseError
from loraplex.adapters.basemodel import BaseModelInfo
from engine_fixtures import ADAPTERS, exact_nf4, make_peft_adapters, peft_reference, tiny_llama
from loraplex.server.engine.async_engine import AsyncEngine
from loraplex.server.engine.engine import Engine, EngineConfig
from loraplex.server.engine.sampling import SamplingParams
from loraplex.server.lora.merge import MergeSpec, merge
from loraplex.server.lora.source import AdapterSource
from loraplex.server.lora.weights import LoraWeights
from loraplex.server.model.linear import PackedLinear

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return make_peft_adapters(tmp_path_factory.mktemp("peft"), specs={**ADAPTERS, "all8b": ADAPTERS["all8"]})


@pytest.fixture
def tiny_base_dir(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "tiny-base")
    return tmp_path / "tiny-base"


def engine_on(model, loader=None, **kw):
    cfg = EngineConfig(**{"max_loras": 4, "max_lora_rank": 16, "max_running": 8, "max_model_len": 128, **kw})
    return Engine(model, model.config, engine_config=cfg, loader=loader)


def test_adapters_come_from_the_registry_by_pinned_version(folders, tiny_base_dir, tmp_path):
    reg = AdapterRegistry((tmp_path / "reg").as_uri(), cache=AdapterCache(tmp_path / "cache"))
    reg.push(folders["all8"], "helper", base_model=str(tiny_base_dir))
    reg.push(folders["qv4"], "helper", base_model=str(tiny_base_dir), alias="prod")
    model = tiny_llama()
    info = BaseModelInfo.from_hf_config("tiny", model.config.to_dict())
    engine = engine_on(model, AdapterSource(reg, info))
    v1, v2 = engine.generate([[1, 2, 3, 4]] * 2, GREEDY, ["helper@1", "helper@2"])
    direct = engine_on(tiny_llama(), lambda n: LoraWeights.load(folders[n], n))
    d1, d2 = direct.generate([[1, 2, 3, 4]] * 2, GREEDY, ["all8", "qv4"])
    assert v1.output_ids == d1.output_ids and v2.output_ids == d2.output_ids  # two versions side by side
    assert v1.output_ids != v2.output_ids


def test_adapter_for_another_base_is_refused(folders, tiny_base_dir, tmp_path):
    reg = AdapterRegistry((tmp_path / "reg").as_uri(), cache=AdapterCache(tmp_path / "cache"))
    reg.push(folders["all8"], "helper", base_model=str(tiny_base_dir))
    model = tiny_llama()
    other = BaseModelInfo.from_hf_config("other", {**model.config.to_dict(), "num_hidden_layers": 3})
    engine = engine_on(model, AdapterSource(reg, other))
    engine.add_request([1, 2, 3], GREEDY, adapters="helper@1", request_id="r")
    outs = []
    for _ in range(100):
        outs += engine.step()
        if outs:
            break
        engine.adapters.wait_idle(30)
    assert outs[0].finish_reason == "error" and isinstance(outs[0].error, IncompatibleBaseError)


@pytest.mark.parametrize("strategy, kw", [("linear", {}), ("cat", {}), ("svd", {"svd_rank": 8}),
                                          ("ties", {"density": 0.5}), ("dare_linear", {"density": 0.5, "seed": 3})])
def test_merged_adapter_serves_like_peft(folders, strategy, kw):
    names = ["all8", "mlp16rs"] if strategy in ("cat", "svd") else ["all8", "all8b"]
    ref = peft_reference({n: folders[n] for n in names})
    spec = MergeSpec(strategy, (0.6, 0.4), **kw)
    if spec.seed is not None:
        torch.manual_seed(spec.seed)
    ref.add_weighted_adapter(names, [0.6, 0.4], "m", combination_type=strategy, **{k: v for k, v in kw.items() if k != "seed"})
    weights = [LoraWeights.load(folders[n], n) for n in names]
    engine = engine_on(tiny_llama(), max_lora_rank=32)
    engine.register_adapter("merged", lambda _: merge(weights, spec, "merged"))
    [seq] = engine.generate([[5, 6, 7, 8, 9]], GREEDY, ["merged"])
    ids = [5, 6, 7, 8, 9]
    ref.set_adapter("m")
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(ref(torch.tensor([ids])).logits[0, -1].argmax()))
    assert seq.output_ids == ids[5:]


def test_nf4_base_serves_adapters():
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    model = tiny_llama()
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        q = LlamaForCausalLM.from_pretrained(d, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32), device_map="cpu").eval()
    engine = engine_on(q)
    [seq] = engine.generate([[1, 2, 3]], GREEDY)
    ids = [1, 2, 3]
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(q(torch.tensor([ids])).logits[0, -1].argmax()))
    assert seq.output_ids == ids[3:]


@pytest.mark.parametrize("layout", ["dense", "kernel"])
def test_an_nf4_base_in_float32_serves_what_peft_computes_on_the_packed_one(folders, tmp_path, layout):
    """The CPU defaults without AVX-512: the NF4 values computed in float32, either held densely (``dense``) or
    decoded from the 4-bit codes by our kernel (``kernel``). A QLoRA adapter was trained against exactly those
    values, so the engine gives PEFT's logits on the packed NF4 base."""
    from peft import PeftModel
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    from loraplex.server.model import nf4 as nf4_kernel
    from loraplex.server.model.loader import dequantize_linears
    from loraplex.server.model.nf4 import Nf4Linear

    if layout == "kernel" and not nf4_kernel.available():
        pytest.skip(f"no NF4 kernel here: {nf4_kernel.why_not()}")

    tiny_llama().save_pretrained(tmp_path / "base")
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)

    def load():
        return exact_nf4(LlamaForCausalLM.from_pretrained(tmp_path / "base", quantization_config=nf4,
                                                          device_map="cpu").eval())

    base = load()
    if layout == "dense":
        assert dequantize_linears(base, torch.float32) == 2 * 7  # every projection of both layers
    engine = engine_on(base, lambda n: LoraWeights.load(folders[n], n))
    kernels = [type(p.dense) for layer in engine.decoder.projections for p in layer.values()]
    assert kernels == [Nf4Linear if layout == "kernel" else PackedLinear] * 8
    prompts, names = [[1, 2, 3, 4, 5], [9, 8, 7], [3, 1, 4, 1, 5, 9]], [None, "all8", "mlp16rs"]
    seqs = engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0),
                           adapters=names)
    for seq, prompt, name in zip(seqs, prompts, names):
        ref = load()
        if name is not None:
            ref = PeftModel.from_pretrained(ref, str(folders[name])).eval()
        ids = list(prompt)
        with torch.no_grad():
            for k in range(6):
                logits = ref(torch.tensor([ids])).logits[0, -1]
                ids.append(int(logits.argmax()))
                want = torch.log_softmax(logits.float(), -1)[ids[-1]]
                assert abs(seq.logprobs[k] - float(want)) < 1e-4, (name, k)
        assert seq.output_ids == ids[len(prompt):], name


def test_async_engine_streams_and_aborts_on_cancel(folders):
    engine = engine_on(tiny_llama(), lambda n: LoraWeights.load(folders[n], n))
    aeng = AsyncEngine(engine)

    async def main():
        pieces = [o async for o in aeng.generate([1, 2, 3], GREEDY, adapters="all8")]
        assert [len(p.new_token_ids) for p in pieces] == [1] * 8 and pieces[-1].finished
        with pytest.raises(ValueError, match="prompt is empty"):
            async for _ in aeng.generate([], GREEDY):
                pass
        long = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
        gen = aeng.generate([4, 5, 6], long, adapters="qv4", request_id="cancel-me")
        await gen.__anext__()
        await gen.aclose()  # the client went away
        for _ in range(100):
            if aeng.stats().running == 0 and engine.pool.used_blocks == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.adapters.refs("qv4") == 0 and engine.pool.used_blocks == 0

    try:
        asyncio.run(main())
    finally:
        aeng.shutdown()


def test_add_merge_is_named_by_its_inputs_and_computed_once(folders):
    calls = []

    def loader(n):
        calls.append(n)
        return LoraWeights.load(folders[n], n)

    engine = engine_on(tiny_llama(), loader, max_lora_rank=32)
    spec = MergeSpec("cat", (0.5, 0.5))
    name = engine.add_merge(["all8", "qv4"], spec)
    assert name == engine.add_merge(["all8", "qv4"], spec) != engine.add_merge(["all8", "qv4"], MergeSpec("cat", (0.5, 0.6)))
    engine.generate([[1, 2, 3]] * 3, GREEDY, [name] * 3)
    engine.generate([[1, 2, 3]], GREEDY, [name])
    assert calls == ["all8", "qv4"]


def test_int8_base_runs():
    from transformers import BitsAndBytesConfig, LlamaForCausalLM
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tiny_llama().save_pretrained(d)
        q = LlamaForCausalLM.from_pretrained(d, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                             dtype=torch.float16, device_map="cpu").eval()
    [seq] = engine_on(q).generate([[1, 2, 3]], GREEDY)
    ids = [1, 2, 3]
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(q(torch.tensor([ids])).logits[0, -1].argmax()))
    assert seq.output_ids == ids[3:]
