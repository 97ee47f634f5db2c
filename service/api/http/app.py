"""The HTTP face: OpenAI's /v1/embeddings, rerank in Cohere's, Jina's and TEI's shapes,
/tokenize, /v1/models, /health, /openapi.json and /docs (Swagger UI, served from the
openapi-ui-bundles package: no CDN), as one Starlette app.

Every route only translates: it checks the key, reads and decodes the body, asks the gate
for the runtime, and calls the same validation and pipeline as the gRPC face. Failures
leave through one path (service.api.problems -> errors.error_response), so a message is as
precise here as on gRPC; the protocol's own errors (unknown route, wrong method, slow body)
have the same OpenAI shape. A client that disconnects cancels its call, which drops its
queued work exactly as a cancelled gRPC call does.

Inputs over the window are cut (`default_truncate`, "end"; rerank's documents: always "end")
unless the request says otherwise, because the clients of this face (Open WebUI, Chroma,
LanceDB) cannot ask and their default chunks overflow small windows. A cut is never silent:
every /v1/embeddings and rerank answer carries the `x-truncated-inputs` header (0 included),
and each cut input is flagged `"truncated": true`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import numpy as np
import orjson
from openapi_ui_bundles import swagger_ui
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.routing import Route

from service import postprocess
from service.api.calls.embed import EmbedCall, Embedding, Vector, embed
from service.api.calls.metadata import Metadata
from service.api.calls.rerank import RerankCall, rerank
from service.api.calls.tokenize import TokenizeCall, tokenize
from service.api.http import schemas
from service.api.http.errors import error_response, protocol_error
from service.api.keys import MISSING_KEY_MESSAGE, ApiKeys, presented_key
from service.api.problems import Kind, Problem, describe
from service.api.runtime import Gate, Runtime
from service.api.validation import RequestOptions, ViewOptions
from service.errors import InvalidInputError, NotReadyError
from service.pipeline import Inputs, Timing, TokenInputs
from service.telemetry import names
from service.tokenization import Truncation

S = TypeVar("S", bound=msgspec.Struct)

# What a response says a client gone before the answer got (nginx's convention); nothing is
# sent, but telemetry records it.
CLIENT_GONE = 499

_JSON = "application/json"
_INPUT_TYPES = ("query", "document")
_INPUT_FORMS = "a string, an array of strings, an array of token ids or an array of token-id arrays"
# How many inputs (rerank: documents) of the request were cut to fit; sent on every answer.
TRUNCATED_INPUTS_HEADER = "x-truncated-inputs"


def _json(body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), 200, headers, media_type=_JSON
    )


def _invalid(field: str, description: str) -> InvalidInputError:
    return InvalidInputError(field, description)


def _validation_error(exc: msgspec.ValidationError) -> InvalidInputError:
    """msgspec's "Expected `int`, got `str` - at `$.documents[2]`" as an error naming
    documents[2]."""
    what, sep, path = str(exc).rpartition(" - at `$")
    if not sep:
        return _invalid("", str(exc))
    return _invalid(path.rstrip("`").lstrip("."), what.replace("`", "").lower())


def texts_or_tokens(value: Any, field: str = "input") -> Inputs:
    """OpenAI's four forms of `input`, told apart; contents are checked by the validator."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        if isinstance(value, list):
            raise _invalid(field, "at least one input is required (got an empty array)")
        raise _invalid(field, f"must be {_INPUT_FORMS}")
    first = value[0]
    if isinstance(first, str):
        kind: type = str
    elif isinstance(first, int) and not isinstance(first, bool):
        kind = int
    elif isinstance(first, list):
        kind = list
    else:
        raise _invalid(f"{field}[0]", f"must be {_INPUT_FORMS}")
    for i, item in enumerate(value):
        if not isinstance(item, kind) or isinstance(item, bool):
            raise _invalid(f"{field}[{i}]", f"must be a {kind.__name__} like {field}[0]")
    if kind is str:
        return value
    if kind is int:
        return TokenInputs([value])
    for i, ids in enumerate(value):
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise _invalid(f"{field}[{i}]", "must be an array of integer token ids")
    return TokenInputs(value)


