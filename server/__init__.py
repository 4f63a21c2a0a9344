"""loraplex server: the multi-adapter engine (``engine``, ``lora``, ``model``) and, later, the HTTP API."""
