"""PackedLinear: the oneDNN-prepacked CPU path gives exactly what F.linear gives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loraplex.server.model.linear import PackedLinear, cpu_packs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 32, 300])
def test_packed_matches_f_linear(dtype, bias, rows):
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 64, generator=gen).to(dtype)
    b = torch.randn(96, generator=gen).to(dtype) if bias else None
    x = torch.randn(rows, 64, generator=gen).to(dtype)
    lin = PackedLinear(w, b)
    if cpu_packs(dtype):  # AVX-512 (Intel) packs; AVX2-only CPUs (AMD EPYC here) stay on F.linear
        assert lin.packed is not None and lin.nbytes == w.nbytes
    else:
        assert lin.packed is None and lin.nbytes == 0
    torch.testing.assert_close(lin(x), F.linear(x, w, b), rtol=0, atol=0)
    torch.testing.assert_close(lin(x.view(1, rows, 64)), F.linear(x, w, b).view(1, rows, 96), rtol=0, atol=0)


def test_cpu_packs_agrees_with_onednn():
    """The capability check says yes exactly where oneDNN's reorder runs (so no CPU kind is asked for what it lacks)."""
    for dtype in (torch.bfloat16, torch.float16):
        try:
            torch.ops.mkldnn._reorder_linear_weight(torch.randn(32, 16).to(dtype), 32)
            works = True
        except (RuntimeError, AttributeError):
            works = False
        assert cpu_packs(dtype) == works, dtype
    assert not cpu_packs(torch.float32)


def test_fp32_and_mismatched_inputs_stay_on_f_linear():
    w = torch.randn(8, 4)
    lin = PackedLinear(w)
    assert lin.packed is None and lin.nbytes == 0
    x = torch.randn(3, 4)
    assert torch.equal(lin(x), F.linear(x, w))
    half = PackedLinear(w.bfloat16())
    xf = torch.randn(3, 4)  # an fp32 input to a bf16 weight: the dense path raises as F.linear would
    with pytest.raises(RuntimeError):
        half(xf)


def test_an_engine_that_owns_its_model_frees_the_dense_weights_and_generates_the_same(tmp_path):
    from engine_fixtures import make_peft_adapters, tiny_llama
    from loraplex.server.engine.engine import Engine, EngineConfig
    from loraplex.server.engine.sampling import SamplingParams
    from loraplex.server.lora.weights import LoraWeights

    folders = make_peft_adapters(tmp_path / "peft")
    name = sorted(folders)[0]
    cfg = EngineConfig(max_loras=2, max_lora_rank=16, max_running=4, max_model_len=64)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [[1, 5, 9, 3], [7, 2, 2, 8, 4]]

    def run(owns: bool):
        model = tiny_llama().to(torch.bfloat16)
        engine = Engine(model, model.config, engine_config=cfg, loader=lambda n: LoraWeights.load(folders[n], n),
                        owns_model=owns)
        return model, engine, [s.output_ids for s in engine.generate(prompts, params, [name, None])]

    kept_model, kept, want = run(False)
    model, engine, got = run(True)
    assert got == want
    attn = model.model.layers[0].self_attn
    if engine.decoder.packed_nbytes:  # oneDNN present: the packed copies replaced the dense weights
        assert attn.q_proj.weight.numel() == 0 and model.model.layers[0].mlp.down_proj.weight.numel() == 0
        assert kept_model.model.layers[0].self_attn.q_proj.weight.numel() > 0  # a non-owning engine leaves them
        with pytest.raises(RuntimeError):
            model(torch.tensor([prompts[0]]))  # the transformers model fails loudly, never silently wrong
        assert model.lm_head.weight.numel() > 0  # tied to the embedding: kept
