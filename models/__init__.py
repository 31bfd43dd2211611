"""Generation engines: networks, schedulers, samplers and model cards.

Nothing in this package knows about HTTP, queues or files beyond weight folders;
the worker's pipeline composes these pieces.
"""
