"""Run one of ../shared/peers' scripts unchanged, with its bfloat16 replaced by another dtype.

    python -m loraplex.server.peer_dtype float32 ../shared/peers/hf_static.py FIXTURE/smollm2

The peers' scripts pin bfloat16, the fast dtype with AVX-512; without it (AVX2) float32 is the peers' best
(issue 16's table: HF static 49 tok/s bf16, fp32 faster). This wrapper makes transformers load the models in the
given dtype (``from_pretrained``'s dtype, bitsandbytes' compute dtype; vLLM's ``LLM(dtype=...)``) and then runs
the script as __main__. ``loraplex bench engine`` runs the peers this way on a CPU without AVX-512.
"""

from __future__ import annotations

import runpy
import sys

import torch


def main() -> None:
    dtype, script, args = getattr(torch, sys.argv[1]), sys.argv[2], sys.argv[3:]
    import transformers

    auto = transformers.AutoModelForCausalLM
    original = auto.from_pretrained.__func__

    def from_pretrained(cls, *a, **kw):
        if kw.get("dtype") == torch.bfloat16:
            kw["dtype"] = dtype
        return original(cls, *a, **kw)

    auto.from_pretrained = classmethod(from_pretrained)
    bnb_init = transformers.BitsAndBytesConfig.__init__

    def bnb(self, *a, **kw):
        if kw.get("bnb_4bit_compute_dtype") == torch.bfloat16:
            kw["bnb_4bit_compute_dtype"] = dtype
        bnb_init(self, *a, **kw)

    transformers.BitsAndBytesConfig.__init__ = bnb
    if "vllm" in script:
        import vllm

        llm_init = vllm.LLM.__init__

        def llm(self, *a, **kw):
            if kw.get("dtype") == "bfloat16":
                kw["dtype"] = sys.argv_dtype
            llm_init(self, *a, **kw)

        sys.argv_dtype = str(dtype).removeprefix("torch.")
        vllm.LLM.__init__ = llm
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
