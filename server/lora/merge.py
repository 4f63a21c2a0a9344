"""Derived adapters: merge several LoRA adapters into one, with PEFT's ``add_weighted_adapter`` math.

``merge(adapters, MergeSpec(...))`` returns a new ``LoraWeights`` whose every module has the same
dense delta (``scale * B @ A``) as PEFT's merged adapter for the same inputs, strategy and
parameters. Strategies are looked up by name in ``STRATEGIES`` (see ``register_strategy``):

* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: combine the A factors
  and the B factors *separately* (not the deltas). Source ``i`` gets ``sign(w_i s_i) sqrt(|w_i s_i|)``
  on its A and ``sqrt(|w_i s_i|)`` on its B, ``s_i`` being its scale; all sources need one rank.
  The result is not ``sum w_i delta_i``: cross terms ``B_i A_j`` remain (PEFT calls linear "a very
  rough approximation").
* ``cat``: A is the row concatenation of ``w_i s_i A_i``, B the column concatenation of ``B_i``.
  Exact: the delta is ``sum w_i delta_i``; the rank is the sum of the ranks.
* ``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``: combine
  the dense deltas ``s_i B_i A_i``, then truncate an SVD to ``svd_rank`` (default: the largest source
  rank), optionally clamping the factors' entries at the ``svd_clamp`` quantile. (PEFT's default is a
  full SVD, ``full_matrices=True``; the reduced one used here has the same leading factors and costs far
  less on wide MLP matrices.)

The result's scale is always 1.0, as in PEFT, which gives the merged adapter ``r = lora_alpha =
new_rank``. (PEFT copies the rest of the first source's config, so with ``use_rslora=True`` there
its merged adapter is scaled by ``sqrt(new_rank)`` instead: a PEFT quirk not reproduced here.)
Modules that only some sources carry are merged from those sources alone (the others contribute
nothing, and draw no random numbers), as PEFT does. With a single source every strategy is
``linear``, as in PEFT (so no pruning, no SVD truncation).

Random strategies (``dare_*``) draw ``torch.bernoulli`` masks in PEFT's order: modules in model order
(layer by layer; q, k, v, o, gate, up, down), for each module the A side then the B side (or the
deltas for ``*_svd``), one mask per source. Before that, on CPU, the generator is advanced exactly as
PEFT's injection of the new adapter advances it (it initialises the new A and B with ``uniform_``), so
``MergeSpec(seed=s)`` gives the result of ``torch.manual_seed(s); model.add_weighted_adapter(...)``
for a model on the same device with the default ``init_lora_weights=True`` and ``lora_bias=False``.
A seed uses a private ``torch.Generator``; without one the device's global generator is used.
"""

from __future__ import annotations

import hashlib
import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar, Literal

import torch

from loraplex.adapters.errors import InvalidAdapterError
from loraplex.adapters.spec import MAX_ADAPTER_WEIGHT

from .weights import PROJECTIONS, LoraModule, LoraWeights, ModuleKey

__all__ = [
    "InvalidMergeError", "MergeSpec", "MergeStrategy", "STRATEGIES", "register_strategy", "merge",
]

SIGN_METHODS = ("total", "frequency")
_KEY_VERSION = 1


class InvalidMergeError(InvalidAdapterError, ValueError):
    """A merge request that cannot be carried out (bad parameters or incompatible adapters)."""


# --------------------------------------------------------------------------------------------------
# Task-tensor combiners: PEFT's peft.utils.merge_utils, with an explicit generator.
# --------------------------------------------------------------------------------------------------

def _weights_like(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return weights.view(weights.shape + (1,) * (stacked.dim() - weights.dim()))


def _prune_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return t
    mask = torch.zeros_like(t).reshape(-1)
    k = int(density * t.numel())
    top_k = torch.topk(t.abs().reshape(-1), k=k, largest=True)
    mask[top_k[1]] = 1
    return t * mask.reshape(t.shape)


def _prune_random(t: torch.Tensor, density: float, gen: torch.Generator | None) -> torch.Tensor:
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(input=t, fill_value=density), generator=gen)
    return t * mask / density


def _majority_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    majority = torch.where(magnitude >= 0, 1, -1)
    return sign == majority


