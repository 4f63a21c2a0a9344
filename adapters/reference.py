"""Adapter names and references: ``NAME``, ``NAME@7``, ``NAME@prod``.

Names are what end up in storage keys and folder names, so they are checked before anything else:
lowercase letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit, at most 63
characters, never ``..`` (no slashes, no path tricks).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidNameError

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
# Aliases follow the name rules but may not be all digits (that would read as a version).
ALIAS_RE = NAME_RE
LATEST = "latest"


def check_name(name: str, what: str = "adapter name") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise InvalidNameError(
            f"invalid {what} {name!r}: use 1-63 characters from a-z 0-9 . _ - starting with a letter "
            "or digit, no '..'"
        )
    return name


def check_alias(alias: str) -> str:
    check_name(alias, "alias")
    if alias.isdigit():
        raise InvalidNameError(f"invalid alias {alias!r}: an alias may not be all digits (that is a version)")
    return alias


@dataclass(frozen=True, slots=True)
class AdapterRef:
    """A parsed reference. Exactly one of ``version`` and ``alias`` may be set; neither means latest."""

    name: str
    version: int | None = None
    alias: str | None = None

    @classmethod
    def parse(cls, text: str) -> AdapterRef:
        if not isinstance(text, str) or text.count("@") > 1:
            raise InvalidNameError(f"invalid adapter reference {text!r}: expected NAME, NAME@VERSION or NAME@ALIAS")
        name, _, tail = text.partition("@")
        check_name(name)
        if not _:
            return cls(name)
        if tail.isdigit():
            version = int(tail)
            if version < 1 or tail != str(version):
                raise InvalidNameError(f"invalid version in {text!r}: versions are 1, 2, 3 ...")
            return cls(name, version=version)
        if tail.lower().startswith("v") and tail[1:].isdigit():
            return cls.parse(f"{name}@{tail[1:]}")
        if tail == LATEST:
            return cls(name)
        return cls(name, alias=check_alias(tail))

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@{self.version}"
        return f"{self.name}@{self.alias or LATEST}"
