"""result.json -> report.md and two PNG plots.

python -m benchmarks.report benchmarks/results/latest
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

SERVERS = (("service", "service gRPC"), ("service_http", "service HTTP"), ("vllm", "vLLM server"))
# Each face of the service against vLLM's server.
VERSUS = (("service", "gRPC / vLLM"), ("service_http", "HTTP / vLLM"))

Row = dict[str, Any]


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def _scenarios(results: Row) -> list[tuple[str, str, str, str]]:
    """(label, kind, section, key) of every throughput point, in report order."""
    service = results.get("service") or results.get("vllm") or {}
    out = []
    for kind, points in service.get("unary", {}).items():
        out += [(f"unary, {c} concurrent", kind, "unary", c) for c in points]
        out.append(("32-text calls, 4 concurrent", kind, "batch32", ""))
        out.append(("bulk (gRPC: one stream; HTTP: 64-text calls)", kind, "bulk", ""))
    return out


def _present(results: Row) -> list[tuple[str, str]]:
    return [(key, name) for key, name in SERVERS if key in results]


def _point(results: Row, server: str, section: str, kind: str, key: str) -> Row | None:
    node: Row | None = results.get(server, {}).get(section, {}).get(kind)
    if node is not None and key:
        node = node.get(key)
    return node


def throughput_table(results: Row) -> list[str]:
    servers = _present(results)
    header = ["load", "texts", "ceiling docs/s"]
    for _, name in servers:
        header += [f"{name} docs/s", "p50 / p99 ms"]
    header += ["gRPC / ceiling", *(label for key, label in VERSUS if key in results)]
    rows = []
    for label, kind, section, key in _scenarios(results):
        ceiling = results.get("ceiling", {}).get(kind, {}).get("docs_per_s")
        row = [label, kind, _f(ceiling)]
        rates: dict[str, float | None] = {}
        for server, _ in servers:
            p = _point(results, server, section, kind, key) or {}
            rates[server] = p.get("docs_per_s")
            row += [_f(rates[server]), f"{_f(p.get('p50_ms'))} / {_f(p.get('p99_ms'))}"]
        row.append(_f(_ratio(rates.get("service"), ceiling), 2))
        row += [_f(_ratio(rates[k], rates.get("vllm")), 2) for k, _ in VERSUS if k in results]
        rows.append(row)
    return _table(header, rows)


def float_table(results: Row) -> list[str]:
    """The HTTP faces with JSON numbers (float) against base64, the openai SDK's default."""
    servers = [(k, n) for k, n in _present(results) if results[k].get("float")]
    header = ["calls", "texts"]
    for _, name in servers:
        header += [f"{name} float docs/s", "base64 docs/s"]
    header += [f"{n} float / vLLM float" for k, n in servers if k != "vllm"]
    rows = []
    kinds = next((list(results[k]["float"]) for k, _ in servers), [])
    for kind in kinds:
        for shape, base, base_key in (("1x64", "unary", "64"), ("32x4", "batch32", "")):
            row = [f"{shape.split('x')[0]}-text, {shape.split('x')[1]} concurrent", kind]
            floats: dict[str, float | None] = {}
            for server, _ in servers:
                floats[server] = (_point(results, server, "float", kind, shape) or {}).get(
                    "docs_per_s"
                )
                b64 = (_point(results, server, base, kind, base_key) or {}).get("docs_per_s")
                row += [_f(floats[server]), _f(b64)]
            row += [_f(_ratio(floats[k], floats.get("vllm")), 2) for k, _ in servers if k != "vllm"]
            rows.append(row)
    return _table(header, rows)


def cpu_table(results: Row) -> list[str]:
    servers = _present(results)
    header = ["load", "texts", "engine client alone", *(name for _, name in servers)]
    header += [label for key, label in VERSUS if key in results]
    rows = []
    for label, kind, section, key in _scenarios(results):
        floor = results.get("ceiling", {}).get(kind, {}).get("cpu_s_per_1000_texts")
        costs = {
            s: (_point(results, s, section, kind, key) or {}).get("cpu_s_per_1000_texts")
            for s, _ in servers
        }
        row = [label, kind, _f(floor, 2), *(_f(costs[s], 2) for s, _ in servers)]
        row += [_f(_ratio(costs[k], costs.get("vllm")), 2) for k, _ in VERSUS if k in results]
        rows.append(row)
    return _table(header, rows)


