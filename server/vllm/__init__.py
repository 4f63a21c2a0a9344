"""The vLLM engine backend (``loraplex serve --engine vllm``). Only this package imports vllm."""

from .backend import VllmBackend
from .launch import VllmLaunch

__all__ = ["VllmBackend", "VllmLaunch"]