def _timing_headers(t: Timing, started: float) -> dict[str, str]:
    total = time.perf_counter() - started
    return {
        names.TOTAL_TIME_HEADER: f"{total * 1000:.3f}",
        names.QUEUE_TIME_HEADER: f"{t.queue_s * 1000:.3f}",
        names.INFERENCE_TIME_HEADER: f"{t.inference_s * 1000:.3f}",
        names.TOKENIZE_TIME_HEADER: f"{t.tokenize_s * 1000:.3f}",
        names.CACHED_INPUTS_HEADER: str(t.cached),
    }


# Swagger UI's files, served beside the page; validatorUrl null keeps the page from asking
# swagger.io to validate the document, so nothing leaves the browser's way to this server.
_SWAGGER_ASSETS = ("swagger-ui.css", "swagger-ui-bundle.js")
_SWAGGER_PAGE = """<!doctype html>
<html><head><title>Embedding service API</title><meta charset="utf-8">
<link rel="stylesheet" href="/docs/swagger-ui.css">
</head><body><div id="ui"></div>
<script src="/docs/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#ui", validatorUrl: null});</script>
</body></html>
"""


class HttpApi:
    def __init__(
        self,
        gate: Gate,
        *,
        keys: ApiKeys | None,
        max_request_bytes: int,
        timing_headers: bool = True,
        version: str = "",
        default_truncate: str = "end",
        body_timeout_s: float = 60.0,
    ) -> None:
        self._gate = gate
        self._keys = keys
        self._max_bytes = max_request_bytes
        self._timing_headers = timing_headers
        self._default_truncate = default_truncate
        self._body_timeout_s = body_timeout_s
        self._created = int(time.time())
        self._openapi = orjson.dumps(schemas.openapi(version, default_truncate))
        self._decoders: dict[type, msgspec.json.Decoder[Any]] = {}
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def drain(self, timeout_s: float) -> None:
        """Wait until no call is in flight, or `timeout_s` (new calls are refused by the gate)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()

    ROUTES = frozenset(
        {"/v1/embeddings", "/embeddings", "/v1/rerank", "/v2/rerank", "/rerank", "/tokenize"}
        | {"/v1/models", "/health", "/openapi.json", "/docs"}
        | {f"/docs/{name}" for name in _SWAGGER_ASSETS}
    )

    def app(self) -> Starlette:
        routes = [
            Route(path, self._route(handler, body), methods=["POST"])
            for paths, handler, body in (
                (("/v1/embeddings", "/embeddings"), self._embeddings, schemas.EmbeddingsRequest),
                (("/v1/rerank", "/v2/rerank", "/rerank"), self._rerank, schemas.RerankRequest),
                (("/tokenize",), self._tokenize, schemas.TokenizeRequest),
            )
            for path in paths
        ]
        routes += [
            Route("/v1/models", self._route(self._models, None), methods=["GET"]),
            Route("/health", self._health, methods=["GET"]),
            Route("/openapi.json", self._openapi_json, methods=["GET"]),
            Route("/docs", self._docs, methods=["GET"]),
        ]
        routes += [
            Route(f"/docs/{name}", _asset(name), methods=["GET"]) for name in _SWAGGER_ASSETS
        ]
        listing = ", ".join(
            f"{'/'.join(sorted((r.methods or set()) - {'HEAD'}))} {r.path}" for r in routes
        )

        async def http_error(request: Request, exc: Exception) -> Response:
            """Starlette's own refusals (no route, wrong method) in the face's error shape."""
            assert isinstance(exc, HTTPException)
            asked = f"{request.method} {request.url.path}"
            if exc.status_code == 404:
                return protocol_error(404, f"no route for {asked}; the routes are {listing}")
            if exc.status_code == 405:
                allowed = (exc.headers or {}).get("Allow", "")
                message = f"{asked}: method not allowed; this route takes {allowed}"
                return protocol_error(405, message, exc.headers)
            return protocol_error(exc.status_code, f"{asked}: {exc.detail}", exc.headers)

        async def server_error(request: Request, exc: Exception) -> Response:
            return protocol_error(500, "internal server error (logged by the server)")

        handlers = {HTTPException: http_error, Exception: server_error}
        return Starlette(routes=routes, exception_handlers=handlers)

    # ------------------------------------------------------------------ open routes

    async def _health(self, request: Request) -> Response:
        if self._gate.serving:
            return _json({"status": "serving"})
        try:
            self._gate.runtime()
            reason = "the engine is not alive"
        except Exception as exc:
            reason = str(exc)
        return error_response(describe(NotReadyError(reason)))

    async def _openapi_json(self, request: Request) -> Response:
        return Response(self._openapi, media_type=_JSON)

    async def _docs(self, request: Request) -> Response:
        return HTMLResponse(_SWAGGER_PAGE)

    # ----------------------------------------------------------- the call machinery

    def _route(
        self,
        handler: Callable[[Runtime, Any], Awaitable[Response]],
        body_type: type[msgspec.Struct] | None,
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            self._inflight += 1
            self._idle.clear()
            try:
                self._authorize(request)
                body = await self._read(request) if body_type is not None else None
                rt = self._gate.runtime()
                decoded = self._decode(body, body_type) if body_type is not None else None
                return await _until_disconnect(request, handler(rt, decoded))
            except asyncio.CancelledError:
                raise
            except _Refusal as exc:
                return exc.response
            except Exception as exc:
                return error_response(describe(exc))
            finally:
                self._inflight -= 1
                if not self._inflight:
                    self._idle.set()

        return endpoint

    def _authorize(self, request: Request) -> None:
        if self._keys is None:
            return
        headers = request.headers
        presented = presented_key(
            [(k, headers[k]) for k in ("x-api-key", "authorization") if k in headers]
        )
        if not self._keys.accepts(presented):
            raise _Refusal(error_response(Problem(Kind.UNAUTHENTICATED, MISSING_KEY_MESSAGE)))

    async def _read(self, request: Request) -> bytes:
        """The body, whole within the size limit (413) and the body timeout (408; the
        connection is closed, its unread rest never parsed)."""
        limit = self._max_bytes
        too_large = _Refusal(
            error_response(
                Problem(Kind.TOO_LARGE, f"request body exceeds the limit of {limit} bytes")
            )
        )
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks = []
        size = 0
        try:
            async with asyncio.timeout(self._body_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise too_large
                    chunks.append(chunk)
        except TimeoutError:
            message = (
                f"the request body did not arrive within {self._body_timeout_s:g}s"
                f" ({size} bytes came)"
            )
            raise _Refusal(protocol_error(408, message, {"connection": "close"})) from None
        except ClientDisconnect:  # gone half-way through its body: nobody to answer
            raise _Refusal(Response(status_code=CLIENT_GONE)) from None
        return b"".join(chunks)

    def _decode(self, body: bytes | None, body_type: type[S]) -> S:
        decoder = self._decoders.get(body_type)
        if decoder is None:
            decoder = self._decoders[body_type] = msgspec.json.Decoder(body_type)
        try:
            decoded: S = decoder.decode(body or b"")
        except msgspec.ValidationError as exc:
            raise _validation_error(exc) from None
        except msgspec.DecodeError as exc:
            raise _invalid("", f"request body is not valid JSON: {exc}") from None
        return decoded

    # ------------------------------------------------------------------- embeddings

    async def _embeddings(self, rt: Runtime, req: schemas.EmbeddingsRequest) -> Response:
        started = time.perf_counter()
        rt.embedding_for(req.model)  # before the body's contents: a wrong model says so
        if req.input is msgspec.UNSET:
            raise _invalid("input", "is required")
        if req.encoding_format not in ("float", "base64"):
            raise _invalid(
                "encoding_format", f"unknown value {req.encoding_format!r} (float or base64)"
            )
        chunking, views = req.chunking, req.views or []
        opts = RequestOptions(
            instruction=req.instruction or "",
            prompt_name=_prompt_name(rt, req),
            dimensions=req.dimensions,
            normalize=req.normalize,
            truncate=req.truncate or self._default_truncate,
            encoding=req.encoding or "",
            chunk_max_tokens=chunking.max_tokens if chunking else 0,
            chunk_overlap_tokens=chunking.overlap_tokens if chunking else 0,
            views=tuple(ViewOptions(v.dimensions, v.encoding or "") for v in views),
        )
        call = EmbedCall(
            texts_or_tokens(req.input), opts, field="input", options_field="", model=req.model
        )
        answer = await embed(rt, call)
        as_base64 = req.encoding_format == "base64"
        data = [
            {"object": "embedding", "index": i, **_item(e, as_base64)}
            for i, e in enumerate(answer.embeddings)
        ]
        meta = answer.meta
        body = {"object": "list", "data": data, "model": meta.model, "usage": _usage(meta)}
        return _json(body, self._headers(meta, started))

    def _headers(self, meta: Metadata, started: float) -> dict[str, str]:
        headers = {}
        if self._timing_headers and meta.timing is not None:
            headers = _timing_headers(meta.timing, started)
        headers[TRUNCATED_INPUTS_HEADER] = str(meta.truncated)
        return headers

    # ----------------------------------------------------------------------- rerank

    async def _rerank(self, rt: Runtime, req: schemas.RerankRequest) -> Response:
        """Every rerank route and shape: Cohere's and Jina's `documents`, TEI's `texts`."""
        started = time.perf_counter()
        shape = _RerankShape.of(req)
        for name, value in (("top_n", req.top_n), ("max_tokens_per_doc", req.max_tokens_per_doc)):
            if value is not None and value < 1:
                raise _invalid(name, f"must be at least 1, not {value}")
        # Documents are cut at the end unless the caller asks otherwise, whatever the
        # server's default for embeddings: real ones overflow small windows, and a reranker
        # that refuses one fails the whole search (Open WebUI's does).
        truncate = _truncate_name(req.truncate)
        if truncate not in ("", Truncation.END.value, Truncation.REFUSE.value):
            raise _invalid("truncate", f"{truncate!r} does not apply to rerank (end or refuse)")
        answer = await rerank(
            rt,
            RerankCall(
                query=req.query,
                documents=shape.documents,
                top_k=req.top_n or len(shape.documents),
                instruction=req.instruction or "",
                prompt_name=req.prompt_name or "",
                max_tokens_per_doc=req.max_tokens_per_doc or 0,
                refuse_long_documents=truncate == Truncation.REFUSE.value,
                model=req.model,
                documents_field=shape.field,
            ),
        )
        results = []
        for ranked in answer.results:
            score = ranked.raw if req.raw_scores else ranked.relevance
            result: dict[str, Any] = {"index": ranked.index, shape.score_key: score}
            if shape.with_text:
                text = shape.documents[ranked.index]
                result[shape.text_key] = text if shape.tei else {"text": text}
            if ranked.truncated:
                result["truncated"] = True
            results.append(result)
        headers = self._headers(answer.meta, started)
        if shape.tei:
            return _json(results, headers)
        body = {
            "results": results,
            "model": answer.meta.model,
            "usage": _usage(answer.meta),
            "score_kind": answer.kind.value,
            "score_formula": schemas.SCORE_FORMULAS[answer.kind.value, req.raw_scores],
        }
        return _json(body, headers)

    # --------------------------------------------------------------------- tokenize

    async def _tokenize(self, rt: Runtime, req: schemas.TokenizeRequest) -> Response:
        rt.embedding_for(req.model)
        opts = RequestOptions(
            instruction=req.instruction or "",
            prompt_name=_prompt_name(rt, req),
            truncate=req.truncate or self._default_truncate,
        )
        texts = [req.input] if isinstance(req.input, str) else req.input
        call = TokenizeCall(texts, opts, field="input", options_field="", model=req.model)
        answer = await tokenize(rt, call)
        data = [
            {
                "index": i,
                "tokens": r.ids,
                "offsets": r.offsets,
                "text_start": r.text_start,
                "truncated": r.truncated,
            }
            for i, r in enumerate(answer.results)
        ]
        return _json({"model": answer.model, "data": data})

    # ----------------------------------------------------------------------- models

    async def _models(self, rt: Runtime, _: None) -> Response:
        """One card per name each model answers to (as vLLM lists its served names), the
        embedding model's first, with its kind: "embed" or "score" (a reranker)."""
        cards = [
            {
                "id": name,
                "object": "model",
                "created": self._created,
                "owned_by": "embedding-service",
                "max_model_len": model.info.max_input_tokens,
                "kind": kind,
            }
            for kind, model in rt.served
            for name in model.names
        ]
        return _json({"object": "list", "data": cards})


