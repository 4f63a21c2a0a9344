"""The decode step's layer stack as one C++ op (stack.py): the same tokens and the same logprobs, bit for bit, as the
Python layer loop it replaces, for base rows, single adapters and a weighted mixture decoding together; steps it
cannot take (prefills, LoRA batches over the small-rows limit) run the Python loop; the part is left out when a
part it calls is."""

from __future__ import annotations

import pytest
import torch

from loraplex.server.model import stack

pytestmark = pytest.mark.skipif(stack.ops() is None, reason=f"no stack op here: {stack.why_not()}")


@pytest.fixture(scope="module")
def nf4_engine(tmp_path_factory):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    from engine_fixtures import make_peft_adapters, tiny_llama
    from loraplex.server.engine.engine import Engine, EngineConfig
    from loraplex.server.lora.weights import LoraWeights

    d = tmp_path_factory.mktemp("stack")
    tiny_llama().save_pretrained(d / "base")
    folders = make_peft_adapters(d / "adapters")
    model = LlamaForCausalLM.from_pretrained(d / "base", device_map="cpu", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32)).eval()
    cfg = EngineConfig(max_loras=4, max_lora_rank=16, max_running=8, max_model_len=128, prefix_caching=False)
    return Engine(model, model.config, engine_config=cfg, loader=lambda n: LoraWeights.load(folders[n], n))


def run(engine, monkeypatch, use_stack: bool):
    from loraplex.server.engine.sampling import SamplingParams
    from loraplex.server.model.decoder import Decoder

    dec = engine.decoder
    calls = []
    real = Decoder._forward_stack
    monkeypatch.setattr(Decoder, "_forward_stack", lambda self, *a: calls.append(1) or real(self, *a))
    saved = dec.stack
    dec.stack = saved if use_stack else None
    try:
        prompts = [[1, 2, 3, 4, 5], [9, 8, 7], [3, 1, 4, 1, 5, 9], [2, 7, 1, 8], [6, 6, 6]]
        names = [None, "all8", "mlp16rs", [("qv4", 0.7), ("all8", 0.3), ("mlp16rs", -0.5)], "qv4"]
        seqs = engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=3),
                               adapters=names)
    finally:
        dec.stack = saved
    return [(s.output_ids, s.logprobs, s.top_logprobs) for s in seqs], len(calls)


def test_the_stack_decodes_bit_for_bit_what_the_python_loop_does(nf4_engine, monkeypatch):
    assert nf4_engine.decoder.stack is not None
    assert nf4_engine.decoder.linears.startswith("nf4 kernel") and nf4_engine.decoder.linears.endswith("one C++ call")
    run(nf4_engine, monkeypatch, False)  # the adapters loaded: both runs below schedule their steps alike
    with_op, calls = run(nf4_engine, monkeypatch, True)
    without, none = run(nf4_engine, monkeypatch, False)
    assert calls >= 7 and none == 0  # every decode step of the batch took the op; the prefill did not
    assert with_op == without


def test_base_only_steps_and_too_many_lora_rows_take_their_paths(nf4_engine, monkeypatch):
    from loraplex.server.engine.sampling import SamplingParams
    from loraplex.server.lora import delta
    from loraplex.server.model.decoder import Decoder

    calls = []
    real = Decoder._forward_stack
    monkeypatch.setattr(Decoder, "_forward_stack", lambda self, *a: calls.append(1) or real(self, *a))
    greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    nf4_engine.generate([[1, 2, 3]], greedy)  # base only: the op without LoRA lists
    assert len(calls) == 3
    calls.clear()
    monkeypatch.setattr(delta, "SMALL_ROWS", 0)  # every LoRA step over the small-rows limit: the Python loop
    nf4_engine.generate([[1, 2, 3]], greedy, adapters=["all8"])
    assert calls == []


def test_the_part_is_left_out_with_a_part_it_calls(monkeypatch):
    import sys
    import types

    from loraplex.server.model.cpp_library import CppLibrary, Part

    def part(name, **kw):
        module = types.ModuleType(f"fake_stack_{name}")
        module.SOURCE = "#include <torch/library.h>\n"
        monkeypatch.setitem(sys.modules, module.__name__, module)
        return Part(name, module.__name__, f"LORAPLEX_TEST_{name.upper()}", **kw)

    monkeypatch.setenv("LORAPLEX_TEST_LEAF", "0")
    lib = CppLibrary("loraplex_never_built", (part("leaf"), part("user", uses=("leaf",))))
    assert lib.ops("user") is None
    assert lib.why_not("user") == "needs the leaf part(s): turned off (LORAPLEX_TEST_LEAF=0)"

