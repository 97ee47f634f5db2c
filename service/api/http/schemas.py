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

from typing import Any, Literal

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
    """POST /v1/rerank, in the Cohere/Jina shape."""

    query: str
    documents: list[str | TextDocument]
    model: str | None = None
    top_n: int | None = None
    return_documents: bool = False
    # Extensions: the query's instruction or prompt (the model's query prompt by default).
    instruction: str | None = None
    prompt_name: str | None = None
    truncate: str | None = None


# ------------------------------------------------------------- responses (documentation)


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


class RerankResult(msgspec.Struct):
    index: int
    relevance_score: float
    document: TextDocument | None = None


class RerankResponse(msgspec.Struct):
    results: list[RerankResult]
    model: str
    usage: Usage


class ModelCard(msgspec.Struct):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


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

_EXTENSIONS = {
    "instruction": "task description for queries, laid out the model's way (Qwen3)",
    "prompt_name": "a named prompt of the model's sentence-transformers config",
    "input_type": "query (the model's query prompt) or document (as is)",
    "truncate": "refuse (default), end or start: what to do with inputs over the window",
    "normalize": "L2-normalize the vector (default true)",
    "encoding": "float32 (default), float16, int8 (with scale) or binary (packed bits)",
    "chunking": "split each input into chunks of at most max_tokens tokens (prefix and special"
    " tokens included), about overlap_tokens shared; each data item then has `chunks` with"
    " their spans and vectors, and its own embedding is the token-weighted mean of the chunks'"
    " normalized vectors",
    "views": "more resolutions of the same vectors from one engine pass: each item gets"
    " `views`, one per {dimensions, encoding} asked, in order",
}


def openapi(version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route."""
    structs = [EmbeddingsRequest, EmbeddingsResponse, RerankRequest, RerankResponse]
    structs += [TokenizeRequest, TokenizeResponse]
    (_, components) = msgspec.json.schema_components(
        [*structs, ModelList, ErrorBody], ref_template="#/components/schemas/{name}"
    )
    request = components["EmbeddingsRequest"]
    request["properties"]["input"] = _INPUT_SCHEMA
    request["required"] = ["input"]
    for name, text in _EXTENSIONS.items():
        request["properties"][name]["description"] = f"extension: {text}"

    def ref(name: str) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{name}"}

    def json_body(name: str) -> dict[str, Any]:
        return {"content": {"application/json": {"schema": ref(name)}}}

    errors = {
        str(code): {"description": text, **json_body("ErrorBody")}
        for code, text in (
            (400, "invalid request (the message names the field, the index and the limit)"),
            (401, "missing or wrong API key"),
            (404, "unknown model"),
            (413, "body over the size limit"),
            (429, "queue full; retry after the Retry-After header"),
            (503, "loading, draining or engine failure; retry after Retry-After"),
        )
    }

    def post(summary: str, request_name: str, response_name: str) -> dict[str, Any]:
        return {
            "post": {
                "summary": summary,
                "requestBody": {"required": True, **json_body(request_name)},
                "responses": {"200": {"description": "OK", **json_body(response_name)}, **errors},
            }
        }

    embeddings = post("Embed texts or token ids", "EmbeddingsRequest", "EmbeddingsResponse")
    rerank = post(
        "Rank documents by cosine similarity to the query (a bi-encoder, not a cross-encoder)",
        "RerankRequest",
        "RerankResponse",
    )
    tokenize = post(
        "The token ids /v1/embeddings would send the engine, with their spans in the text",
        "TokenizeRequest",
        "TokenizeResponse",
    )
    models = {"get": {"summary": "The served model", "responses": {"200": json_body("ModelList")}}}
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
