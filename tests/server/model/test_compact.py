"""Exact compact forms of an unquantized float32 linear (server/model/compact.py): GGUF Q8_0-style values (an
int8 times a scale per 32) are recovered exactly and bfloat16-exact values held as bfloat16; anything else stays
float32; the kernel's products match F.linear for every token count (tiles of 4 and remainders, and the chunked
path above KERNEL_ROWS); and an engine whose LM head is Q8_0-exact gives the transformers model's logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loraplex.server.model import compact
from loraplex.server.model.compact import KERNEL_ROWS, CompactLinear, as_int8

pytestmark = pytest.mark.skipif(not compact.available(), reason=f"no compact kernel here: {compact.why_not()}")


def q8_0(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """What a GGUF Q8_0 tensor dequantizes to: fp16 scale d per 32 values, int8 q, each block reaching +-127."""
    g = torch.Generator().manual_seed(seed)
    d = (torch.rand(n, k // 32, 1, generator=g) * 0.01 + 1e-4).half().float()
    q = torch.randint(-127, 128, (n, k // 32, 32), generator=g).float()
    q[..., 0] = torch.where(torch.rand(n, k // 32, generator=g) < 0.5, -127.0, 127.0)
    return (d * q).view(n, k)


def test_int8_values_are_recovered_exactly_and_other_values_refused():
    w = q8_0(40, 96)
    q, scale = as_int8(w)
    assert q.dtype == torch.int8 and torch.equal(q.float().view(40, 3, 32) * scale.unsqueeze(-1), w.view(40, 3, 32))
    assert as_int8(torch.randn(40, 96)) is None  # plain float32
    assert as_int8(torch.randn(40, 80)) is None  # not whole blocks
    zeros = torch.zeros(8, 64)
    assert torch.equal(as_int8(zeros)[0], torch.zeros(8, 64, dtype=torch.int8))  # an all-zero block: scale 0


def test_the_form_is_the_smallest_exact_one():
    assert CompactLinear.build(q8_0(16, 64)).form == "int8"
    assert CompactLinear.build(torch.randn(16, 64).bfloat16().float()).form == "bfloat16"
    assert CompactLinear.build(torch.randn(16, 64)) is None
    assert CompactLinear.build(torch.randn(16, 64).bfloat16()) is None  # only float32 weights


@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5, 9, 40, KERNEL_ROWS, KERNEL_ROWS + 1])
@pytest.mark.parametrize("form", ["int8", "bfloat16"])
def test_products_match_f_linear(tokens, form, monkeypatch):
    monkeypatch.setattr(compact, "CHUNK", 24)  # several chunks above KERNEL_ROWS
    w = q8_0(72, 96, seed=1) if form == "int8" else torch.randn(72, 96).bfloat16().float()
    bias = torch.randn(72)
    lin = CompactLinear.build(w, bias)
    assert lin.form == form and torch.equal(lin.dequantized(), w)
    x = torch.randn(tokens, 96)
    torch.testing.assert_close(lin(x), F.linear(x, w, bias), rtol=1e-5, atol=1e-5)
    assert lin(x.view(1, tokens, 96)).shape == (1, tokens, 72)


def test_an_engine_with_a_q8_0_head_gives_the_models_logits():
    from engine_fixtures import tiny_llama
    from loraplex.server.engine.engine import Engine, EngineConfig
    from loraplex.server.engine.sampling import SamplingParams

    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.copy_(q8_0(*model.lm_head.weight.shape, seed=2) * 30)
    engine = Engine(model, model.config, engine_config=EngineConfig(max_loras=1, max_lora_rank=8, max_running=2,
                                                                     max_model_len=64))
    assert isinstance(engine.decoder.lm_head, CompactLinear) and engine.decoder.linears.endswith("LM head int8")
    [seq] = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0))
    ids = [1, 2, 3]
    with torch.no_grad():
        for k in range(6):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
            assert abs(seq.logprobs[k] - float(torch.log_softmax(logits, -1)[ids[-1]])) < 1e-4
    assert seq.output_ids == ids[3:]
