"""The fused layer ops (server/model/fused.py) against the PyTorch they replace: the RMSNorm with and without the
residual add (transformers' LlamaRMSNorm), the rotary embedding of q and k in the fused q/k/v output (the
decoder's own ``_rotate``, v untouched), silu(gate) * up, the KV pool write (index_put), out-of-range positions and
slots refused; and an engine gives the same greedy tokens and log-probs with the ops and without them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loraplex.server.model import fused

pytestmark = pytest.mark.skipif(fused.ops() is None, reason=f"no fused ops here: {fused.why_not()}")


@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_add_rms_norm_is_the_residual_add_then_llama_rmsnorm(tokens):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(96, eps=1e-5)
    norm.weight.data.normal_()
    h, y = torch.randn(tokens, 96), torch.randn(tokens, 2 * 96)[:, :96]  # y a strided view, as a fused output's
    want_h = h + y
    got = fused.ops().add_rms_norm(h, y, norm.weight.data, norm.variance_epsilon)
    assert torch.equal(h, want_h)  # in place
    torch.testing.assert_close(got, norm(want_h), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.ops().add_rms_norm(h, None, norm.weight.data, 1e-5), norm(h), rtol=1e-5, atol=1e-6)


def test_rope_rotates_q_and_k_in_place_and_leaves_v():
    from engine_fixtures import tiny_llama
    from loraplex.server.model.decoder import Decoder

    model = tiny_llama()
    dec = Decoder(model, model.config, torch.float32, "cpu")
    heads, kv, hd, t = dec.num_heads, dec.num_kv_heads, dec.head_dim, 5
    qkv = torch.randn(t, (heads + 2 * kv) * hd)
    positions = torch.tensor([0, 7, 3, 100, 255])
    cos, sin = dec._cos[positions].unsqueeze(1), dec._sin[positions].unsqueeze(1)
    want_q = dec._rotate(qkv[:, :heads * hd].view(t, heads, hd), cos, sin)
    want_k = dec._rotate(qkv[:, heads * hd:(heads + kv) * hd].view(t, kv, hd), cos, sin)
    v = qkv[:, (heads + kv) * hd:].clone()
    fused.ops().rope(qkv, positions, dec._cos, dec._sin, heads + kv, hd)
    torch.testing.assert_close(qkv[:, :heads * hd].view(t, heads, hd), want_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(qkv[:, heads * hd:(heads + kv) * hd].view(t, kv, hd), want_k, rtol=1e-6, atol=1e-6)
    assert torch.equal(qkv[:, (heads + kv) * hd:], v)
    with pytest.raises(RuntimeError, match="position out of range"):
        fused.ops().rope(qkv, torch.tensor([0, 1, 2, 3, dec.max_positions]), dec._cos, dec._sin, heads + kv, hd)


def test_silu_mul_and_kv_write():
    gu = torch.randn(4, 2 * 80)
    torch.testing.assert_close(fused.ops().silu_mul(gu), F.silu(gu[:, :80]) * gu[:, 80:], rtol=1e-6, atol=1e-6)
    kp, vp = torch.zeros(2, 32, 8), torch.zeros(2, 32, 8)
    kv = torch.randn(3, 2 * 2 * 8)  # [T, k heads | v heads], as views of a fused output
    k, v = kv[:, :16].view(3, 2, 8), kv[:, 16:].view(3, 2, 8)
    slots = torch.tensor([5, 0, 31])
    fused.ops().kv_write(kp, vp, slots, k, v)
    want_k, want_v = torch.zeros(2, 32, 8), torch.zeros(2, 32, 8)
    want_k[:, slots], want_v[:, slots] = k.transpose(0, 1), v.transpose(0, 1)
    assert torch.equal(kp, want_k) and torch.equal(vp, want_v)
    with pytest.raises(RuntimeError, match="slot out of range"):
        fused.ops().kv_write(kp, vp, torch.tensor([5, 0, 32]), k, v)


def test_an_engine_decodes_the_same_with_and_without_the_ops():
    from engine_fixtures import tiny_llama
    from loraplex.server.engine.engine import Engine, EngineConfig
    from loraplex.server.engine.sampling import SamplingParams

    runs = []
    for use in (True, False):
        model = tiny_llama()
        engine = Engine(model, model.config, engine_config=EngineConfig(max_loras=1, max_lora_rank=8, max_running=4,
                                                                         max_model_len=128))
        assert engine.decoder.fused is not None
        if not use:
            engine.decoder.fused = None
            engine.cache._fused = None
        runs.append(engine.generate([[1, 2, 3], [7] * 40, [5, 6]],
                                    SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)))
    for a, b in zip(*runs):
        assert a.output_ids == b.output_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4
