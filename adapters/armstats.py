"""Per-arm figures of an A/B route, read from a loraplex server's Prometheus exposition
(``GET /metrics``): what ``loraplex route show NAME --server URL`` prints."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def per_arm(text: str, adapter: str) -> dict[str, dict[str, Any]]:
    """Per-version figures of ``adapter`` from a Prometheus text exposition (a scrape of ``/metrics``).

    Returns ``{version: {"requests", "errors", "aborted", "rejected", "prompt_tokens",
    "generation_tokens", "e2e_p50", "e2e_mean"}}``: requests of every outcome, errors (outcome
    ``error``), tokens, and the median (estimated from the histogram buckets by linear interpolation,
    as Prometheus' ``histogram_quantile`` does) and mean of the end-to-end latency of successful
    requests in seconds (None when there were none).
    """
    from prometheus_client.parser import text_string_to_metric_families

    arms: dict[str, dict[str, Any]] = {}
    buckets: dict[str, list[tuple[float, float]]] = {}
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}

    def arm(version: str) -> dict[str, Any]:
        return arms.setdefault(version, {"requests": 0, "errors": 0, "aborted": 0, "rejected": 0, "prompt_tokens": 0,
                                         "generation_tokens": 0, "e2e_p50": None, "e2e_mean": None})

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("adapter") != adapter:
                continue
            version = s.labels.get("version", "")
            if s.name == "loraplex_requests_total":
                a = arm(version)
                a["requests"] += int(s.value)
                outcome = s.labels.get("outcome")
                if outcome == "error":
                    a["errors"] += int(s.value)
                elif outcome in ("aborted", "rejected"):
                    a[outcome] += int(s.value)
            elif s.name == "loraplex_prompt_tokens_total":
                arm(version)["prompt_tokens"] += int(s.value)
            elif s.name == "loraplex_generation_tokens_total":
                arm(version)["generation_tokens"] += int(s.value)
            elif s.name == "loraplex_e2e_seconds_bucket":
                buckets.setdefault(version, []).append((float(s.labels["le"]), s.value))
            elif s.name == "loraplex_e2e_seconds_sum":
                sums[version] = s.value
            elif s.name == "loraplex_e2e_seconds_count":
                counts[version] = s.value

    for version, count in counts.items():
        a = arm(version)
        if count > 0:
            a["e2e_mean"] = sums.get(version, 0.0) / count
            a["e2e_p50"] = quantile(buckets.get(version, []), 0.5)
    return arms


def quantile(buckets: Iterable[tuple[float, float]], q: float) -> float | None:
    """The ``q`` quantile from cumulative histogram buckets ``(upper_bound, count)`` (``+Inf`` last).

    Linear interpolation inside the bucket holding the rank, from 0 for the first bucket; a rank in
    the ``+Inf`` bucket gives the highest finite bound. None without observations.
    """
    bs = sorted(buckets)
    if not bs or bs[-1][1] <= 0:
        return None
    rank = q * bs[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in bs:
        if count >= rank and count > lower_count:
            if math.isinf(bound):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound
