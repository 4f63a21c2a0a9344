"""Fixtures of the engine tests: the tiny Llama's PEFT adapters and PEFT's own outputs for them."""

from __future__ import annotations

import pytest
from engine_fixtures import make_peft_adapters, peft_reference


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return make_peft_adapters(tmp_path_factory.mktemp("peft"))


@pytest.fixture(scope="module")
def reference(folders):
    return peft_reference(folders)
