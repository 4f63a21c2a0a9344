"""Domain errors of loraplex, in one place.

Every error a user can cause or meet carries a one-line message meant to be shown as is: the CLI
prints it after ``error:`` and exits non-zero; the HTTP API turns it into the OpenAI error envelope
using ``status`` and ``type``.
"""

from __future__ import annotations


class LoraplexError(Exception):
    """Base of every error loraplex raises on purpose."""

    status: int = 400
    type: str = "invalid_request_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidNameError(LoraplexError):
    """An adapter name, version reference or alias that does not follow the naming rules."""


class InvalidAdapterError(LoraplexError):
    """An adapter folder or file that fails validation (format, shapes, values, limits)."""


class IncompatibleBaseError(InvalidAdapterError):
    """An adapter whose tensors do not fit the base model it is meant for."""


class NotFoundError(LoraplexError):
    """A name, version or alias that the registry does not hold."""

    status = 404
    type = "not_found_error"


class ConflictError(LoraplexError):
    """An operation refused because of the registry's state (e.g. removing an aliased version)."""

    status = 409
    type = "conflict_error"


class IntegrityError(LoraplexError):
    """Stored bytes that do not match their manifest (corruption or tampering)."""

    status = 500
    type = "server_error"


class StorageError(LoraplexError):
    """The storage backend failed: unreachable, refused credentials, missing bucket, full disk."""

    status = 503
    type = "server_error"


class EngineError(LoraplexError):
    """The inference engine failed while serving a request (not the request's fault)."""

    status = 500
    type = "server_error"


class EngineUnavailableError(LoraplexError):
    """The engine is down (it died and is restarting): the request was not served; retrying later will work."""

    status = 503
    type = "server_error"
    headers = {"Retry-After": "2"}


class ConfigError(LoraplexError):
    """A bad option, config file or registry URI."""


class ConditionalWriteError(StorageError):
    """A store that ignores conditional writes (``If-None-Match: *``): exclusive creates are not exclusive there,
    so two pushes could share a version number. Writes to it are refused."""
