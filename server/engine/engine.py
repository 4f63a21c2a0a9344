"""The engine: requests in, tokens out, many adapters per forward pass.

``step()`` is the whole loop body: schedule, build the batch, run the decoder once, sample,
append, detokenize, finish. It never waits on I/O: adapter loads run on the manager's thread; while
one runs, a step ends by handing it a bounded share of the machine (``EngineConfig.load_share``).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence as Seq
from dataclasses import dataclass, replace

import torch

from loraplex.adapters.errors import EngineError

from ..lora.bank import LoraBank
from ..lora.manager import AdapterManager, Loader
from ..lora.weights import LoraWeights
from ..model.decoder import Decoder
from ..model.kv_cache import CacheShape, KVCache
from .batch import Work, build_step
from .block_pool import BlockPool
from .request import MAX_MIXTURE, check_mixture
from .sampling import Sampler, SamplingParams, make_generator
from .scheduler import SchedulerConfig, Scheduler
from .sequence import RequestOutput, Sequence, Status

log = logging.getLogger("loraplex.engine")


_MAX_YIELD = 0.02  # seconds: the most one step yields to adapter loads


@dataclass(frozen=True, slots=True)
class EngineConfig:
    max_loras: int = 8  # adapters resident in device slots at once
    max_lora_rank: int = 64
    max_cpu_loras: int = 32  # adapters kept in host memory
    max_running: int = 32  # concurrent sequences
    max_model_len: int | None = None  # prompt + output tokens per sequence (None: the model's context length)
    kv_cache_gib: float | None = None  # the KV block pool's budget (None: DEFAULT_KV_CACHE_GIB, and no more than
    # max_running sequences of max_model_len tokens need)
    block_size: int = 16  # tokens per KV block
    prefix_caching: bool = True  # reuse the KV blocks of earlier requests' identical prefixes (same adapter)
    max_batched_tokens: int = 512
    prefill_chunk: int = 256
    seed: int | None = None
    # While an adapter loads, the loop yields this fraction of its step time to the loader (at most
    # 20 ms a step): the other streams slow by about this much, and a cold adapter is served sooner.
    load_share: float = 0.15

    def __post_init__(self) -> None:
        for name in ("max_loras", "max_lora_rank", "max_cpu_loras", "max_running", "max_batched_tokens",
                     "prefill_chunk", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be at least 2")
        if self.kv_cache_gib is not None and not self.kv_cache_gib > 0:
            raise ValueError("kv_cache_gib must be positive")
        if not 0 <= self.load_share < 1:
            raise ValueError("load_share must be in [0, 1)")


class Engine:
    def __init__(self, model: torch.nn.Module, config, tokenizer=None, *, engine_config: EngineConfig = EngineConfig(),
                 loader: Loader | None = None, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                 owns_model: bool = False) -> None:
        """owns_model: nothing else will call ``model``, so the dense weights that the decoder's packed
        copies replace are freed (about the size of the base's linears in bf16)."""
        self.config = engine_config
        self.tokenizer = tokenizer
        self.dtype = dtype or next(p.dtype for p in model.parameters() if p.is_floating_point())
        self.device = device
        self.decoder = Decoder(model, config, self.dtype, device)
        if owns_model:
            self.decoder.release_dense()
        if engine_config.max_model_len is None:  # the model's own context length
            engine_config = replace(engine_config, max_model_len=self.decoder.max_positions)
            self.config = engine_config
        if self.decoder.max_positions < engine_config.max_model_len:
            self.decoder.extend_rope(engine_config.max_model_len)
        self.cache = KVCache(_cache_shape(engine_config, self.decoder, self.dtype), self.dtype, device)
        self.pool = BlockPool(self.cache, caching=engine_config.prefix_caching)
        lora_dtype = torch.float32 if torch.device(device).type == "cpu" else self.dtype
        self.bank = LoraBank(self.decoder.module_shapes(), engine_config.max_loras, engine_config.max_lora_rank,
                             lora_dtype, device)
        self.adapters = AdapterManager(self.bank, loader or _no_loader, engine_config.max_cpu_loras)
        self.scheduler = Scheduler(SchedulerConfig(engine_config.max_running, engine_config.max_batched_tokens,
                                                   engine_config.prefill_chunk), self.pool, self.adapters)
        self.sampler = Sampler(device, engine_config.seed)
        self.vocab_size = config.vocab_size
        self.eos_ids = _eos_ids(model, tokenizer)
        self._seqs: dict[str, Sequence] = {}
        self._ids = itertools.count()

    # ---- requests ----------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams = SamplingParams(), *,
                    adapters: str | Seq[tuple[str, float]] | None = None, request_id: str | None = None) -> str:
        """Queue a request. ``adapters``: one adapter name, or (name, weight) pairs for a mixture."""
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = self._encode(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        if len(ids) + 1 > self.config.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; this engine allows at most {self.config.max_model_len - 1}")
        longest = min(len(ids) + params.max_tokens, self.config.max_model_len)
        if self.pool.blocks_for(longest) > self.pool.total_blocks:  # could never run, even alone
            room = self.pool.total_blocks * self.pool.block_size
            raise ValueError(f"the prompt and max_tokens need up to {longest} tokens of KV cache; this engine's holds "
                             f"{room}: ask for fewer tokens (or start the server with a larger --kv-cache-gib)")
        if params.top_k > self.vocab_size:
            raise ValueError(f"top_k must be at most the vocabulary size ({self.vocab_size}), got {params.top_k}")
        if any(t >= self.vocab_size for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in [0, {self.vocab_size})")
        if any(t >= self.vocab_size for t, _ in params.logit_bias):
            raise ValueError(f"logit_bias token ids must be in [0, {self.vocab_size})")
        mix = _normalize_adapters(adapters)
        self.adapters.check_fits([name for name, _ in mix])  # a set that can never be placed whole waits for ever
        seq = Sequence(request_id, ids, params, mix, make_generator(params.seed, self.device))
        self._seqs[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def register_adapter(self, name: str, loader: Callable[[str], LoraWeights]) -> None:
        """Serve ``name`` from a custom loader (a merge, an in-memory adapter)."""
        self.adapters.register_derived(name, loader)

    def add_merge(self, sources: Seq[str], spec) -> str:
        """Serve the merge of ``sources`` (adapter names) with a ``MergeSpec``; returns the derived
        adapter's name, ``merge-<hash of inputs, weights, strategy and params>``, so the same merge
        asked twice is computed once (then cached in the host tier like any adapter)."""
        from ..lora.merge import merge

        names = list(sources)
        if len(set(names)) != len(names) or len(names) > MAX_MIXTURE:
            raise ValueError(f"a merge takes at most {MAX_MIXTURE} distinct adapters")
        if spec.svd_rank is not None and spec.svd_rank > self.config.max_lora_rank:
            raise ValueError(f"svd_rank must be at most max_lora_rank ({self.config.max_lora_rank}), got {spec.svd_rank}")
        name = f"merge-{spec.cache_key(names)[:20]}"
        self.adapters.register_derived(name, lambda _n: merge([self.adapters.loader(n) for n in names], spec, name))
        return name

    def abort(self, request_id: str) -> None:
        seq = self._seqs.pop(request_id, None)
        if seq is not None and not seq.finished:
            seq.finish_reason = "abort"
            self.scheduler.finish(seq)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass token ids")
            return list(self.tokenizer.encode(prompt, add_special_tokens=False))
        return [int(t) for t in prompt]

    # ---- the loop ----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One step of every running request. A failure inside it (a kernel, the sampler, a bad value) ends the
        requests of that step with an ``EngineError`` output (the API's 500) and leaves the engine serving: the
        next step starts from a clean plan, and the failed requests' KV slots and adapter references are freed."""
        start = time.perf_counter()
        try:
            outputs = self._step()
        except Exception as exc:  # noqa: BLE001  a failure outside the forward (scheduling): end everything queued
            outputs = self._fail_step(exc, waiting=True)
        if self.scheduler.running:  # returns at once unless a load is running
            self.adapters.yield_to_loads(min(_MAX_YIELD, self.config.load_share * (time.perf_counter() - start)))
        return outputs

    def _step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        outputs = [self._fail(seq, exc) for seq, exc in self.scheduler.failed]
        self.scheduler.failed.clear()
        if not plan:
            return outputs
        try:
            self._run(plan, outputs)
        except Exception as exc:  # noqa: BLE001  (any failure must not stop the loop)
            outputs += self._fail_step(exc)
        return outputs

    def _run(self, plan, outputs: list[RequestOutput]) -> None:
        """Forward the plan's tokens, sample, append: outputs go to ``outputs`` as they are made."""
        work = []
        for s in plan:
            seq = s.seq
            scored = 0
            if seq.prefilling:  # its prompt; after a preemption, its outputs too (computed again, not sampled)
                tokens = seq.all_ids[seq.num_cached:seq.num_cached + s.num_tokens]
                wants = seq.num_cached + s.num_tokens == seq.prefill_len and not seq.output_ids
                if seq.params.prompt_logprobs is not None:  # positions whose next token is a prompt token
                    scored = max(0, min(len(tokens), len(seq.prompt_ids) - 1 - seq.num_cached))
            else:
                tokens, wants = [seq.all_ids[-1]], True
            work.append(Work(tokens, seq.num_cached, seq.blocks, s.lora, wants, scored))
        batch, rows, scoring = build_step(work, self.bank.ranks, self.bank.dtype, self.device, self.cache.block_size)
        logits = self.decoder.forward(batch, self.cache, self.bank)
        if scoring:
            self._score(logits[len(rows):], [plan[i].seq for i in scoring], [work[i] for i in scoring])
            logits = logits[:len(rows)]
        for s, w in zip(plan, work):
            s.seq.num_cached += len(w.tokens)
            self.scheduler.commit(s.seq)  # its newly full blocks become reusable
        sampled = [plan[i].seq for i in rows]
        if sampled:
            out = self.sampler.sample(logits, [q.params for q in sampled], [q.generator for q in sampled],
                                      [q.prompt_ids for q in sampled], [q.output_ids for q in sampled])
            for i, seq in enumerate(sampled):
                top = out.top_logprobs[i] if out.top_logprobs is not None else None
                outputs.append(self._append(seq, int(out.token_ids[i]), float(out.logprobs[i]), top))

    @staticmethod
    def _score(logits: torch.Tensor, seqs: list[Sequence], works: list[Work]) -> None:
        """Prompt logprobs: row j of a work's rows (position first_pos + j) gives the logprob of the prompt token
        after it, from the raw distribution (as the sampler's logprobs), its rank (1: the most likely) and the
        ``prompt_logprobs`` most likely alternatives. A position already scored (a prompt computed again after a
        preemption) is skipped."""
        at = 0
        for seq, w in zip(seqs, works):
            rows = logits[at:at + w.scored].float()  # [n, V]
            at += w.scored
            lp = rows.log_softmax(dim=1)
            nxt = torch.tensor(seq.prompt_ids[w.first_pos + 1:w.first_pos + 1 + w.scored], device=lp.device)
            picked = lp.gather(1, nxt.unsqueeze(1))  # [n, 1]
            ranks = ((lp > picked).sum(dim=1) + 1).tolist()  # 1: the most likely token
            chosen = picked.squeeze(1).tolist()
            k = seq.params.prompt_logprobs
            tops = [[] for _ in chosen]
            if k:
                vals, ids = lp.topk(k, dim=1)
                tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
            for j in range(w.scored):
                if w.first_pos + j == len(seq.prompt_logprobs):
                    seq.prompt_logprobs.append((chosen[j], ranks[j], tops[j]))

    def _fail_step(self, exc: Exception, waiting: bool = False) -> list[RequestOutput]:
        """End every request this step held (running, or admitted by the failed plan; with ``waiting``, the
        queued ones too) with an error output."""
        ended = list(self.scheduler.running) + (list(self.scheduler.waiting) if waiting else [])
        log.error("engine step failed; ending its %d request(s): %s: %s", len(ended), type(exc).__name__, exc,
                  exc_info=exc)
        error = EngineError(f"the engine failed while serving this request ({type(exc).__name__})")
        outputs = []
        for seq in ended:
            self.scheduler.finish(seq)
            outputs.append(self._fail(seq, error))
        return outputs

    def _append(self, seq: Sequence, token: int, logprob: float, top) -> RequestOutput:
        seq.output_ids.append(token)
        seq.logprobs.append(logprob)
        if seq.params.logprobs is not None:
            seq.top_logprobs.append(top or [])
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids):
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.config.max_model_len:
            seq.finish_reason = "length"
        self._detokenize(seq)
        if seq.finish_reason is not None:
            self.scheduler.finish(seq)
            self._seqs.pop(seq.request_id, None)
        return self._output(seq)

    def _detokenize(self, seq: Sequence) -> None:
        if self.tokenizer is None:
            return
        ids = seq.output_ids
        if seq.finish_reason == "stop" and ids and (ids[-1] in self.eos_ids or ids[-1] in seq.params.stop_token_ids):
            ids = ids[:-1]  # the stop token is not part of the text
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        for stop in seq.params.stop:
            at = text.find(stop, max(0, seq.emitted_text - len(stop)))
            if at != -1:
                text, seq.finish_reason = text[:at], "stop"
        seq.text = text

    def _output(self, seq: Sequence) -> RequestOutput:
        done = seq.finish_reason is not None
        text = seq.text
        visible = len(text)
        if not done:  # hold back a possible partial stop string and an incomplete character
            hold = max((len(s) - 1 for s in seq.params.stop), default=0)
            visible = max(seq.emitted_text, len(text) - hold)
            while visible > seq.emitted_text and text[visible - 1] == "\ufffd":
                visible -= 1
        new_text = text[seq.emitted_text:visible]
        seq.emitted_text = visible
        new_ids = seq.output_ids[seq.emitted_tokens:]
        seq.emitted_tokens = len(seq.output_ids)
        first = len(seq.output_ids) - len(new_ids)
        return RequestOutput(
            seq.request_id, new_ids, new_text, seq.logprobs[first:],
            seq.top_logprobs[first:] if seq.params.logprobs is not None else None,
            done, seq.finish_reason, len(seq.prompt_ids), len(seq.output_ids), seq.adapters,
            cached_tokens=seq.cached_prompt, prompt_logprobs=self._prompt_logprobs(seq),
            prompt_token_ids=list(seq.prompt_ids) if seq.params.prompt_logprobs is not None else None,
        )

    @staticmethod
    def _prompt_logprobs(seq: Sequence) -> list | None:
        """The prompt's logprobs, once: in the first output of a request that asked for them."""
        if seq.params.prompt_logprobs is None or seq.prompt_logprobs_sent:
            return None
        seq.prompt_logprobs_sent = True
        return list(seq.prompt_logprobs)

    def _fail(self, seq: Sequence, exc: Exception) -> RequestOutput:
        self._seqs.pop(seq.request_id, None)
        seq.finish_reason = "error"
        out = self._output(seq)
        out.error = exc
        return out

    # ---- convenience -------------------------------------------------------------------------------
    def generate(self, prompts: Seq[str | list[int]], params: SamplingParams | Seq[SamplingParams] = SamplingParams(),
                 adapters: Seq[str | Seq[tuple[str, float]] | None] | None = None) -> list[Sequence]:
        """Run prompts to completion (offline use and tests); returns the finished sequences in order."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        alist = list(adapters) if adapters is not None else [None] * len(prompts)
        ids = [self.add_request(p, sp, adapters=a) for p, sp, a in zip(prompts, plist, alist)]
        seqs = [self._seqs[i] for i in ids]
        while self.has_work():
            for out in self.step():
                if out.error is not None:
                    raise out.error
            if not self.scheduler.running and self.scheduler.waiting:
                self.adapters.wait_idle(60)
        return seqs


def build_engine(spec, engine_config: EngineConfig = EngineConfig(), registry=None) -> tuple[Engine, object]:
    """Load the base model of a ``ModelSpec`` and put an engine on it that takes adapters from the
    registry (pinned names like ``support-bot@3``) or from folders. Returns (engine, LoadedModel)."""
    from ..lora.source import AdapterSource
    from ..model.loader import load_model

    loaded = load_model(spec)
    engine = Engine(loaded.model, loaded.config, loaded.tokenizer, engine_config=engine_config,
                    loader=AdapterSource(registry, loaded.info), dtype=getattr(torch, spec.dtype), device=spec.device,
                    owns_model=True)
    return engine, loaded


DEFAULT_KV_CACHE_GIB = 2.0


def _cache_shape(cfg: EngineConfig, decoder: Decoder, dtype: torch.dtype) -> CacheShape:
    """The block pool: ``kv_cache_gib`` of blocks, or by default no more than DEFAULT_KV_CACHE_GIB and no more
    than ``max_running`` sequences of ``max_model_len`` tokens fill (plus the null block)."""
    layers, kv, hd, bs = len(decoder.layers), decoder.num_kv_heads, decoder.head_dim, cfg.block_size
    budget = CacheShape.blocks_for(int((cfg.kv_cache_gib or DEFAULT_KV_CACHE_GIB) * (1 << 30)), layers, kv, hd, bs, dtype)
    if cfg.kv_cache_gib is None:
        budget = min(budget, cfg.max_running * -(-cfg.max_model_len // bs) + 1)
    if budget < 2:
        raise ValueError(f"kv_cache_gib={cfg.kv_cache_gib} holds no block of {bs} tokens for this model")
    return CacheShape(layers, budget, bs, kv, hd)


def _no_loader(name: str) -> LoraWeights:
    raise KeyError(f"no adapter source configured for {name!r}")


def _normalize_adapters(adapters) -> tuple[tuple[str, float], ...]:
    if adapters is None:
        return ()
    if isinstance(adapters, str):
        return ((adapters, 1.0),)
    mix = tuple((str(n), float(w)) for n, w in adapters)
    check_mixture(mix)
    return mix


def _eos_ids(model, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(e) for e in eos)
    return frozenset(ids)