def mixed_table(results: Row) -> list[str]:
    header = ["server", "idle p50 / p99 ms", "under bulk p50 / p99 ms", "p99 under bulk / idle"]
    rows = []
    for server, name in _present(results):
        mixed = results.get(server, {}).get("mixed", {})
        idle, loaded = mixed.get("idle", {}), mixed.get("loaded", {})
        rows.append(
            [
                name,
                f"{_f(idle.get('p50_ms'))} / {_f(idle.get('p99_ms'))}",
                f"{_f(loaded.get('p50_ms'))} / {_f(loaded.get('p99_ms'))}",
                _f(_ratio(loaded.get("p99_ms"), idle.get("p99_ms")), 2),
            ]
        )
    return _table(header, rows)


def bulk_sharing_table(results: Row) -> list[str]:
    """Sporadic single calls during a bulk load, and a small bulk job behind a large one."""
    header = ["server", "calls 50 ms apart p50 / max ms", "calls 1 s apart p50 / max ms"]
    header += ["small job alone s", "small job behind a large one s"]
    rows = []
    for server, name in _present(results):
        sporadic = results.get(server, {}).get("sporadic", {})
        fair = results.get(server, {}).get("fair", {})
        if not sporadic and not fair:
            continue
        row = [name]
        for gap in ("0.05s", "1s"):
            p = sporadic.get(gap, {})
            row.append(f"{_f(p.get('p50_ms'))} / {_f(p.get('max_ms'))}")
        row += [_f(fair.get(k, {}).get("seconds"), 2) for k in ("alone", "behind_large")]
        rows.append(row)
    return _table(header, rows) if rows else []


def defaults_table(results: Row) -> list[str]:
    """Each server with its own defaults: single-text calls, and Zipf-repeated queries."""
    defaults: Row = results.get("defaults", {})
    servers = _present(defaults)
    if not servers:
        return []
    header = ["load", "texts", *(f"{name} docs/s" for _, name in servers)]
    header += [label for key, label in VERSUS if key in defaults]
    rows = []

    def row(label: str, kind: str, section: str, key: str, shown: str = "") -> None:
        rates = {
            s: (_point(defaults, s, section, kind, key) or {}).get("docs_per_s") for s, _ in servers
        }
        cells = [label, shown or kind, *(_f(rates[s]) for s, _ in servers)]
        cells += [_f(_ratio(rates[k], rates.get("vllm")), 2) for k, _ in VERSUS if k in defaults]
        rows.append(cells)

    kinds = next(iter(defaults.values())).get("unary", {})
    for kind, points in kinds.items():
        for c in points:
            row(f"unary, {c} concurrent", kind, "unary", c)
    if any("zipf" in defaults[s] for s, _ in servers):
        row("Zipf s=1.1, 64 concurrent", "64", "zipf", "", shown="queries")
        cpu = {
            s: defaults[s].get("zipf", {}).get("64", {}).get("cpu_s_per_1000_texts")
            for s, _ in servers
        }
        rows.append(
            ["Zipf: serving CPU-s / 1,000", "queries", *(_f(cpu[s], 3) for s, _ in servers)]
        )
    return _table(header, rows)


def zipf_cache_table(results: Row) -> list[str]:
    """Zipf-repeated queries on the service with one front-end process and with two, whose
    vector caches are their own: queries/s and the share answered from the cache."""
    defaults: Row = results.get("defaults", {})
    rows = []
    for target, points in defaults.items():
        p = points.get("zipf", {}).get("64")
        if not p or target == "vllm":
            continue
        processes = "2" if target.endswith("_n2") else "1"
        face = "HTTP" if "http" in target else "gRPC"
        hits = p["cached"] / p["texts"] if p.get("texts") else None
        rows.append(
            [face, processes, _f(p.get("docs_per_s")), _f(None if hits is None else 100 * hits)]
        )
    header = ["face", "front-end processes", "queries/s", "answered from the cache, %"]
    return _table(header, rows) if rows else []


