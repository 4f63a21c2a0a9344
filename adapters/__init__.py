"""loraplex adapters: spec and validation, storage backends, the versioned registry and its cache.

This package's core never imports torch (nor boto3 until an s3:// registry is opened), so the
``loraplex`` registry commands start fast.
"""

from .basemodel import BaseModelInfo, resolve_base_model
from .cache import AdapterCache
from .errors import (
    ConditionalWriteError, ConfigError, ConflictError, IncompatibleBaseError, IntegrityError, InvalidAdapterError, InvalidNameError,
    LoraplexError, NotFoundError, StorageError,
)
from .manifest import Manifest
from .reference import AdapterRef
from .registry import AdapterRegistry, AliasEvent, PushResult
from .spec import AdapterSpec, Limits, validate_adapter
from .storage import Storage, open_storage

__all__ = [
    "AdapterCache", "AdapterRef", "AdapterRegistry", "AdapterSpec", "AliasEvent", "BaseModelInfo", "ConditionalWriteError", "ConfigError",
    "ConflictError", "IncompatibleBaseError", "IntegrityError", "InvalidAdapterError", "InvalidNameError", "Limits",
    "LoraplexError", "Manifest", "NotFoundError", "PushResult", "Storage", "StorageError", "open_storage",
    "resolve_base_model", "validate_adapter",
]
