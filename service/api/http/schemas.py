"""The HTTP face's request and response shapes, and the OpenAPI document built from them.

Requests are decoded by msgspec straight into these structs: it checks types faster than
anything else measured for this path and names the field at fault ("at `$.dimensions`").
Responses are written with orjson, which serializes float32 arrays without a Python float
per number (the hot spot of an embeddings response); the response structs here exist to
document them.

Fields that OpenAI's API does not have are extensions; clients pass them as extra JSON
fields (the openai SDK's `extra_body`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

# ---------------------------------------------------------------------------- requests


class ChunkingOptions(msgspec.Struct, kw_only=True):
    max_tokens: int
    overlap_tokens: int = 0


class ViewOptions(msgspec.Struct, kw_only=True):
    dimensions: int | None = None
    encoding: str | None = None


class EmbeddingsRequest(msgspec.Struct, kw_only=True):
    """POST /v1/embeddings: OpenAI's request, plus the service's options."""

    # A string, an array of strings, an array of token ids, or an array of token-id arrays;
    # checked by hand because msgspec cannot tell the array forms apart in a union.
    input: Any = msgspec.field(default=msgspec.UNSET)
    model: str | None = None
    encoding_format: str = "float"
    dimensions: int | None = None
    user: str | None = None
    # Extensions.
    instruction: str | None = None
    prompt_name: str | None = None
    input_type: str | None = None
    truncate: str | None = None
    normalize: bool | None = None
    encoding: str | None = None
    chunking: ChunkingOptions | None = None
    views: list[ViewOptions] | None = None


class TokenizeRequest(msgspec.Struct, kw_only=True):
    """POST /tokenize: the ids /v1/embeddings would send the engine, with their spans."""

    input: str | list[str]
    model: str | None = None
    instruction: str | None = None
    prompt_name: str | None = None
    input_type: str | None = None
    truncate: str | None = None


class TextDocument(msgspec.Struct):
    text: str


class RerankRequest(msgspec.Struct, kw_only=True):
    """POST /v1/rerank, /v2/rerank, /rerank: Cohere's or Jina's `documents`, or TEI's `texts`."""

    query: str
    documents: list[str | TextDocument] | None = None  # Cohere, Jina
    texts: list[str] | None = None  # TEI
    model: str | None = None
    top_n: int | None = None
    return_documents: bool | None = None  # Cohere, Jina
    max_tokens_per_doc: int | None = None  # Cohere
    return_text: bool | None = None  # TEI
    raw_scores: bool = False  # TEI
    # Ours, or TEI's boolean (true: end, false: refuse).
    truncate: str | bool | None = None
    # Extensions: the query's instruction or prompt (the model's query prompt by default).
    instruction: str | None = None
    prompt_name: str | None = None


# ------------------------------------------------------------- responses (documentation)


_TRUNCATED = "extension: true when the input was cut to fit the window; absent when whole"


class EmbeddingData(msgspec.Struct):
    object: Literal["embedding"]
    index: int
    # Numbers for encoding_format float (int8 and binary: the integer bytes), or a base64
    # string of the little-endian bytes for encoding_format base64.
    embedding: list[float] | str
    # encoding int8 only: multiply each value by this to get the float.
    scale: float | None = None
    views: list[ViewData] | None = None  # one per asked view, in order
    chunks: list[ChunkData] | None = None  # with chunking: the input's chunks in text order
    truncated: Annotated[bool | None, msgspec.Meta(description=_TRUNCATED)] = None


class ViewData(msgspec.Struct):
    dimensions: int
    encoding: str
    embedding: list[float] | str
    scale: float | None = None


class ChunkData(msgspec.Struct):
    # Code points into the input: input[char_start:char_end] is the chunk's text.
    char_start: int
    char_end: int
    token_count: int
    embedding: list[float] | str
    scale: float | None = None
    views: list[ViewData] | None = None


class TokenizedData(msgspec.Struct):
    index: int
    tokens: list[int]
    # [start, end) code points of each token from the input text: offsets[i] belongs to
    # tokens[text_start + i]; special tokens and the instruction have none.
    offsets: list[tuple[int, int]]
    text_start: int
    truncated: bool


class TokenizeResponse(msgspec.Struct):
    model: str
    data: list[TokenizedData]