def rerank_table(results: Row) -> list[str]:
    """Scenario 7: 1 query x 20 documents per call, each server at each concurrency."""
    rerank: Row = results.get("rerank", {})
    servers = [(k, n) for k, n in SERVERS if k in rerank]
    if not servers:
        return []
    header = ["concurrent calls", "server", "pairs/s", "p50 / p95 ms", "errors"]
    header += ["tokens / pair", "serving CPU-s / 1,000 pairs", "pairs/s / vLLM", "CPU / vLLM"]
    rows = []
    for c in next(iter(rerank[k] for k, _ in servers)):
        base = rerank.get("vllm", {}).get(c, {})
        for server, name in servers:
            p = rerank[server].get(c, {})
            cpu = p.get("cpu_s_per_1000_pairs")
            rate = p.get("pairs_per_s")
            versus = (
                ["", ""]
                if server == "vllm"
                else [
                    _f(_ratio(rate, base.get("pairs_per_s")), 2),
                    _f(_ratio(cpu, base.get("cpu_s_per_1000_pairs")), 2),
                ]
            )
            rows.append(
                [
                    c,
                    name,
                    _f(rate),
                    f"{_f(p.get('p50_ms'))} / {_f(p.get('p95_ms'))}",
                    str(p.get("errors", "-")),
                    _f(_ratio(p.get("tokens"), p.get("pairs")), 1),
                    _f(cpu, 3),
                    *versus,
                ]
            )
    return _table(header, rows)


TINY_CASES = {
    "service": "service, vLLM engine",
    "service_null": "service, null engine",
    "vllm_api1": "vLLM server",
    "vllm_api2": "vLLM server",
}


def tiny_engine_table(results: Row) -> list[str]:
    """Scenario 8: single-text calls at 64 concurrent in front of a nearly free engine."""
    rows_in: list[Row] = results.get("tinyengine", {}).get("rows", [])
    if not rows_in:
        return []
    header = ["server", "face", "API processes", "calls/s", "p50 / p95 ms", "errors"]
    header += ["tokens / call", "serving CPU-s / 1,000", "engine CPU-s / 1,000"]
    header += ["load generator CPU-s / 1,000", "rest of machine CPU-s / 1,000", "load avg"]
    rows = []
    for r in rows_in:
        name = TINY_CASES.get(r["case"], r["case"])
        if "error" in r:
            rows.append([name, r["face"], str(r["api_processes"]), "failed: " + r["error"][:120]])
            rows[-1] += [""] * (len(header) - len(rows[-1]))
            continue
        cpu = r["cpu"]["per_1000_calls"]
        rows.append(
            [
                name,
                "gRPC" if r["face"] == "grpc" else "HTTP",
                str(r["api_processes"]),
                _f(r["calls_per_s"]),
                f"{_f(r.get('p50_ms'))} / {_f(r.get('p95_ms'))}",
                str(r["errors"]),
                _f(_ratio(r["tokens"], r["calls"]), 1),
                _f(cpu.get("api"), 3),
                _f(cpu.get("engine"), 3),
                _f(cpu.get("load_generator"), 3),
                _f(cpu.get("rest_of_machine"), 3),
                _f(r.get("load_average"), 2),
            ]
        )
    return _table(header, rows)


def tiny_engine_threads(results: Row) -> list[str]:
    """Where each case's CPU went: the busiest threads of each role, CPU seconds."""
    rows = []
    for r in results.get("tinyengine", {}).get("rows", []):
        if "error" in r:
            continue
        for role, threads in r["cpu"]["threads"].items():
            if threads:
                shown = ", ".join(f"{name} {s:.2f}" for name, s in threads.items())
                rows.append([f"{r['case']} {r['face']}", role, shown])
    return _table(["case", "role", "busiest threads (CPU-s in the point)"], rows) if rows else []


