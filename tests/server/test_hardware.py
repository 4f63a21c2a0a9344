"""The base's format chosen for the machine (server/hardware.py): the CPU read from /proc, the table of
defaults, what a setting overrides, and the memory guard on dense weights."""

from __future__ import annotations

import pytest

from loraplex.server.api.settings import ServerSettings
from loraplex.server.hardware import Hardware, choose

NO_AVX2 = "fpu sse sse2 avx"
AVX2 = NO_AVX2 + " avx2 fma"
AVX512 = AVX2 + " avx512f avx512bw avx512vl avx512dq"
SPR = AVX512 + " avx512_bf16 amx_bf16 amx_tile"


def fake_proc(tmp_path, flags: str, model: str = "Test CPU", mem_kb: int | None = 16 << 20):
    (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nmodel name\t: {model}\nflags\t\t: {flags}\n\n"
                                      f"processor\t: 1\nmodel name\t: {model}\nflags\t\t: {flags}\n")
    if mem_kb is not None:
        (tmp_path / "meminfo").write_text(f"MemTotal: {2 * mem_kb} kB\nMemAvailable: {mem_kb} kB\n")
    return tmp_path


@pytest.mark.parametrize("flags, kind, fast", [(AVX2, "avx2", False), (AVX512, "avx512", True),
                                               (AVX512 + " avx512_bf16", "avx512-bf16", True), (SPR, "amx", True),
                                               ("fpu sse sse2", "baseline", False)])
def test_the_cpu_kind_from_its_flags(tmp_path, flags, kind, fast):
    hw = Hardware.detect(fake_proc(tmp_path, flags, "AMD EPYC"))
    assert (hw.cpu, hw.kind, hw.fast_low_precision, hw.memory_available) == ("AMD EPYC", kind, fast, 16 << 30)


def test_an_unreadable_proc_is_a_baseline_cpu(tmp_path):
    hw = Hardware.detect(tmp_path / "missing")
    assert hw.kind == "baseline" and hw.cpu == "unknown" and not hw.fast_low_precision


def test_defaults_per_machine(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "s").mkdir()
    avx2, spr = Hardware.detect(fake_proc(tmp_path / "a", AVX2)), Hardware.detect(fake_proc(tmp_path / "s", SPR))
    f = choose("native", "cpu", hardware=avx2)  # loraplex's NF4 kernel
    assert (f.quantize, f.weights, f.dtype, f.why) == ("nf4", "packed", "float32", "cpu avx2")
    (tmp_path / "b").mkdir()
    f = choose("native", "cpu", hardware=Hardware.detect(fake_proc(tmp_path / "b", NO_AVX2)))
    assert (f.quantize, f.weights, f.dtype, f.why) == ("nf4", "dense", "float32", "cpu baseline")
    f = choose("native", "cpu", hardware=spr)
    assert (f.quantize, f.weights, f.dtype, f.why) == ("nf4", "packed", "bfloat16", "cpu amx")
    for name, flags in (("avx512", AVX512), ("avx512-bf16", AVX512 + " avx512_bf16")):  # AVX-512 without AMX
        (tmp_path / name).mkdir()
        hw = Hardware.detect(fake_proc(tmp_path / name, flags))
        f = choose("native", "cpu", hardware=hw)  # the NF4 kernel in float32 (one stream 3.3x bitsandbytes' bf16)
        assert (f.quantize, f.weights, f.dtype, f.why) == ("nf4", "packed", "float32", f"cpu {name}")
        f = choose("native", "cpu", dtype="bfloat16", hardware=hw)  # bfloat16 asked for: bitsandbytes' path
        assert (f.weights, f.dtype) == ("packed", "bfloat16")
        f = choose("native", "cpu", quantize="none", hardware=hw)  # no NF4: the dtype native here
        assert (f.weights, f.dtype) == ("dense", "bfloat16")
        assert choose("vllm", "cpu", hardware=hw).dtype == "bfloat16"
    f = choose("native", "cuda", hardware=avx2)  # the GPU decides, whatever the CPU
    assert (f.quantize, f.weights, f.dtype, f.why) == ("nf4", "packed", "bfloat16", "cuda")
    f = choose("vllm", "cpu", hardware=avx2)  # vLLM serves the unquantized base, in the dtype fast here
    assert (f.quantize, f.weights, f.dtype) == ("none", "dense", "float32")
    f = choose("vllm", "cpu", quantize="nf4", hardware=avx2)  # vLLM's own bitsandbytes layer
    assert (f.quantize, f.weights) == ("nf4", "packed")
    f = choose("native", "cpu", quantize="int8", hardware=avx2)  # LLM.int8 quantizes activations: packed only
    assert (f.quantize, f.weights, f.dtype) == ("int8", "packed", "float32")


def test_settings_override_each_choice(tmp_path):
    avx2 = Hardware.detect(fake_proc(tmp_path, AVX2))
    f = choose("native", "cpu", weights="packed", hardware=avx2)
    assert (f.quantize, f.weights, f.dtype, f.why) == ("nf4", "packed", "float32", "cpu avx2")
    f = choose("native", "cpu", dtype="bfloat16", hardware=avx2)
    assert (f.weights, f.dtype) == ("dense", "bfloat16")
    f = choose("native", "cpu", quantize="nf4", weights="dense", dtype="float16", hardware=avx2)
    assert (f.quantize, f.weights, f.dtype, f.why) == ("nf4", "dense", "float16", "set")
    f = choose("native", "cpu", quantize="none", dtype="bfloat16", hardware=avx2)
    assert (f.quantize, f.weights, f.dtype, f.why) == ("none", "dense", "bfloat16", "set")
    assert f.describe() == "unquantized, bfloat16"
    assert choose("native", "cpu", hardware=avx2).describe() == "nf4 packed, float32 (default for cpu avx2)"
    f = choose("native", "cpu", weights="dense", hardware=avx2)  # the NF4 values in float32, without the kernel
    assert (f.weights, f.dtype, f.why) == ("dense", "float32", "cpu avx2")


def test_dense_weights_only_where_they_fit_in_half_the_memory(tmp_path):
    avx2 = Hardware.detect(fake_proc(tmp_path, NO_AVX2, mem_kb=1 << 20))  # 1 GiB available, no NF4 kernel
    f = choose("native", "cpu", dense_bytes=500 << 20, hardware=avx2)
    assert f.weights == "dense"
    f = choose("native", "cpu", dense_bytes=600 << 20, hardware=avx2)  # a 7B base would be 28 GB dense
    assert (f.weights, f.dtype) == ("packed", "float32") and "too large" in f.why
    f = choose("native", "cpu", weights="dense", dense_bytes=600 << 20, hardware=avx2)  # asked for: as asked
    assert f.weights == "dense"


def test_server_settings_leave_the_choice_unset_by_default(monkeypatch):
    for var in ("LORAPLEX_QUANTIZE", "LORAPLEX_WEIGHTS", "LORAPLEX_DTYPE"):
        monkeypatch.delenv(var, raising=False)
    s = ServerSettings()
    assert (s.quantize, s.weights, s.dtype) == (None, None, None)
    f = s.base_format()
    assert f.quantize == "nf4" and f.dtype in ("float32", "bfloat16") and f.why.startswith("cpu ")
    with pytest.raises(ValueError):
        ServerSettings(weights="sparse")
