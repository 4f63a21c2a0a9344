"""The adapters the vLLM engine serves: engine names -> checked local PEFT folders -> ``LoRARequest``s.

Names are those the API passes (see ``server.api.resolver``): ``NAME@VERSION`` (fetched through the
registry into its verified local cache), a folder path (loaded through the admin API), or a derived
``mix-<hash>`` / ``merge-<hash>`` made here. Every adapter is checked against the base model before
vLLM sees it (the registry's ``check_base``, and the tensors' shapes), so an adapter for another base is
a 400 and not an engine failure. Each distinct adapter gets one stable ``lora_int_id`` for the life of
the server: vLLM caches adapters by that id, so the id must change when the bytes do (a registry
version never changes; a folder is keyed by its weights file's mtime and size).
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from pathlib import Path

from loraplex.adapters import AdapterRegistry, BaseModelInfo, validate_adapter
from loraplex.adapters.errors import InvalidAdapterError, NotFoundError
from loraplex.adapters.spec import WEIGHTS_FILE, Limits, load_config, parse_config

from ..lora.merge import STRATEGIES, MergeSpec, merge
from ..lora.source import is_path
from ..lora.weights import LoraWeights
from .derived import DerivedStore


@dataclass(frozen=True, slots=True)
class CheckedAdapter:
    name: str  # the engine name
    identity: str  # what its lora_int_id is keyed by: the bytes it stands for
    folder: Path  # a PEFT LoRA folder, validated against the base
    rank: int  # the largest rank of any of its modules


def _rank(folder: Path) -> int:
    conf = parse_config(load_config(folder), Limits())
    return max([conf["rank"], *conf["rank_pattern"].values()])


class AdapterCatalog:
    def __init__(self, registry: AdapterRegistry | None, base: BaseModelInfo, max_rank: int, derived: DerivedStore) -> None:
        self.registry = registry
        self.base = base
        self.max_rank = max_rank
        self.derived = derived
        self._known: dict[str, CheckedAdapter] = {}  # checked: by name, or by path#mtime-size for a folder
        self._ids: dict[str, int] = {}  # identity -> lora_int_id
        self._names: dict[int, str] = {}  # lora_int_id -> engine name
        self._counter = itertools.count(1)
        self._lock = threading.Lock()

    # ---- one adapter -----------------------------------------------------------------------------------
    def check(self, name: str) -> CheckedAdapter:
        """Fetch (registry) and validate an adapter against the base; raise the API's errors."""
        key = name
        if is_path(name):  # a folder is checked again whenever its weights file changes
            folder = Path(name).expanduser()
            try:
                st = (folder / WEIGHTS_FILE).stat()
                key = f"{folder.resolve()}#{st.st_mtime_ns}-{st.st_size}"
            except OSError:
                pass  # validate_adapter says what is missing
        with self._lock:
            known = self._known.get(key)
        if known is not None:
            return known
        if is_path(name):
            validate_adapter(folder, self.base)
            checked = CheckedAdapter(name, key, folder, _rank(folder))
        else:
            if self.registry is None:
                raise NotFoundError(f"adapter {name!r} not found: no registry configured")
            manifest, folder = self.registry.fetch(name)
            self.registry.check_base(manifest, self.base)
            if manifest.base_fingerprint is None:  # the cache validated it, but not against a base
                validate_adapter(folder, self.base)
            checked = CheckedAdapter(manifest.ref, manifest.ref, folder, _rank(folder))
        if checked.rank > self.max_rank:
            raise InvalidAdapterError(f"adapter {name} has rank {checked.rank}, above max_lora_rank {self.max_rank}")
        with self._lock:
            self._known[key] = checked
        return checked

    def lora_id(self, checked: CheckedAdapter) -> int:
        """The adapter's stable ``lora_int_id`` (one per identity, never reused)."""
        with self._lock:
            if checked.identity not in self._ids:
                self._ids[checked.identity] = next(self._counter)
            lid = self._ids[checked.identity]
            self._names[lid] = checked.name
            return lid

    def names_by_id(self) -> dict[int, str]:
        with self._lock:
            return dict(self._names)

    def lora_request(self, checked: CheckedAdapter):
        from vllm.lora.request import LoRARequest

        return LoRARequest(checked.name, self.lora_id(checked), str(checked.folder))

    # ---- what a request asks for ----------------------------------------------------------------------
    def resolve(self, adapters: list[tuple[str, float]]) -> CheckedAdapter | None:
        """The one adapter vLLM serves a request with: none, the adapter itself, or the derived adapter
        of a weighted mixture (``sum w_i delta_i`` exactly: PEFT ``cat``, ranks summed)."""
        if not adapters:
            return None
        if len(adapters) == 1 and adapters[0][1] == 1.0:
            return self.check(adapters[0][0])
        names = [n for n, _ in adapters]
        if len(set(names)) != len(names):
            raise ValueError("an adapter appears twice in the mixture")
        sources = [self.check(n) for n in names]
        total = sum(s.rank for s in sources)
        if total > self.max_rank:
            raise InvalidAdapterError(
                f"the mixture's summed rank {total} ({' + '.join(str(s.rank) for s in sources)}) is above max_lora_rank "
                f"{self.max_rank}: the vLLM engine serves a mixture as one exact adapter of the summed rank; "
                "mix fewer adapters, raise max_lora_rank, or ask for a `merge` (e.g. svd) of them instead")
        spec = MergeSpec("cat", tuple(w for _, w in adapters))
        name = f"mix-{spec.cache_key([s.identity for s in sources])[:20]}"
        return self._derive(name, sources, spec, sources[0].rank if len(sources) == 1 else total)

    def add_merge(self, sources: list[str], request: dict) -> str:
        """Materialize the merge of ``sources`` and return its name, ``merge-<hash>``."""
        spec = MergeSpec.from_request(request)
        checked = [self.check(n) for n in sources]
        strategy = STRATEGIES["linear"] if len(checked) == 1 else spec.strategy_impl
        rank = strategy.new_rank([c.rank for c in checked], spec)
        if rank > self.max_rank:
            raise InvalidAdapterError(f"the {spec.strategy} merge has rank {rank}, above max_lora_rank {self.max_rank}; "
                                      "use a merge strategy of smaller rank (e.g. svd with svd_rank)")
        name = f"merge-{spec.cache_key([c.identity for c in checked])[:20]}"
        return self._derive(name, checked, spec, rank).name

    def _derive(self, name: str, sources: list[CheckedAdapter], spec: MergeSpec, rank: int) -> CheckedAdapter:
        with self._lock:
            known = self._known.get(name)
        if known is not None:
            return known

        def build() -> LoraWeights:
            return merge([LoraWeights.load(s.folder, s.name) for s in sources], spec, name)

        checked = CheckedAdapter(name, name, self.derived.folder(name, build), rank)
        with self._lock:
            self._known[name] = checked
        return checked