def scaleout_table(results: Row) -> list[str]:
    """Scenario 9: embed-files over two instances behind one round_robin target."""
    header = ["--streams", "docs", "wall s", "chunks/s (docs/s)", "rows, unique ids"]
    header += ["inputs per instance (share)", "streams per instance", "cache hits"]
    header += ["serving CPU-s per instance", "engine core CPU-s per instance"]
    header += ["model worker CPU-s per instance (its cores)", "CLI CPU-s"]
    header += ["machine busy cores", "rest of machine CPU-s"]
    rows = []
    for r in results.get("scaleout", {}).get("rows", []):
        each = r["instances"]
        rows.append(
            [
                str(r["streams"]),
                str(r["texts"]),
                _f(r["wall_s"]),
                f"{_f(r['chunks_per_s'])} ({_f(r['docs_per_s'])})",
                f"{r['rows']}, {r['unique_ids']}" + ("" if r["rows_ok"] else " (MISMATCH)"),
                " / ".join(
                    f"{i['inputs']} ({s:.0%})" for i, s in zip(each, r["share"], strict=True)
                ),
                " / ".join(str(i["streams"]) for i in each),
                str(sum(i["cache_hits"] for i in each)),
                " / ".join(_f(i["cpu_s"].get("api")) for i in each),
                " / ".join(_f(i["cpu_s"].get("engine_core")) for i in each),
                " / ".join(
                    f"{_f(i['cpu_s'].get('engine_worker'))} ({_cores(i.get('cores', {}))})"
                    for i in each
                ),
                _f(r["cli_cpu_s"]),
                _f(r["machine_busy_cores"], 2),
                _f(r["rest_of_machine_cpu_s"]),
            ]
        )
    return _table(header, rows)


def _cores(cores: Row) -> str:
    return ",".join(map(str, cores.get("engine_worker", []))) or "-"


def null_table(results: Row) -> list[str]:
    header = ["load", "telemetry", "texts/s", "server µs / text", "texts per server CPU-s"]
    header += ["throughput cost", "CPU cost"]
    rows = []
    for r in results.get("null_engine", {}).get("results", []):
        rows.append(
            [
                r["load"],
                r["mode"],
                _f(r["texts_per_s"], 0),
                _f(r["cpu_us_per_text"], 1),
                _f(r["texts_per_cpu_s"], 0),
                _f(r.get("throughput_overhead_pct"))
                + ("%" if "throughput_overhead_pct" in r else ""),
                _f(r.get("cpu_overhead_pct")) + ("%" if "cpu_overhead_pct" in r else ""),
            ]
        )
    return _table(header, rows)


