"""Several front-end processes sharing one engine core per model (--api-processes).

On a GPU the engine is fast and one Python process is what limits small requests. The
supervisor (supervisor.py) binds the ports, starts each model's vLLM engine core with one
client slot per front end, and spawns the front ends (worker.py): each is the whole
single-process server (its own event loop, tokenizer threads, batchers and cache) attached
to the shared cores. vLLM's priority scheduling in the one core sees the work of every
front end, so an interactive call in any process runs ahead of bulk work from all of them.
"""
