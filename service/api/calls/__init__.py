"""The face-neutral call layer: one module per task, called by both faces.

A face decodes its wire form into a call here (plain values), awaits the answer (plain
values), and serializes it; the steps between (validation, choosing the model, running the
pipeline, ranking) live here once.
"""
