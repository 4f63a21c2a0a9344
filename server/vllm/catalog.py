"""The adapters the vLLM engine serves: engine names -> checked local PEFT folders -> ``LoRARequest``s.

Names are those the API passes (see ``server.api.resolver``): ``NAME@VERSION`` (fetched through the
registry into its verified local cache), a folder path (loaded through the admin API), or a derived
``mix-<hash>`` / ``merge-<hash>`` made here. Every adapter is checked against the base model before
vLLM sees it (the registry's ``check_base``, and the tensors' shapes), so an adapter for another base is
a 400 and not an engine failure. Each distinct adapter gets one stable ``lora_int_id`` for the life of
the server: vLLM caches adapters by that id, so the id must change when the bytes do (a registry
version never changes; a folder is keyed by its weights file's mtime and size).

Bounded, whatever the clients send: at most ``max_derived`` derived adapters are kept (their folders on disk,
their ids in vLLM). Adding one more evicts the least recently used one that no request or pin holds
(``resolve(..., hold=True)`` / ``release``): its folder is deleted, its id dropped and ``on_evict(lora_int_id)``
told (the backend removes it from vLLM). Asked again, it is rebuilt under a new id (same bytes; an id is never
reused for other bytes). Checked registry and folder adapters (``max_known``) and the recipes that rebuild an
evicted derived adapter by its name (a merge's name is all a later request carries) are LRU-bounded too.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
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


def lora_key(checked: CheckedAdapter) -> str:
    """The LoRA name vLLM sees (and hashes its cached blocks under, with the path)."""
    if checked.identity == checked.name:
        return checked.name
    return f"{checked.name}#{hashlib.blake2b(checked.identity.encode(), digest_size=8).hexdigest()}"


def _rank(folder: Path) -> int:
    conf = parse_config(load_config(folder), Limits())
    return max([conf["rank"], *conf["rank_pattern"].values()])


class AdapterCatalog:
    def __init__(self, registry: AdapterRegistry | None, base: BaseModelInfo, max_rank: int, derived: DerivedStore,
                 max_derived: int = 64, max_known: int = 4096, on_evict: Callable[[int], None] | None = None) -> None:
        if max_derived < 1 or max_known < 1:
            raise ValueError("max_derived and max_known must be at least 1")
        self.registry = registry
        self.base = base
        self.max_rank = max_rank
        self.derived = derived
        self.max_derived = max_derived
        self.max_known = max_known
        self.on_evict = on_evict
        # LRU (oldest first): checked registry/folder adapters, by name or path#mtime-size for a folder
        self._known: OrderedDict[str, CheckedAdapter] = OrderedDict()
        self._derived: OrderedDict[str, CheckedAdapter] = OrderedDict()  # LRU: derived adapters on disk
        self._recipes: OrderedDict[str, tuple] = OrderedDict()  # LRU: derived name -> (sources, spec, rank)
        self._holds: Counter[str] = Counter()  # derived name -> requests and pins using it (never evicted)
        self._ids: dict[str, int] = {}  # identity -> lora_int_id
        self._names: dict[int, str] = {}  # lora_int_id -> engine name
        self._counter = itertools.count(1)
        self._lock = threading.Lock()

    # ---- one adapter -----------------------------------------------------------------------------------
    def check(self, name: str, hold: bool = False) -> CheckedAdapter:
        """Fetch (registry) and validate an adapter against the base; raise the API's errors. A derived
        adapter's name is known here (rebuilt if it was evicted); ``hold`` as for ``resolve``."""
        with self._lock:
            recipe = self._recipes.get(name)
        if recipe is not None:
            return self._derive(name, *recipe, hold=hold)
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
                self._known.move_to_end(key)
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
            _trim(self._known, self.max_known)
        return checked

    def lora_id(self, checked: CheckedAdapter) -> int:
        """The adapter's ``lora_int_id``: one per identity, never reused (an evicted derived adapter's id is
        dropped; rebuilt, it gets a new one)."""
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
        """vLLM's request for ``checked``. vLLM keys its prefix cache's blocks by the LoRA's name and path
        (``vllm.v1.core.kv_cache_utils``): a registry version (``NAME@V``, in the cache's content-addressed
        folder) and a derived adapter (named by the hash of its inputs) are unique by both; a folder loaded by
        path gets its identity (path, mtime, size) in the name, so new weights in the same folder never reuse
        the blocks the old ones computed."""
        from vllm.lora.request import LoRARequest

        return LoRARequest(lora_key(checked), self.lora_id(checked), str(checked.folder))

    # ---- what a request asks for ----------------------------------------------------------------------
    def resolve(self, adapters: list[tuple[str, float]], hold: bool = False) -> CheckedAdapter | None:
        """The one adapter vLLM serves a request with: none, the adapter itself, or the derived adapter
        of a weighted mixture (``sum w_i delta_i`` exactly: PEFT ``cat``, ranks summed). With ``hold``, a
        derived one is not evicted until ``release``."""
        if not adapters:
            return None
        if len(adapters) == 1 and adapters[0][1] == 1.0:
            return self.check(adapters[0][0], hold=hold)
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
        return self._derive(name, sources, spec, sources[0].rank if len(sources) == 1 else total, hold=hold)

    def release(self, checked: CheckedAdapter | None) -> None:
        """Let go of a hold taken by ``resolve``/``check`` (a no-op for an adapter that is not derived)."""
        if checked is None:
            return
        with self._lock:
            held = self._holds.pop(checked.name, 0)
            if held > 1:
                self._holds[checked.name] = held - 1
            victims = self._evict()
        self._forget(victims)

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

    def derived_names(self) -> list[str]:
        """The derived adapters kept now, least recently used first."""
        with self._lock:
            return list(self._derived)

    # ---- derived adapters --------------------------------------------------------------------------------
    def _derive(self, name: str, sources: list[CheckedAdapter], spec: MergeSpec, rank: int,
                hold: bool = False) -> CheckedAdapter:
        with self._lock:
            self._recipes[name] = (sources, spec, rank)
            self._recipes.move_to_end(name)
            _trim(self._recipes, self.max_known, keep=self._derived)
            known = self._derived.get(name)
            if known is not None:
                self._derived.move_to_end(name)
                if hold:
                    self._holds[name] += 1
                return known

        def build() -> LoraWeights:
            return merge([LoraWeights.load(s.folder, s.name) for s in sources], spec, name)

        while True:
            folder = self.derived.folder(name, build)
            with self._lock:
                checked = self._derived.get(name)
                if checked is None:
                    if not self.derived.exists(name):  # evicted between its build and here: build it again
                        continue
                    checked = self._derived[name] = CheckedAdapter(name, name, folder, rank)
                self._derived.move_to_end(name)
                if hold:
                    self._holds[name] += 1
                victims = self._evict()
            self._forget(victims)
            return checked

    def _evict(self) -> list[tuple[str, int | None]]:
        """Under the lock: drop the least recently used derived adapters nobody holds, down to the bound (the
        newest is never dropped); delete their folders. Returns (name, lora_int_id) of each."""
        victims = []
        for name in list(self._derived)[:-1]:
            if len(self._derived) <= self.max_derived:
                break
            if self._holds.get(name, 0) > 0:
                continue
            del self._derived[name]
            lid = self._ids.pop(name, None)
            if lid is not None:
                self._names.pop(lid, None)
            self.derived.remove(name)  # under the lock: a concurrent _derive sees it gone and builds it again
            victims.append((name, lid))
        return victims

    def _forget(self, victims: list[tuple[str, int | None]]) -> None:
        if self.on_evict is None:
            return
        for _, lid in victims:
            if lid is not None:
                self.on_evict(lid)


def _trim(lru: OrderedDict, bound: int, keep=()) -> None:
    """Drop the oldest entries of ``lru`` beyond ``bound``, except those in ``keep``."""
    for key in list(lru):
        if len(lru) <= bound:
            return
        if key not in keep:
            del lru[key]
