"""The HTTP face: OpenAI-compatible embeddings, rerank, models, tokenize and health."""