class Usage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(msgspec.Struct):
    object: Literal["list"]
    data: list[EmbeddingData]
    model: str
    usage: Usage


# What relevance_score is made of, by score_kind, and as what raw_scores gives instead.
SCORE_FORMULAS = {
    ("cross-encoder", False): "sigmoid(logit)",
    ("cross-encoder", True): "logit",
    ("cosine", False): "(1 + cosine) / 2",
    ("cosine", True): "cosine",
}
_SCORE = (
    "in [0, 1]: a cross-encoder's probability that the document answers the query"
    " (sigmoid of its logit; Qwen3-Reranker: P(yes)), or, when the server runs no rerank"
    " model, (1 + cosine) / 2 of the query's and the document's embeddings; with raw_scores,"
    " the logit or the cosine itself"
)
_DOC_TRUNCATED = "true when the document was cut to fit (the window or max_tokens_per_doc)"


class RerankResult(msgspec.Struct):
    index: int
    relevance_score: Annotated[float, msgspec.Meta(description=_SCORE)]
    document: TextDocument | None = None  # with return_documents
    truncated: Annotated[bool | None, msgspec.Meta(description=_DOC_TRUNCATED)] = None


class RerankResponse(msgspec.Struct):
    results: list[RerankResult]  # best first, top_n of them
    model: str
    usage: Usage
    score_kind: Annotated[
        Literal["cross-encoder", "cosine"],
        msgspec.Meta(
            description="what ranked: a cross-encoder reading query and document together,"
            " or the cosine of two embeddings (no rerank model served)"
        ),
    ]
    score_formula: Annotated[
        Literal["sigmoid(logit)", "logit", "(1 + cosine) / 2", "cosine"],
        msgspec.Meta(description="how relevance_score was made (raw_scores: the raw score)"),
    ]


class TeiRank(msgspec.Struct):
    """One item of TEI's answer, a JSON array best first."""

    index: int
    score: Annotated[float, msgspec.Meta(description=_SCORE)]
    text: str | None = None  # with return_text
    truncated: Annotated[bool | None, msgspec.Meta(description=_DOC_TRUNCATED)] = None


class ModelCard(msgspec.Struct):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int
    kind: Annotated[
        Literal["embed", "score"],
        msgspec.Meta(description="extension: an embedding model, or a reranker (rerank routes)"),
    ]


class ModelList(msgspec.Struct):
    object: Literal["list"]
    data: list[ModelCard]


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(msgspec.Struct):
    error: ErrorDetail


# ---------------------------------------------------------------------------- OpenAPI

_INPUT_SCHEMA = {
    "oneOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}},
        {"type": "array", "items": {"type": "integer"}},
        {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
    ],
    "description": "texts, or token ids of the model's own tokenizer (special tokens included)",
}

_TRUNCATE = (
    "refuse, end or start: what an input over the window gets (default here: {default}; a"
    " cut input is flagged `truncated` and counted in the x-truncated-inputs header)"
)

_EXTENSIONS = {
    "instruction": "task description for queries, laid out the model's way (Qwen3)",
    "prompt_name": "a named prompt of the model's sentence-transformers config",
    "input_type": "query (the model's query prompt) or document (as is)",
    "truncate": _TRUNCATE,
    "normalize": "L2-normalize the vector (default true)",
    "encoding": "float32 (default), float16, int8 (with scale) or binary (packed bits)",
    "chunking": "split each input into chunks of at most max_tokens tokens (prefix and special"
    " tokens included), about overlap_tokens shared; each data item then has `chunks` with"
    " their spans and vectors, and its own embedding is the token-weighted mean of the chunks'"
    " normalized vectors",
    "views": "more resolutions of the same vectors from one engine pass: each item gets"
    " `views`, one per {dimensions, encoding} asked, in order",
}

_RERANK_FIELDS = {
    "documents": "Cohere and Jina: the texts to rank, as strings or {text}",
    "texts": "TEI: the texts to rank; the answer is then TEI's array of {index, score, text}",
    "top_n": "answer only the best top_n (default: all)",
    "return_documents": "Cohere and Jina: give each result its document's text",
    "return_text": "TEI: give each result its text",
    "max_tokens_per_doc": "Cohere: cut each document to this many tokens (special tokens"
    " included); documents are cut to the window in any case",
    "raw_scores": "TEI's, taken in both shapes: the cosine itself, in [-1, 1], instead of"
    " (1 + cosine) / 2",
    "truncate": "what a document over the window (or max_tokens_per_doc) gets: end (the"
    " default, whatever the server's default for embeddings), start or refuse, or TEI's true"
    " (end) and false (refuse). The query is never cut: one over the window is refused",
    "instruction": "extension: task description laid before the query (Qwen3)",
    "prompt_name": "extension: a named prompt for the query (default: the model's query prompt)",
}