def _disjoint_merge(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mixed = (weighted * mask).sum(dim=0)
    return mixed / torch.clamp(mask.sum(dim=0), min=1.0)


def _weighted_sum(tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    stacked = torch.stack(tensors, dim=0)
    return (stacked * _weights_like(stacked, weights)).sum(dim=0)


def _weighted_ties(tensors: list[torch.Tensor], weights: torch.Tensor, method: str) -> torch.Tensor:
    stacked = torch.stack(tensors, dim=0)
    mask = _majority_sign_mask(stacked, method)
    return _disjoint_merge(stacked * _weights_like(stacked, weights), mask)


Combiner = Callable[[list[torch.Tensor], torch.Tensor, "MergeSpec", "torch.Generator | None"], torch.Tensor]

COMBINERS: dict[str, Combiner] = {
    "linear": lambda ts, w, spec, g: _weighted_sum(ts, w),
    "magnitude_prune": lambda ts, w, spec, g: _weighted_sum([_prune_magnitude(t, spec.density) for t in ts], w),
    "ties": lambda ts, w, spec, g: _weighted_ties(
        [_prune_magnitude(t, spec.density) for t in ts], w, spec.majority_sign_method),
    "dare_linear": lambda ts, w, spec, g: _weighted_sum([_prune_random(t, spec.density, g) for t in ts], w),
    "dare_ties": lambda ts, w, spec, g: _weighted_ties(
        [_prune_random(t, spec.density, g) for t in ts], w, spec.majority_sign_method),
}


# --------------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------------

class MergeStrategy(ABC):
    """How one module of the merged adapter is computed from the sources that carry it."""

    name: ClassVar[str]
    uses_density: ClassVar[bool] = False  # density is required
    uses_sign_method: ClassVar[bool] = False  # majority_sign_method matters
    uses_svd: ClassVar[bool] = False  # svd_rank / svd_clamp matter
    random: ClassVar[bool] = False  # draws random numbers (seed matters)

    @abstractmethod
    def new_rank(self, ranks: list[int], spec: MergeSpec) -> int:
        """The rank PEFT gives the merged adapter (its r and lora_alpha); ``ranks`` are the sources'."""

    @abstractmethod
    def merge_module(self, mods: list[LoraModule], weights: list[float], spec: MergeSpec, new_rank: int,
                     gen: torch.Generator | None) -> LoraModule:
        """Merge one module; ``mods``/``weights`` are only the sources that carry it, in input order."""


STRATEGIES: dict[str, MergeStrategy] = {}


def register_strategy(cls: type[MergeStrategy]) -> type[MergeStrategy]:
    STRATEGIES[cls.name] = cls()
    return cls


def _task_strategy(base: str) -> type[MergeStrategy]:
    """linear / ties / dare_linear / dare_ties / magnitude_prune on the A and B factors separately."""

    class _Task(MergeStrategy):
        name = base
        uses_density = base != "linear"
        uses_sign_method = base in ("ties", "dare_ties")
        random = base.startswith("dare_")

        def new_rank(self, ranks, spec):
            if len(set(ranks)) != 1:
                raise InvalidMergeError(
                    f"merge strategy {self.name} needs adapters of one rank, got ranks {ranks}; use cat or svd")
            return ranks[0]

        def merge_module(self, mods, weights, spec, new_rank, gen):
            w_a, w_b = [], []
            for m, w in zip(mods, weights):
                ws = w * m.scale
                sign = 1 if ws >= 0 else -1
                w_a.append(math.sqrt(abs(ws)) * sign)
                w_b.append(math.sqrt(abs(ws)))
            device, dtype = mods[0].a.device, mods[0].a.dtype
            combine = COMBINERS[base]
            a = combine([m.a for m in mods], torch.tensor(w_a).to(device), spec, gen)
            b = combine([m.b for m in mods], torch.tensor(w_b).to(device), spec, gen)
            return LoraModule(a.to(dtype), b.to(dtype), 1.0)

    _Task.__name__ = _Task.__qualname__ = "".join(p.title() for p in base.split("_")) + "Strategy"
    return _Task


def _svd_strategy(base: str) -> type[MergeStrategy]:
    """svd / <base>_svd: combine the dense deltas, then a truncated SVD."""

    class _Svd(MergeStrategy):
        name = "svd" if base == "linear" else f"{base}_svd"
        uses_density = base != "linear"
        uses_sign_method = base in ("ties", "dare_ties")
        uses_svd = True
        random = base.startswith("dare_")

        def new_rank(self, ranks, spec):
            return spec.svd_rank or max(ranks)

        def merge_module(self, mods, weights, spec, new_rank, gen):
            device, dtype = mods[0].a.device, mods[0].a.dtype
            deltas = [_peft_delta(m) for m in mods]
            delta = COMBINERS[base](deltas, torch.tensor(weights).to(device), spec, gen)
            if delta.dtype in (torch.float16, torch.bfloat16):
                delta = delta.float()  # no half-precision SVD on CPU
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            u = u[:, :new_rank] @ torch.diag(s[:new_rank])
            vh = vh[:new_rank, :]
            if spec.svd_clamp is not None:
                hi = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), spec.svd_clamp)
                u, vh = u.clamp(-hi, hi), vh.clamp(-hi, hi)
            return LoraModule(vh.to(dtype).contiguous(), u.to(dtype).contiguous(), 1.0)

    _Svd.__name__ = _Svd.__qualname__ = "".join(p.title() for p in _Svd.name.split("_")) + "Strategy"
    return _Svd


