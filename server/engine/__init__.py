"""The generation engine: requests, scheduler (it hands out the KV cache's slots), sampler, step loop."""