def _prompt_name(rt: Runtime, req: schemas.EmbeddingsRequest | schemas.TokenizeRequest) -> str:
    """prompt_name, or the one `input_type` stands for."""
    if req.input_type is None:
        return req.prompt_name or ""
    if req.input_type not in _INPUT_TYPES:
        raise _invalid("input_type", f"unknown value {req.input_type!r} (query or document)")
    if req.instruction or req.prompt_name:
        raise _invalid("input_type", "set input_type, instruction or prompt_name, not two")
    return rt.validator.query_prompt_name if req.input_type == "query" else ""


@dataclass(frozen=True)
class _RerankShape:
    """What a rerank request's fields say about the answer's shape."""

    tei: bool  # TEI's `texts`, answered by a bare array; else Cohere's/Jina's `documents`
    documents: list[str]
    with_text: bool
    field: str  # where the documents came from, for error messages

    @property
    def score_key(self) -> str:
        return "score" if self.tei else "relevance_score"

    @property
    def text_key(self) -> str:
        return "text" if self.tei else "document"

    @classmethod
    def of(cls, req: schemas.RerankRequest) -> _RerankShape:
        """Told by the fields sent; a field of the other shape is refused, since the answer
        could not honour it."""
        if req.texts is not None:
            if req.documents is not None:
                raise _invalid("texts", "send documents (Cohere, Jina) or texts (TEI), not both")
            if req.return_documents is not None:
                raise _invalid(
                    "return_documents",
                    "belongs to the documents shape (Cohere, Jina); with texts (TEI) send"
                    " return_text",
                )
            return cls(True, req.texts, bool(req.return_text), "texts")
        if req.documents is None:
            raise _invalid("documents", "is required (or texts, in TEI's shape)")
        if req.return_text is not None:
            raise _invalid(
                "return_text",
                "belongs to the texts shape (TEI); with documents (Cohere, Jina) send"
                " return_documents",
            )
        docs = [d if isinstance(d, str) else d.text for d in req.documents]
        return cls(False, docs, bool(req.return_documents), "documents")


