"""The OpenAI-compatible HTTP API (FastAPI). Never imports torch: it talks to an engine backend."""
