"""Bringing an engine back after a step failed, so one fault never ends a server or a batch.

A step that raises leaves the engine's state unknown part-way. `reset_engine` aborts every
request (which frees their KV pages, as a client disconnect does), drops the step still in
flight (async scheduling), and checks that nothing is left scheduled; it raises when the state
does not add up, and the caller then builds a new engine instead (the server) or stops (a
batch run, which resumes on a rerun).
"""
from __future__ import annotations

import logging

from forkserve.engine.engine import Engine

logger = logging.getLogger(__name__)


class EngineUnrecoverable(RuntimeError):
    """The engine could not be reset after a fault."""


def reset_engine(engine: Engine) -> None:
    """Abort every request and clear the in-flight step; raise EngineUnrecoverable if work is left."""
    try:
        engine.worker.check_alive()  # failed tensor-parallel ranks: only a new engine brings them back
    except RuntimeError as error:
        raise EngineUnrecoverable(str(error)) from error
    if not engine.reset_after_fault():
        raise EngineUnrecoverable("after aborting every request, sequences are still scheduled")
    logger.warning("the engine was reset after a fault: every unfinished request was aborted")
