"""The machine the server runs on, and the base model's format that is fast there.

Read from ``/proc`` at start (no torch here: the API reads it too). On CPUs the right format depends on what
the vector units do natively (measured 2026-12-01/02 on a 2-core AMD EPYC with AVX2 only, SmolLM2-135M, see
issue 16 and the README): bitsandbytes' CPU NF4 matmuls are fast only with AVX-512 (one stream at 207 ms a
token against 68 ms dense in float32), and bfloat16 has no native arithmetic below AVX-512 (32 x 64 tokens
3x slower than float32). With AVX-512 and AVX512-BF16 but no AMX (2-core AMD EPYC Zen 4, 2026-12-02) one stream
took 27.6 ms a token through bitsandbytes in bfloat16 against 8.3 with loraplex's NF4 kernel in float32, while
32 x 64 tokens with 4 adapters ran 255 against 236 tok/s: the kernel is the default there too. So:

| where | quantize | weights | dtype |
|---|---|---|---|
| CUDA | nf4 | packed (bitsandbytes 4-bit) | bfloat16 |
| CPU with AMX (Sapphire Rapids and later) | nf4 | packed (bitsandbytes 4-bit) | bfloat16 |
| CPU with AVX2 and FMA (and AVX-512 without AMX) | nf4 | packed: loraplex's NF4 kernel (server/model/nf4.py) | float32 |
| CPU without AVX2 | nf4 | dense: the NF4 values dequantized once | float32 |

Both float32 layouts keep the numbers a QLoRA adapter was trained against (the NF4-dequantized weights, which
is what bitsandbytes computes with at every forward): the kernel decodes them from the 4-bit codes as it
multiplies (half a byte a weight read per token: with the int8 LM head and fused layer ops one stream decodes
in 27 against 60 ms dense, 2026-12-02, README); ``dense`` runs plain
matmuls on them at the float32 bytes of the base, so it is chosen only when they fit in half of the memory
available at start. The vLLM engine
serves the unquantized base (``quantize none``) in the same dtype. ``--quantize``, ``--weights`` and
``--dtype`` override each choice; the start-up log and ``/v1/models`` say what was chosen and why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_AVX512 = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"})


@dataclass(frozen=True, slots=True)
class Hardware:
    cpu: str  # the CPU's model name, as /proc/cpuinfo gives it
    flags: frozenset[str]  # its feature flags
    memory_available: int | None  # bytes (MemAvailable at start), None where unknown

    @classmethod
    def detect(cls, proc: Path = Path("/proc")) -> Hardware:
        cpu, flags = "unknown", frozenset()
        try:
            for line in (proc / "cpuinfo").read_text(errors="replace").splitlines():
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and cpu == "unknown":
                    cpu = value.strip()
                elif key == "flags" and not flags:
                    flags = frozenset(value.split())
                if cpu != "unknown" and flags:
                    break
        except OSError:
            pass
        return cls(cpu, flags, _mem_available(proc))

    @property
    def kind(self) -> str:
        """The vector ISA that matters here: amx, avx512-bf16, avx512, avx2 or baseline."""
        if "amx_bf16" in self.flags:
            return "amx"
        if _AVX512 <= self.flags:
            return "avx512-bf16" if "avx512_bf16" in self.flags else "avx512"
        return "avx2" if "avx2" in self.flags else "baseline"

    @property
    def nf4_kernel(self) -> bool:
        """Whether loraplex's own NF4 kernel (server/model/nf4.py: AVX2 + FMA) can run here."""
        return {"avx2", "fma"} <= self.flags

    @property
    def fast_low_precision(self) -> bool:
        """Whether bitsandbytes' CPU 4-bit kernels and bfloat16 matmuls run natively (AVX-512 and up)."""
        return self.kind in ("amx", "avx512-bf16", "avx512")


@dataclass(frozen=True, slots=True)
class BaseFormat:
    """How the base model is held and computed with."""

    quantize: str  # the values: nf4, int8 or none
    weights: str  # packed (bitsandbytes' quantized kernels) or dense (the quantized values dequantized once)
    dtype: str  # of dense weights, activations and the KV cache
    why: str  # what chose it: "set", or the hardware it was chosen for

    def describe(self) -> str:
        values = "unquantized" if self.quantize == "none" else f"{self.quantize} {self.weights}"
        return f"{values}, {self.dtype}" + ("" if self.why == "set" else f" (default for {self.why})")

    def as_dict(self) -> dict:
        return {"quantize": self.quantize, "weights": self.weights, "dtype": self.dtype, "chosen_for": self.why}


def choose(engine: str, device: str, quantize: str | None = None, weights: str | None = None,
           dtype: str | None = None, dense_bytes: int | None = None, hardware: Hardware | None = None) -> BaseFormat:
    """The base's format: what is set, and for the rest what is fast on this machine.

    ``dense_bytes``: what the base takes held densely in float32 (None: unknown, assumed to fit). vLLM runs a
    quantized base with its own bitsandbytes layer: always packed there."""
    kernel = False  # loraplex's NF4 kernel runs here (float32 on a CPU with AVX2 and FMA)
    if device == "cuda":
        why, fast, fits = "cuda", True, True
    else:
        hw = hardware or Hardware.detect()
        why, fast, kernel = f"cpu {hw.kind}", hw.fast_low_precision, hw.nf4_kernel
        fits = dense_bytes is None or hw.memory_available is None or dense_bytes <= hw.memory_available // 2
    q = quantize or ("nf4" if engine == "native" else "none")
    # loraplex's NF4 kernel in float32 where it runs, except with AMX (bitsandbytes' bfloat16 path was tuned there):
    # with AVX-512 but no AMX (AMD Zen 4, 2026-12-02) it decoded one stream 3.3x as fast as bitsandbytes in bfloat16
    kernel_first = (kernel and engine == "native" and q == "nf4" and weights in (None, "packed")
                    and why != "cpu amx")
    d = dtype or ("float32" if kernel_first else "bfloat16" if fast else "float32")
    if q == "none":
        w = "dense"
    elif engine != "native" or q != "nf4":
        w = weights or "packed"  # (vLLM's bitsandbytes layer; LLM.int8 quantizes activations too: packed only)
    elif weights:
        w = weights
    elif fast or (kernel and d == "float32"):
        w = "packed"  # loraplex's NF4 kernel in float32 (AVX2); bitsandbytes' kernels with AMX or on CUDA
    elif fits:
        w = "dense"
    else:
        w = "packed"
        why += ", the float32 base too large for half the memory"
    chosen = quantize is None or dtype is None or (weights is None and q == "nf4" and engine == "native")
    return BaseFormat(q, w, d, why if chosen else "set")


def _mem_available(proc: Path) -> int | None:
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None