def plot_throughput(results: Row, path: Path) -> None:
    service = results.get("service") or results.get("vllm") or {}
    kinds = list(service.get("unary", {}))
    if not kinds:
        return
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for server, name in SERVERS:
            points = results.get(server, {}).get("unary", {}).get(kind, {})
            if points:
                xs = [int(c) for c in points]
                ax.plot(xs, [p["docs_per_s"] for p in points.values()], marker="o", label=name)
        ceiling = results.get("ceiling", {}).get(kind, {}).get("docs_per_s")
        if ceiling:
            ax.axhline(ceiling, linestyle="--", color="grey", label="engine ceiling")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent single-text calls")
        ax.set_ylabel("docs/s")
        ax.set_ylim(bottom=0)
        ax.set_title(f"throughput, {kind}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_mixed(results: Row, path: Path) -> None:
    servers = [(k, n) for k, n in _present(results) if results[k].get("mixed")]
    if not servers:
        return
    fig, ax = plt.subplots(figsize=(8, 4.2))
    labels = ("p50", "p95", "p99")
    bars = 2 * max(len(servers), 1)
    width = 0.8 / bars
    for i, (server, name) in enumerate(servers):
        for j, state in enumerate(("idle", "loaded")):
            p = results.get(server, {}).get("mixed", {}).get(state)
            if not p:
                continue
            offset = (i * 2 + j - (bars - 1) / 2) * width
            xs = [k + offset for k in range(len(labels))]
            values = [p.get(f"{q}_ms") or 0 for q in labels]
            ax.bar(xs, values, width, label=f"{name}, {'idle' if j == 0 else 'under bulk load'}")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yscale("log")
    ax.set_ylabel("unary query latency, ms (log)")
    ax.set_title("interactive latency, idle and while bulk traffic saturates the engine")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: Row) -> str:
    meta = results.get("meta", {})
    lines = [
        "# Benchmark results",
        "",
        f"{meta.get('date', '')}; {meta.get('machine', '')}; model {meta.get('model', '')}.",
        "",
        f"Engine settings {json.dumps(meta.get('engine', {}))};"
        f" corpus {json.dumps(meta.get('corpus', {}))};"
        f" {meta.get('plan', {}).get('seconds')} s per point; the run took {meta.get('wall_s')} s.",
        "",
        "## Throughput and latency",
        "",
        "HTTP calls ask for base64 vectors (the openai SDK's default). Bulk: the gRPC face"
        " runs one EmbedStream of 64-item messages; the HTTP faces, which have no stream,"
        " 64-text calls with 4 in flight.",
        "",
        *throughput_table(results),
        "## HTTP faces: float vectors (JSON numbers) against base64",
        "",
        *float_table(results),
        "## Serving-path CPU seconds per 1,000 texts",
        "",
        "The serving process only, not vLLM's engine core. The engine client alone is the"
        " ceiling run's own process: the service's vLLM client with no server and nothing to"
        " tokenize.",
        "",
        *cpu_table(results),
        "## Mixed load: unary queries while bulk traffic saturates the engine",
        "",
        *mixed_table(results),
        "## Sharing the engine with bulk work",
        "",
        "Single queries spaced apart while a bulk load saturates the engine; and a"
        " small bulk job started 2 s after one over the whole paragraph corpus.",
        "",
        *bulk_sharing_table(results),
    ]
    if "defaults" in results:
        lines += [
            "## Defaults against defaults",
            "",
            "Each server as a user starts it: the service with every default (its vector cache"
            " on: the single-text rows send texts under tags no other point sends, so it"
            " answers none of them; the Zipf row repeats texts within each face's own tag),"
            " vLLM's server with the model and the pooling runner only.",
            "",
            *defaults_table(results),
            *zipf_cache_table(results),
        ]
    if "rerank" in results:
        meta = results["rerank"].get("meta", {})
        lines += [
            "## Rerank: cross-encoder, the service against vLLM's /rerank",
            "",
            f"A tiny random-weight BERT cross-encoder (window {meta.get('window')} tokens) on"
            " both servers with the same engine settings; every call is 1 query and"
            f" {meta.get('documents_per_request')} documents, different in every call, that fit"
            " the window together (nothing cut or refused). HTTP: Cohere's /v1/rerank, the same"
            " body to both; gRPC: the service's Rerank. Serving CPU: the serving process only,"
            " not vLLM's engine core (the service's process also holds its idle embedding"
            " engine's client).",
            "",
            *rerank_table(results),
        ]
    if "null_engine" in results:
        lines += ["## Front end alone (null engine)", "", *null_table(results)]
    if "tinyengine" in results:
        meta = results["tinyengine"].get("meta", {})
        lines += [
            "## A nearly free engine (tinyengine)",
            "",
            f"A Qwen3 of width {meta.get('model', {}).get('hidden')} and"
            f" {meta.get('model', {}).get('layers')} layers through the real vLLM engine core;"
            f" single-text calls, {meta.get('concurrency')} concurrent, {meta.get('seconds')} s"
            " per row, one server at a time, each with its defaults. Serving CPU: the processes"
            " that serve the calls (vLLM with 2 API servers: both `APIServer` processes, not the"
            " launcher that watches them); engine: the engine core and its workers; rest of the"
            " machine: everything else that ran meanwhile. The service has one front-end"
            " process (no `--api-processes` yet). Load average (1 min) before each row, and"
            " over the scenario: from"
            f" {_f((meta.get('load_average_at_start') or [None])[0], 2)} to"
            f" {_f((meta.get('load_average_at_end') or [None])[0], 2)}.",
            "",
            *tiny_engine_table(results),
            *tiny_engine_threads(results),
        ]
    if "scaleout" in results:
        lines += [
            "## embed-files over two instances (scaleout)",
            "",
            "`embed-files --streams N` (its own process) against two service instances on"
            " this machine behind one round_robin target; every run sends paragraphs no other"
            " run sent. Rates over the CLI process's whole wall time; the split from each"
            " instance's `embedding_inputs_total`; CPU from /proc: serving = each instance's"
            " process; engine core = its vLLM scheduler process; model worker = the vLLM"
            " process that runs the model, with the cores vLLM pinned it to; CLI = the"
            " embed-files process; rest of machine = busy CPU less all of those (another job"
            " sharing the cores).",
            "",
            *scaleout_table(results),
        ]
    lines += ["![throughput](throughput.png)", "", "![mixed](mixed_latency.png)", ""]
    return "\n".join(lines)


def write(results: Row, out: Path) -> None:
    (out / "report.md").write_text(markdown(results), "utf-8")
    plot_throughput(results, out / "throughput.png")
    plot_mixed(results, out / "mixed_latency.png")


def main(argv: Sequence[str] | None = None) -> int:
    out = Path((argv or sys.argv[1:])[0])
    write(json.loads((out / "result.json").read_text("utf-8")), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
