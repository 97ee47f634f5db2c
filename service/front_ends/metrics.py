"""One /metrics for several front-end processes: each serves its own registry on a
private loopback port, and the supervisor's endpoint merges them at every scrape.

This is what prometheus_client's multiprocess mode does with files, done with the
exposition text instead, since the service's metrics come from OpenTelemetry's reader (which
multiprocess mode cannot collect). Counters, histograms and additive gauges (queue depth,
batches in flight, cache size) are summed; engine_up is the minimum (every front end
must reach its engine) and the oldest batch's age the maximum. Samples whose labels differ
(target_info names each process) stay apart.
"""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from service.telemetry import names

log = logging.getLogger(__name__)

_SCRAPE_TIMEOUT_S = 5.0
_Key = tuple[str, tuple[tuple[str, str], ...]]


def _prometheus_name(instrument: tuple[str, str]) -> str:
    """The exporter's name for a gauge instrument (dots to underscores, unit suffix)."""
    name, unit = instrument
    return name.replace(".", "_") + ("_seconds" if unit == "s" else "")


_COMBINE: dict[str, Callable[[float, float], float]] = {
    _prometheus_name(names.ENGINE_UP): min,
    _prometheus_name(names.ENGINE_OLDEST_BATCH): max,
}


def _combine(family: Metric, sample: str) -> Callable[[float, float], float]:
    if sample.endswith("_created"):
        return min  # when the earliest process started counting
    if family.type == "gauge":
        return _COMBINE.get(family.name, _add)
    return _add


def _add(a: float, b: float) -> float:
    return a + b


def merge(texts: Iterable[str]) -> list[Metric]:
    """The families of several expositions, samples with equal names and labels combined."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[_Key, float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(
                family.name,
                Metric(family.name, family.documentation, family.type, family.unit),
            )
            into = values.setdefault(family.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                before = into.get(key)
                into[key] = (
                    sample.value
                    if before is None
                    else _combine(merged, sample.name)(before, sample.value)
                )
    for name, family in families.items():
        family.samples = [Sample(n, dict(labels), v) for (n, labels), v in values[name].items()]
    return list(families.values())


def scrape(port: int) -> str:
    with urllib.request.urlopen(
        f"http://127.0.0.1:{port}/metrics", timeout=_SCRAPE_TIMEOUT_S
    ) as answer:
        text: str = answer.read().decode("utf-8")
    return text


class MergedMetrics(Collector):
    """A prometheus_client collector that merges the front ends' metrics at each scrape."""

    def __init__(self, ports: Callable[[], list[int]]) -> None:
        self._ports = ports
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="metrics-merge")

    def collect(self) -> Iterator[Metric]:
        ports = self._ports()
        texts: list[str] = []
        for port, outcome in zip(ports, self._pool.map(_try_scrape, ports), strict=True):
            if outcome is None:
                log.warning("front end metrics on port %d did not answer; left out", port)
            else:
                texts.append(outcome)
        yield from merge(texts)


def _try_scrape(port: int) -> str | None:
    try:
        return scrape(port)
    except OSError:
        return None
