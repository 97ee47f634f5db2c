"""Issue 19: a user's knowledge base in the real Open WebUI (pinned, see requirements.txt),
embedded and reranked by the real service, with Open WebUI's default chunking.

Five real documents (Markdown, plain text, a PDF; two over 5,000 words) are uploaded, put in
a knowledge base and searched with twelve questions, each answered by one known passage of
one known document: with plain vector search, with hybrid search (BM25 + vectors, re-scored
by embedding cosines) and with hybrid search reranked by the service's /v1/rerank.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pytest

from tests.openwebui.documents import QUESTIONS, Question
from tests.openwebui.webui import KnowledgeBase, OpenWebUI

TOP_K = 5
# Of 12 questions: how many must find a chunk of their document in the top 5, and how many
# the chunk holding the answer itself. Measured with MiniLM (which sees only the first 256
# tokens of a 1,000-character chunk) in every mode: 12 and 12, every document at rank 1,
# but one answer at rank 4 (the GPL's fee clause), so one answer miss is allowed for.
MIN_DOCUMENT_HITS = 12
MIN_ANSWER_HITS = 11

MODES: dict[str, dict[str, Any]] = {
    "vector": {"ENABLE_RAG_HYBRID_SEARCH": False},
    # Hybrid without a reranking model: Open WebUI re-embeds the candidates and ranks them
    # by cosine.
    "hybrid": {"ENABLE_RAG_HYBRID_SEARCH": True, "RAG_RERANKING_MODEL": ""},
    # Hybrid, ranked by the service's /v1/rerank (set from the environment at start; saved
    # again here, as the admin panel does, so the order of the runs does not matter).
    "hybrid+reranker": {"ENABLE_RAG_HYBRID_SEARCH": True, "RAG_RERANKING_ENGINE": "external"},
}


def _words(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


@dataclass
class Answer:
    question: Question
    status: int
    names: list[str]  # the documents of the chunks returned, best first
    texts: list[str]
    scores: list[float | None]
    file_ids: list[str]
    error: str = ""

    def document_rank(self, file_id: str) -> int | None:
        """1-based rank of the first chunk of the expected document."""
        return self.file_ids.index(file_id) + 1 if file_id in self.file_ids else None

    def answer_rank(self, file_id: str) -> int | None:
        """1-based rank of the first chunk of the expected document holding the answer."""
        want = _words(self.question.answer)
        for rank, (fid, text) in enumerate(zip(self.file_ids, self.texts, strict=True), 1):
            if fid == file_id and want in _words(text):
                return rank
        return None

    def line(self, file_id: str) -> str:
        q = self.question
        if self.status != 200:
            return f"  [HTTP {self.status}: {self.error[:300]}] {q.text!r}"
        doc, ans = self.document_rank(file_id), self.answer_rank(file_id)
        where = f"doc {doc or 'MISS'}, answer {ans or 'MISS'}"
        scores = ", ".join("None" if s is None else f"{s:.3f}" for s in self.scores)
        return f"  [{where}] {q.text!r} -> {q.document}; got {self.names} scores [{scores}]"


def ask(webui: OpenWebUI, kb: KnowledgeBase, question: Question) -> Answer:
    response = webui.post(
        "/api/v1/retrieval/query/collection",
        json={"collection_names": [kb.id], "query": question.text, "k": TOP_K, "k_reranker": TOP_K},
    )
    if response.status_code != 200:
        return Answer(question, response.status_code, [], [], [], [], response.text)
    body = response.json()
    metadatas = (body.get("metadatas") or [[]])[0][:TOP_K]
    return Answer(
        question,
        200,
        names=[str(m.get("name") or m.get("source") or "?") for m in metadatas],
        texts=[str(t) for t in (body.get("documents") or [[]])[0][:TOP_K]],
        scores=(body.get("distances") or [[]])[0][:TOP_K],
        file_ids=[str(m.get("file_id")) for m in metadatas],
    )


def test_every_upload_completes(knowledge_base: KnowledgeBase) -> None:
    lines = [
        f"  {u.name}: processing {u.status}{' (' + u.error[:300] + ')' if u.error else ''}; "
        f"added to the knowledge base: {'yes' if u.added else 'no, ' + u.add_error}"
        for u in knowledge_base.uploads
    ]
    ok = [u for u in knowledge_base.uploads if u.status == "completed" and u.added]
    print(f"\nuploads ok {len(ok)}/{len(knowledge_base.uploads)}\n" + "\n".join(lines))
    assert len(ok) == len(knowledge_base.uploads), "\n".join(lines)


@pytest.mark.parametrize("mode", list(MODES))
def test_questions_find_their_document(
    mode: str, openwebui: OpenWebUI, knowledge_base: KnowledgeBase, served_model: str
) -> None:
    settings = dict(MODES[mode])
    if settings.get("RAG_RERANKING_ENGINE") == "external":
        settings["RAG_RERANKING_MODEL"] = served_model
    saved = openwebui.update_rag_config(**settings)
    # Open WebUI turns hybrid search back off when its reranker fails to load.
    assert saved["ENABLE_RAG_HYBRID_SEARCH"] == settings["ENABLE_RAG_HYBRID_SEARCH"], saved

    log_start = openwebui.log_size()
    answers = [ask(openwebui, knowledge_base, q) for q in QUESTIONS]
    logged = openwebui.log_since(log_start)

    ids = [knowledge_base.file_id(a.question.document) for a in answers]
    answered = [a for a in answers if a.status == 200]
    doc_hits = sum(a.document_rank(i) is not None for a, i in zip(answers, ids, strict=True))
    answer_hits = sum(a.answer_rank(i) is not None for a, i in zip(answers, ids, strict=True))
    report = (
        f"{mode}: queries 200 {len(answered)}/{len(answers)}, "
        f"document hit@{TOP_K} {doc_hits}/{len(answers)}, "
        f"answer hit@{TOP_K} {answer_hits}/{len(answers)}\n"
        + "\n".join(a.line(i) for a, i in zip(answers, ids, strict=True))
    )
    print(f"\n{report}")

    assert len(answered) == len(answers), f"queries failed\n{report}"
    if mode == "hybrid+reranker":
        # Open WebUI logs each call to its external reranker, and each failed one (after
        # which it goes on without scores).
        calls = [line for line in logged if "ExternalReranker:predict:model" in line]
        assert len(calls) >= len(answers), f"the reranker was called {len(calls)} times\n{report}"
        failures = [line for line in logged if "Error in external reranking" in line]
        assert not failures, "\n".join(failures[:5]) + f"\n{report}"
        # Its relevance threshold (and its UI) read rerank scores as [0, 1].
        outside = [s for a in answered for s in a.scores if s is None or not 0 <= s <= 1]
        assert not outside, f"rerank scores outside [0, 1]: {outside[:10]}\n{report}"
    assert doc_hits >= MIN_DOCUMENT_HITS, report
    assert answer_hits >= MIN_ANSWER_HITS, report
