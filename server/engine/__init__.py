"""The generation engine: requests, scheduler, sampler, KV cache, step loop."""