def _peft_delta(m: LoraModule) -> torch.Tensor:
    """PEFT's Linear.get_delta_weight: (B @ A) * scale, through fp32 for half tensors on CPU."""
    a, b = m.a, m.b
    if a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16):
        return ((b.float() @ a.float()) * m.scale).to(a.dtype)
    return (b @ a) * m.scale


@register_strategy
class CatStrategy(MergeStrategy):
    name = "cat"

    def new_rank(self, ranks, spec):
        return sum(ranks)

    def merge_module(self, mods, weights, spec, new_rank, gen):
        # PEFT pads A and B with zero rows/columns up to the summed rank of all sources when this module
        # lacks some of them; the zeros change nothing, so they are left out here.
        a = torch.cat([m.a * w * m.scale for m, w in zip(mods, weights)], dim=0)
        b = torch.cat([m.b for m in mods], dim=1)
        return LoraModule(a.contiguous(), b.contiguous(), 1.0)


for _base in ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"):
    register_strategy(_task_strategy(_base))
    register_strategy(_svd_strategy(_base))
del _base


# --------------------------------------------------------------------------------------------------
# The request
# --------------------------------------------------------------------------------------------------

def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidMergeError(f"merge {what} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class MergeSpec:
    """A merge request, validated on construction; ``weights`` has one entry per adapter to merge."""

    strategy: str
    weights: tuple[float, ...]
    density: float | None = None
    majority_sign_method: Literal["total", "frequency"] = "total"
    svd_rank: int | None = None
    svd_clamp: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.strategy, str) or self.strategy not in STRATEGIES:
            raise InvalidMergeError(
                f"unknown merge strategy {self.strategy!r}; known: {', '.join(sorted(STRATEGIES))}")
        strat = STRATEGIES[self.strategy]
        if isinstance(self.weights, (str, bytes)) or not hasattr(self.weights, "__iter__"):
            raise InvalidMergeError(f"merge weights must be a list of numbers, got {self.weights!r}")
        weights = tuple(_number(w, "weight") for w in self.weights)
        if any(abs(w) > MAX_ADAPTER_WEIGHT for w in weights):
            raise InvalidMergeError(f"merge weights must be in [-{MAX_ADAPTER_WEIGHT:g}, {MAX_ADAPTER_WEIGHT:g}]")
        if not weights:
            raise InvalidMergeError("merge needs at least one adapter weight")
        object.__setattr__(self, "weights", weights)
        if self.density is not None:
            d = _number(self.density, "density")
            if not 0.0 < d <= 1.0:
                raise InvalidMergeError(f"merge density must be in (0, 1], got {d}")
            if not strat.uses_density:
                raise InvalidMergeError(f"merge strategy {self.strategy} takes no density")
            object.__setattr__(self, "density", d)
        elif strat.uses_density:
            raise InvalidMergeError(f"merge strategy {self.strategy} needs a density in (0, 1]")
        if self.majority_sign_method not in SIGN_METHODS:
            raise InvalidMergeError(
                f"majority_sign_method must be 'total' or 'frequency', got {self.majority_sign_method!r}")
        if self.majority_sign_method != "total" and not strat.uses_sign_method:
            raise InvalidMergeError(f"merge strategy {self.strategy} takes no majority_sign_method")
        if self.svd_rank is not None:
            if isinstance(self.svd_rank, bool) or not isinstance(self.svd_rank, int) or self.svd_rank <= 0:
                raise InvalidMergeError(f"svd_rank must be a positive integer, got {self.svd_rank!r}")
            if not strat.uses_svd:
                raise InvalidMergeError(f"merge strategy {self.strategy} takes no svd_rank")
        if self.svd_clamp is not None:
            q = _number(self.svd_clamp, "svd_clamp")
            if not 0.0 <= q <= 1.0:
                raise InvalidMergeError(f"svd_clamp must be a quantile in [0, 1], got {q}")
            if not strat.uses_svd:
                raise InvalidMergeError(f"merge strategy {self.strategy} takes no svd_clamp")
            object.__setattr__(self, "svd_clamp", q)
        if self.seed is not None:
            if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
                raise InvalidMergeError(f"merge seed must be an integer in [0, 2**63), got {self.seed!r}")

    @classmethod
    def from_request(cls, merge: dict) -> MergeSpec:
        """From the API's merge object (``strategy``, ``weights`` and the strategy's parameters)."""
        return cls(merge["strategy"], tuple(merge["weights"]), density=merge.get("density"),
                   majority_sign_method=merge.get("majority_sign_method", "total"), svd_rank=merge.get("svd_rank"),
                   svd_clamp=merge.get("svd_clamp"), seed=merge.get("seed"))

    @property
    def strategy_impl(self) -> MergeStrategy:
        return STRATEGIES[self.strategy]

    def cache_key(self, adapter_names: list[str] | tuple[str, ...]) -> str:
        """sha256 hex of the inputs' names (in order), the weights, the strategy and its parameters.

        Parameters a strategy ignores are left out (the seed of a strategy that draws no random numbers).
        """
        strat = self.strategy_impl
        doc = {
            "v": _KEY_VERSION,
            "adapters": list(adapter_names),
            "strategy": self.strategy,
            "weights": [w.hex() for w in self.weights],
            "density": self.density.hex() if self.density is not None else None,
            "majority_sign_method": self.majority_sign_method if strat.uses_sign_method else None,
            "svd_rank": self.svd_rank,
            "svd_clamp": self.svd_clamp.hex() if self.svd_clamp is not None else None,
            "seed": self.seed if strat.random else None,
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# merge()
# --------------------------------------------------------------------------------------------------

def _model_order(key: ModuleKey) -> tuple[int, int, str]:
    """The order PEFT visits modules in (named_modules of a Llama-style decoder)."""
    idx = PROJECTIONS.index(key.proj) if key.proj in PROJECTIONS else len(PROJECTIONS)
    return key.layer, idx, key.proj


def _advance_like_peft_injection(gen: torch.Generator | None, shapes: list[tuple[int, int]], new_rank: int) -> None:
    """Draw what PEFT's inject_adapter draws for the new adapter (init_lora_weights=True, on CPU):
    nn.Linear(in, r) and nn.Linear(r, out) init their weights with uniform_, then
    reset_lora_parameters runs kaiming_uniform_ (uniform_) on A again and zeros B."""
    for in_f, out_f in shapes:
        torch.empty(new_rank, in_f).uniform_(generator=gen)
        torch.empty(out_f, new_rank).uniform_(generator=gen)
        torch.empty(new_rank, in_f).uniform_(generator=gen)


def merge(adapters: list[LoraWeights], spec: MergeSpec, name: str | None = None) -> LoraWeights:
    """A new adapter merging ``adapters`` as PEFT's ``add_weighted_adapter`` would (see module doc).

    ``name`` defaults to ``"merged-" + spec.cache_key(...)[:16]``. Raises InvalidMergeError.
    """
    if not adapters:
        raise InvalidMergeError("merge needs at least one adapter")
    if len(spec.weights) != len(adapters):
        raise InvalidMergeError(
            f"merge got {len(spec.weights)} weights for {len(adapters)} adapters; give one weight per adapter")
    names = [a.name for a in adapters]
    if name is None:
        name = "merged-" + spec.cache_key(names)[:16]
    # PEFT: "if there is only one adapter, we can only use linear merging".
    strat = STRATEGIES["linear"] if len(adapters) == 1 else spec.strategy_impl
    new_rank = strat.new_rank([a.rank for a in adapters], spec)

    keys = sorted({k for a in adapters for k in a.modules}, key=_model_order)
    device = adapters[0].modules[next(iter(adapters[0].modules))].a.device
    dtype = adapters[0].modules[next(iter(adapters[0].modules))].a.dtype
    plan: list[tuple[ModuleKey, list[LoraModule], list[float]]] = []
    for key in keys:
        mods, ws = [], []
        for a, w in zip(adapters, spec.weights):
            m = a.modules.get(key)
            if m is None:
                continue
            if mods and (m.a.shape[1], m.b.shape[0]) != (mods[0].a.shape[1], mods[0].b.shape[0]):
                raise InvalidMergeError(
                    f"adapters {names[0]} and {a.name} disagree on the shape of {key}: "
                    f"{tuple(mods[0].b.shape[:1]) + tuple(mods[0].a.shape[1:])} vs "
                    f"{tuple(m.b.shape[:1]) + tuple(m.a.shape[1:])}")
            if mods and not strat.uses_svd and strat.name != "cat" and m.rank != mods[0].rank:
                raise InvalidMergeError(
                    f"merge strategy {strat.name} needs one rank per module, but {key} has ranks "
                    f"{mods[0].rank} and {m.rank}; use cat or svd")
            mods.append(LoraModule(m.a.to(device, dtype), m.b.to(device, dtype), m.scale))
            ws.append(w)
        plan.append((key, mods, ws))

    gen: torch.Generator | None = None
    if strat.random:
        if spec.seed is not None:
            gen = torch.Generator(device=device)
            gen.manual_seed(spec.seed)
        if device.type == "cpu":
            _advance_like_peft_injection(gen, [(ms[0].a.shape[1], ms[0].b.shape[0]) for _, ms, _ in plan], new_rank)

    modules = {key: strat.merge_module(mods, ws, spec, new_rank, gen) for key, mods, ws in plan}
    return LoraWeights(name, dict(sorted(modules.items())))
