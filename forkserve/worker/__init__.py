"""The worker: what computes a step (model, KV tensors, attention backends, CUDA graphs, sampler).

It imports nothing from the engine core; the core drives it through plan.py and worker.py only.
"""
