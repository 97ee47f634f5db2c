"""`embed-files INPUT... --out OUT.parquet [--server 127.0.0.1:50051]`: the command line.

`--streams N` opens N streams over one round_robin channel, so that a `dns:///` target
(a headless Service) or an `ipv4:` list spreads them over the servers behind it.
`--shard I/N` (or an Indexed Job's JOB_COMPLETION_INDEX and JOB_COMPLETIONS) embeds one
share of the corpus into a dataset that the other shards write too.

Exit status: 0 when every document was embedded; 1 when some failed (they are listed in
OUT.errors.jsonl); 2 for a usage error; 3 when the run stopped early (server unreachable
past --retry-timeout, API key missing or refused, output unusable); 130 and 143 on SIGINT
and SIGTERM. Whatever was complete is committed in every case, and a rerun resumes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

from embedding.v1 import embedding_pb2 as pb
from embedding_client.auth import API_KEY_ENV
from embedding_client.cli.connection import Connection, FatalError, TlsFiles
from embedding_client.cli.output import (
    Dataset,
    ErrorLog,
    PartWriter,
    errors_path,
    is_errors_file,
)
from embedding_client.cli.progress import Mode, Progress, Stats, summary_line
from embedding_client.cli.schema import OutputSchema, RowBuffer
from embedding_client.cli.settings import (
    ENCODINGS,
    EmbedSettings,
    Requested,
    UsageError,
    parse_view,
    resolve,
)
from embedding_client.cli.shards import COUNT_ENV, INDEX_ENV, Shard, parse_shard, shard_from_env
from embedding_client.cli.sources import KINDS, Fields, InputFile, Reader, discover, prescan
from embedding_client.cli.stream import Feed, StreamLimits, StreamRunner, run_all

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED = 0, 1, 2, 3
_SHOWN_SKIPS = 10


def _view(text: str) -> tuple[int, str]:
    try:
        return parse_view(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _shard(text: str) -> Shard:
    try:
        return parse_shard(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="embed-files",
        description="Embed files (jsonl, csv, parquet, txt, md, pdf, docx, html) through the "
        "embedding service into a Parquet dataset, one row per chunk. Rerun with the same "
        "--out to resume: complete documents are skipped.",
        epilog="Exit status: 0 all embedded; 1 some documents failed (see OUT.errors.jsonl); "
        "2 usage error; 3 stopped early (rerun to resume).",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files or directories (recursive)")
    p.add_argument(
        "--out", required=True, type=Path, metavar="OUT.parquet", help="output dataset directory"
    )
    p.add_argument(
        "--server",
        default="127.0.0.1:50051",
        metavar="TARGET",
        help="HOST:PORT, or any gRPC target such as dns:///HOST:PORT (every address, for a "
        "headless Service) or ipv4:IP:PORT,IP:PORT (%(default)s)",
    )

    g = p.add_argument_group("inputs")
    g.add_argument("--id-field", default="id", metavar="NAME", help="of records (%(default)s)")
    g.add_argument("--text-field", default="text", metavar="NAME", help="of records (%(default)s)")

    g = p.add_argument_group("embedding")
    g.add_argument(
        "--dimensions", type=int, default=0, metavar="N", help="Matryoshka size (default: native)"
    )
    g.add_argument("--encoding", choices=list(ENCODINGS), default="float32")
    g.add_argument("--instruction", default="", metavar="TEXT", help="task (for queries)")
    g.add_argument("--prompt-name", default="", metavar="NAME", help="a prompt of the model")
    g.add_argument(
        "--view",
        action="append",
        type=_view,
        default=[],
        metavar="DIMS:ENCODING",
        help="also write this resolution, in column vector_DIMS_ENCODING (repeatable)",
    )
    g.add_argument(
        "--chunk-tokens",
        type=int,
        default=None,
        metavar="N",
        help="tokens per chunk (default: the model's window); 0 turns chunking off",
    )
    g.add_argument(
        "--chunk-overlap",
        type=int,
        default=None,
        metavar="N",
        help="tokens shared by consecutive chunks (default: an eighth, at most 128)",
    )

    g = p.add_argument_group("output")
    g.add_argument("--no-text", action="store_true", help="leave the text column out")
    g.add_argument(
        "--document-vectors",
        action="store_true",
        help="also write one row per document, chunk -1: the token-weighted mean of its "
        "chunks that the server computes",
    )
    g.add_argument(
        "--part-rows", type=int, default=20_000, metavar="N", help="rows per part (%(default)s)"
    )
    g.add_argument(
        "--part-seconds",
        type=float,
        default=30.0,
        metavar="S",
        help="commit a part at least this often (%(default)s s)",
    )

    g = p.add_argument_group("scale-out")
    g.add_argument(
        "--streams",
        type=int,
        default=1,
        metavar="N",
        help="concurrent streams, spread over the servers behind --server (%(default)s)",
    )
    g.add_argument(
        "--shard",
        type=_shard,
        default=None,
        metavar="I/N",
        help=f"embed only share I of N of the documents (0 <= I < N), by a hash of their ids "
        f"(default: ${INDEX_ENV}/${COUNT_ENV} when set, as in a Kubernetes Indexed Job)",
    )

    g = p.add_argument_group("connection")
    g.add_argument(
        "--api-key",
        default=None,  # then $EMBED_API_KEY, read by Connection; never shown in --help
        metavar="KEY",
        help=f"API key, for a server started with --api-keys (default: ${API_KEY_ENV}, "
        "which keeps it out of the process list)",
    )
    g.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    g.add_argument("--tls-ca", type=Path, metavar="PEM", help="CA bundle to trust (implies TLS)")
    g.add_argument("--tls-cert", type=Path, metavar="PEM", help="client certificate (mutual TLS)")
    g.add_argument("--tls-key", type=Path, metavar="PEM", help="private key of --tls-cert")
    g.add_argument(
        "--retry-timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="give up after this many seconds without an answer (%(default)s)",
    )
    g.add_argument(
        "--items-per-message", type=int, default=64, metavar="N", help="per message (%(default)s)"
    )
    g.add_argument(
        "--max-inflight",
        type=int,
        default=0,
        metavar="N",
        help="items sent and not answered (default: the server's stream_max_inflight)",
    )

    g = p.add_argument_group("progress")
    g.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar or lines (warnings and the summary are still printed)",
    )
    g.add_argument(
        "--log-interval",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds between progress lines when stderr is not a terminal (%(default)s)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(_run(args))
    except UsageError as err:
        _say(f"error: {err}")
        return EXIT_USAGE
    except FatalError as err:
        _say(f"error: {err}")
        return EXIT_STOPPED
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except asyncio.CancelledError:  # SIGTERM
        return 128 + signal.SIGTERM


def _say(message: str) -> None:
    print(f"embed-files: {message}", file=sys.stderr, flush=True)


def _mode(args: argparse.Namespace) -> Mode:
    if args.quiet:
        return "quiet"
    return "bar" if sys.stderr.isatty() else "log"


def _requested(args: argparse.Namespace) -> Requested:
    for name in ("dimensions", "part_rows", "items_per_message", "streams"):
        if getattr(args, name) < (0 if name == "dimensions" else 1):
            raise UsageError(f"--{name.replace('_', '-')} is out of range")
    return Requested(
        dimensions=args.dimensions,
        encoding=args.encoding,
        instruction=args.instruction,
        prompt_name=args.prompt_name,
        chunk_tokens=args.chunk_tokens,
        chunk_overlap=args.chunk_overlap,
        views=tuple(args.view),
        document_vectors=args.document_vectors,
    )


def _shard_of(args: argparse.Namespace) -> Shard:
    """--shard, else the Indexed Job's variables, else the whole corpus."""
    flag: Shard | None = args.shard
    if flag is not None:
        return flag
    try:
        return shard_from_env(os.environ)
    except ValueError as err:
        raise UsageError(str(err)) from err


