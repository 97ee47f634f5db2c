"""Bounded soak: minutes of mixed traffic, reporting errors and server memory over time.

Skipped by `make test`; `make soak` runs it (SOAK_SECONDS, default 180).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter

import grpc
import psutil
import pytest

from embedding_client import EmbeddingClient
from tests.servers import ServerProcess
from tests.texts import TEXTS

pytestmark = pytest.mark.soak


def test_soak_mixed_traffic(minilm_server: ServerProcess) -> None:
    duration = float(os.environ.get("SOAK_SECONDS", "180"))
    stop_at = time.monotonic() + duration
    codes: Counter[str] = Counter()
    lock = threading.Lock()
    proc = psutil.Process(minilm_server.process.pid)
    samples: list[tuple[float, float]] = []

    def record(code: str) -> None:
        with lock:
            codes[code] += 1

    def unary_worker(n: int) -> None:
        with EmbeddingClient(minilm_server.address) as client:
            i = 0
            while time.monotonic() < stop_at:
                i += 1
                texts = [f"{TEXTS[(n + i + j) % len(TEXTS)]} {i}" for j in range(1 + i % 16)]
                try:
                    client.embed(texts, dimensions=[0, 64, 128][i % 3], encoding="float16")
                    record("OK")
                except grpc.RpcError as err:
                    assert isinstance(err, grpc.Call)
                    record(err.code().name)

    def stream_worker() -> None:
        with EmbeddingClient(minilm_server.address) as client:
            batch = 0
            while time.monotonic() < stop_at:
                batch += 1
                items = [(f"{batch}-{i}", f"{TEXTS[i % len(TEXTS)]} {i}") for i in range(300)]
                seen = {r.id for r in client.embed_stream(items) if r.ok}
                record("STREAM_OK" if len(seen) == len(items) else "STREAM_LOST")

    threads = [threading.Thread(target=unary_worker, args=(n,)) for n in range(6)]
    threads.append(threading.Thread(target=stream_worker))
    for t in threads:
        t.start()
    start = time.monotonic()
    while any(t.is_alive() for t in threads):
        samples.append((round(time.monotonic() - start, 1), proc.memory_info().rss / 2**20))
        time.sleep(5)
    print(json.dumps({"codes": dict(codes), "rss_mib_over_time": samples}))
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED", "STREAM_OK"}, codes
    rss = [mib for _, mib in samples]
    assert rss[-1] - min(rss) < 512, "server memory kept growing"