def _truncate_name(value: str | bool | None) -> str:
    """`truncate` as one of our names: TEI sends a boolean; "" when not sent."""
    if isinstance(value, bool):
        return Truncation.END.value if value else Truncation.REFUSE.value
    return value or ""


def _usage(meta: Metadata) -> dict[str, int]:
    return {"prompt_tokens": meta.prompt_tokens, "total_tokens": meta.prompt_tokens}


def _item(e: Embedding, as_base64: bool) -> dict[str, Any]:
    """One input's OpenAI `data` fields, with its views and chunks when asked; a cut input
    says so."""
    item = _vector(e.vector, as_base64)
    if e.views:
        item["views"] = [
            {"dimensions": v.dimensions, "encoding": v.encoding.value, **_vector(v, as_base64)}
            for v in e.views
        ]
    if e.chunks:
        item["chunks"] = [
            {
                "char_start": c.char_start,
                "char_end": c.char_end,
                "token_count": c.embedding.token_count,
            }
            | _item(c.embedding, as_base64)
            for c in e.chunks
        ]
    if e.truncated:
        item["truncated"] = True
    return item


def _vector(v: Vector, as_base64: bool) -> dict[str, Any]:
    """`embedding` as numbers (orjson writes the array) or base64 bytes, and int8's `scale`."""
    if as_base64:
        out: dict[str, Any] = {"embedding": base64.b64encode(v.data).decode("ascii")}
    else:
        out = {"embedding": np.frombuffer(v.data, postprocess.DTYPES[v.encoding])}
    if v.encoding is postprocess.Encoding.INT8:
        out["scale"] = v.scale
    return out


class _Refusal(Exception):
    """A face-level refusal (auth, body size, slow body), already answered."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


def _asset(name: str) -> Callable[[Request], Awaitable[Response]]:
    path = swagger_ui.static_path / name

    async def serve(request: Request) -> Response:
        return FileResponse(path)

    return serve


async def _until_disconnect(request: Request, call: Awaitable[Response]) -> Response:
    """Run `call`; if the client disconnects first, cancel it (its queued work is dropped)."""
    task = asyncio.current_task()
    assert task is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone = True
        task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await call
    except asyncio.CancelledError:
        if not gone:
            raise
        task.uncancel()
        return Response(status_code=CLIENT_GONE)
    finally:
        watcher.cancel()