def _tls(args: argparse.Namespace) -> TlsFiles | None:
    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key):
        return None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    return TlsFiles(args.tls_ca, args.tls_cert, args.tls_key)


def _settings_differ(stored: dict[str, Any], settings: EmbedSettings) -> str:
    now = settings.to_json()
    keys = sorted(k for k in {*stored, *now} if stored.get(k) != now.get(k))
    return ", ".join(f"{k} {stored.get(k)!r} there, {now.get(k)!r} now" for k in keys)


async def _run(args: argparse.Namespace) -> int:
    requested = _requested(args)
    shard = _shard_of(args)
    fields = Fields(args.id_field, args.text_field)
    out: Path = args.out
    stats = Stats()
    progress = Progress(stats, _mode(args), interval=args.log_interval)
    tls = _tls(args)

    try:
        files, unknown = discover(
            args.inputs, exclude=[out], skip=lambda path: is_errors_file(out, path)
        )
    except FileNotFoundError as err:
        raise UsageError(str(err)) from err
    for path in unknown[:_SHOWN_SKIPS]:
        progress.note(f"skipping {path}: unknown extension")
    if len(unknown) > _SHOWN_SKIPS:
        progress.note(f"skipping {len(unknown) - _SHOWN_SKIPS} more files of unknown extensions")
    if not files:
        raise UsageError(f"no input files ({', '.join(KINDS)}) found")

    task = asyncio.current_task()
    if task is not None:
        with suppress(NotImplementedError, RuntimeError):  # no signal handlers on Windows
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)

    dataset = Dataset(out, shard)
    try:
        dataset.open()
    except OSError as err:
        raise FatalError(f"cannot use {out}: {err}") from err
    try:
        complete, stored = dataset.scan()
        # Ids of other shards are theirs to skip.
        complete = {doc_id for doc_id in complete if shard.owns(doc_id)}
        if complete:
            progress.note(f"resuming: {len(complete):,} documents already complete in {out}")
        try:
            connection = Connection(args.server, tls, args.api_key)
        except OSError as err:
            raise UsageError(f"cannot read a TLS file: {err}") from err
        except ValueError as err:  # names the problem, never the key
            raise UsageError(f"--api-key or ${API_KEY_ENV}: {err}") from err
        try:
            info = await connection.model_info(args.retry_timeout, progress.note)
            settings = resolve(requested, info)
            if stored is not None and stored != settings.to_json():
                raise FatalError(
                    f"{out} holds vectors made otherwise ({_settings_differ(stored, settings)});"
                    " use another --out"
                )
            return await _stream(
                args,
                connection=connection,
                info=info,
                settings=settings,
                dataset=dataset,
                shard=shard,
                complete=complete,
                files=files,
                fields=fields,
                stats=stats,
                progress=progress,
            )
        finally:
            await connection.close()
    finally:
        dataset.close()


