"""Base models: loading (HF folder or the embedded SmolLM2 GGUF), quantization, the decoder forward and its KV cache."""
