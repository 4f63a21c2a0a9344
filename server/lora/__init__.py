"""LoRA adapters inside the engine: weights in memory, slot buffers, batched layers, merges."""
