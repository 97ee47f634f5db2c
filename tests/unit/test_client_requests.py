"""The client's stream framing: single-item and multi-item messages, and their results."""

from __future__ import annotations

import numpy as np
import pytest

from embedding.v1 import embedding_pb2 as pb
from embedding_client import Options, StreamResult
from embedding_client.requests import stream_requests


def test_items_go_in_messages_of_the_chosen_size_with_shared_options() -> None:
    items = [(f"id-{i}", f"text {i}") for i in range(130)]
    messages = list(stream_requests(iter(items), Options(dimensions=64), 64))
    assert [len(m.items) for m in messages] == [64, 64, 2]
    assert all(m.options.dimensions == 64 and not m.id and not m.input for m in messages)
    sent = [(x.id, x.input) for m in messages for x in m.items]
    assert sent == items


def test_one_item_per_message_uses_the_single_item_form() -> None:
    messages = list(stream_requests([("a", "x"), ("b", "y")], Options(), 1))
    assert [(m.id, m.input, len(m.items)) for m in messages] == [("a", "x", 0), ("b", "y", 0)]


def test_items_per_message_below_one_is_refused_before_any_call() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        stream_requests([("a", "x")], Options(), 0)


def test_a_multi_item_response_yields_one_result_per_item() -> None:
    vector = np.arange(4, dtype="<f4")
    embedding = pb.Embedding(data=vector.tobytes(), dimensions=4, encoding=pb.ENCODING_FLOAT32)
    error = pb.EmbedStreamResponse(id="solo").error
    error.code, error.message = 3, "input: text is empty"
    response = pb.EmbedStreamResponse(
        results=[
            pb.StreamItemResult(id="a", embedding=embedding),
            pb.StreamItemResult(id="b", error=error),
        ]
    )
    a, b = StreamResult.all_from_proto(response)
    assert a.ok and a.id == "a" and a.vector is not None
    np.testing.assert_array_equal(a.vector, vector)
    assert not b.ok and b.id == "b" and b.error is not None and b.error.code == 3
    (solo,) = StreamResult.all_from_proto(pb.EmbedStreamResponse(id="solo", error=error))
    assert solo.id == "solo" and not solo.ok