async def _stream(
    args: argparse.Namespace,
    *,
    connection: Connection,
    info: pb.GetModelInfoResponse,
    settings: EmbedSettings,
    dataset: Dataset,
    shard: Shard,
    complete: set[str],
    files: list[InputFile],
    fields: Fields,
    stats: Stats,
    progress: Progress,
) -> int:
    out: Path = args.out
    errors_file = errors_path(out, shard)
    began = time.monotonic()
    scan = prescan(files, fields, complete, shard)
    if time.monotonic() - began > 2.0:
        progress.note(f"pre-scan: {scan.records:,} records in {time.monotonic() - began:.0f} s")
    schema = OutputSchema.build(settings, scan.metadata.fields(), with_text=not args.no_text)
    for field, column in schema.renamed():
        progress.note(f"metadata field {field!r} is written as column {column!r}")

    errors = ErrorLog(errors_file)
    writer = PartWriter(
        dataset,
        RowBuffer(schema),
        errors,
        stats,
        lambda message: progress.problem(message, str(errors_file)),
        part_rows=args.part_rows,
        part_seconds=args.part_seconds,
    )
    feed = Feed(asyncio.get_running_loop())
    reader = Reader(files, fields, complete, writer.failed, shard)
    reading = threading.Thread(target=feed.fill, args=(reader,), name="embed-files-reader")
    reading.daemon = True

    async def check_server() -> None:
        again = await connection.stub.GetModelInfo(
            pb.GetModelInfoRequest(), timeout=10.0, metadata=connection.metadata
        )
        if (again.model, again.dimension) != (info.model, info.dimension):
            raise FatalError(
                f"the server came back serving {again.model} ({again.dimension} dimensions), "
                f"not {info.model} ({info.dimension})"
            )

    limits = StreamLimits.from_server(info.limits, args.items_per_message, args.max_inflight)
    runners = [
        StreamRunner(
            connection.stub,
            connection.metadata,
            options=settings.options(),
            feed=feed,
            sink=writer,
            limits=limits,
            retry_timeout=args.retry_timeout,
            note=progress.note,
            check_server=check_server,
            refused=connection.refused,
        )
        for _ in range(args.streams)
    ]
    if not shard.whole:
        progress.note(f"shard {shard}: {scan.todo:,} documents to embed")
    ending = "interrupted"
    writer.start()
    progress.start(scan.todo)
    reading.start()
    try:
        await run_all(runners)
        ending = "done"
    except FatalError:
        ending = "stopped"
        raise
    finally:
        feed.close()
        try:
            writer.close()
        finally:
            errors.close()
            progress.close()
            stats.skipped = reader.skipped
            _say(summary_line(stats, str(out), str(errors_file), ending))
    return EXIT_OK if stats.errors == 0 else EXIT_FAILED
