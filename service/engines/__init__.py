"""Engines turn batches of token ids into pooled vectors. Only `vllm_engine` imports vllm."""
