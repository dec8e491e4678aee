"""Garbage-collector switches around a batch: a batch's objects frozen while it runs, the collector
off while it is validated and planned (`LLM.generate`, the bench's phases)."""
from __future__ import annotations

import contextlib
import gc
from typing import Iterator

FULL_COLLECTIONS_DEFERRED = 1 << 30  # young collections before a full one, while a batch runs: never


@contextlib.contextmanager
def gc_frozen_for_batch() -> Iterator[None]:
    """Objects alive when a batch starts running (its prompts and sequences, the engine) skip
    Python's garbage collections until it ends, and the oldest generation is not collected while
    it runs. A full collection walks every tracked object, and a batch's prompts are lists of
    millions of token ids: one such walk took 0.1 s on a CPU harness of the bench's shared-prefix
    batch. Even with those frozen, the objects a batch makes as it runs drew five full collections
    there (0.05 s each, time the GPU may wait for its next step) that freed 37 objects in all.
    Unreferenced objects are still freed at once (reference counting) and young cycles by the
    young collections; only cycles that grew old wait for the batch's end. A freeze the caller
    made (a host application's) is the caller's to undo."""
    already_frozen = gc.get_freeze_count() > 0
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(thresholds[0], thresholds[1], FULL_COLLECTIONS_DEFERRED)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        if not already_frozen:
            gc.unfreeze()


@contextlib.contextmanager
def gc_off_while_planning() -> Iterator[None]:
    """No garbage collection while a batch is validated and planned, inside
    `gc_frozen_for_batch`: what planning makes all stays alive (copies of millions of
    prompt ids, sequences, tree nodes), so a collection there only walks it again (on a CPU
    harness, 41 young collections took 20% of the shared-prefix batch's validation and planning).
    On the way out it joins the batch's frozen objects: otherwise the first young collection
    once the collector is back on walks it all (12-16 ms there, each time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