_RERANK_SUMMARY = (
    "Rank documents by the cosine of their embeddings with the query's (a bi-encoder, not a"
    " cross-encoder). Cohere v1/v2 and Jina send `documents` and get {results, model, usage,"
    " score_kind, score_formula}; TEI sends `texts` and gets an array. relevance_score (TEI:"
    " score) is (1 + cosine) / 2, in [0, 1]. Documents over the window are cut to fit, the"
    " query never is."
)


def openapi(version: str, default_truncate: str = "end") -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route."""
    structs = [EmbeddingsRequest, EmbeddingsResponse, RerankRequest, RerankResponse, TeiRank]
    structs += [TokenizeRequest, TokenizeResponse]
    (_, components) = msgspec.json.schema_components(
        [*structs, ModelList, ErrorBody], ref_template="#/components/schemas/{name}"
    )
    request = components["EmbeddingsRequest"]
    request["properties"]["input"] = _INPUT_SCHEMA
    request["required"] = ["input"]
    for name, text in _EXTENSIONS.items():
        description = text.format(default=default_truncate) if name == "truncate" else text
        request["properties"][name]["description"] = f"extension: {description}"
    rerank_request = components["RerankRequest"]["properties"]
    for name, text in _RERANK_FIELDS.items():
        rerank_request[name]["description"] = text

    def ref(name: str) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{name}"}

    def json_body(schema: dict[str, Any]) -> dict[str, Any]:
        return {"content": {"application/json": {"schema": schema}}}

    errors = {
        str(code): {"description": text, **json_body(ref("ErrorBody"))}
        for code, text in (
            (400, "invalid request (the message names the field, the index and the limit)"),
            (401, "missing or wrong API key"),
            (404, "unknown model (the message lists the served names) or unknown route"),
            (405, "method not allowed on this route (the message names the allowed ones)"),
            (408, "the request body did not arrive within the server's body timeout"),
            (413, "body over the size limit"),
            (429, "queue full; retry after the Retry-After header"),
            (503, "loading, draining, engine failure or too many connections; retry"),
        )
    }
    truncated_header = {
        "x-truncated-inputs": {
            "description": "how many inputs (rerank: documents) were cut to fit; always sent",
            "schema": {"type": "integer"},
        }
    }

    def post(summary: str, request_name: str, answer: dict[str, Any]) -> dict[str, Any]:
        ok: dict[str, Any] = {"description": "OK", **json_body(answer)}
        if request_name != "TokenizeRequest":
            ok["headers"] = truncated_header
        return {
            "post": {
                "summary": summary,
                "requestBody": {"required": True, **json_body(ref(request_name))},
                "responses": {"200": ok, **errors},
            }
        }

    embeddings = post("Embed texts or token ids", "EmbeddingsRequest", ref("EmbeddingsResponse"))
    rerank_answer = {"oneOf": [ref("RerankResponse"), {"type": "array", "items": ref("TeiRank")}]}
    rerank = post(_RERANK_SUMMARY, "RerankRequest", rerank_answer)
    tokenize = post(
        "The token ids /v1/embeddings would send the engine, with their spans in the text",
        "TokenizeRequest",
        ref("TokenizeResponse"),
    )
    models = {
        "get": {
            "summary": "The served model, one card per name it answers to",
            "responses": {"200": json_body(ref("ModelList"))},
        }
    }
    health = {
        "get": {
            "summary": "200 while serving; 503 while loading, draining or after engine failure",
            "responses": {"200": {"description": "serving"}, "503": {"description": "not"}},
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Embedding service (OpenAI-compatible)", "version": version},
        "paths": {
            "/v1/embeddings": embeddings,
            "/v1/rerank": rerank,
            "/v2/rerank": rerank,
            "/rerank": rerank,
            "/tokenize": tokenize,
            "/v1/models": models,
            "/health": health,
        },
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
