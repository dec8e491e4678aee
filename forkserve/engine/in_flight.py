"""Async scheduling's step in flight: its sampling sequences hold placeholder tokens until its
draws are read, one step later, and then take their tokens and the stop checks."""
from __future__ import annotations

from dataclasses import dataclass

from forkserve.engine.sequence import Sequence, SequenceStatus
from forkserve.engine.stopping import StopChecker, reaches_length
from forkserve.worker.plan import PLACEHOLDER
from forkserve.worker.worker import LaunchedStep


@dataclass
class InFlightStep:
    """A queued step (async scheduling): its sampling sequences, in row order, and its draws."""

    seqs: list[Sequence]
    launched: LaunchedStep

    @classmethod
    def queued(cls, seqs: list[Sequence], launched: LaunchedStep, max_model_len: int) -> InFlightStep:
        """Each sequence gets a PLACEHOLDER for the token this step draws (row `pending_row`)."""
        for row, seq in enumerate(seqs):
            seq.token_ids.append(PLACEHOLDER)
            seq.num_pending += 1
            seq.pending_row = row
            seq.final_in_flight = reaches_length(len(seq.token_ids), seq, max_model_len)
        return cls(seqs, launched)

    def resolve(self, stops: StopChecker) -> list[Sequence]:
        """Put the draws in place of the placeholders and run the stop checks; the sequences that ended.

        A sequence may have queued one more step meanwhile (one more placeholder after this one);
        if this token ends it, that step's token is dropped. Aborted sequences are skipped.
        """
        result = self.launched.result()
        ended = []
        for row, seq in enumerate(self.seqs):
            if seq.status is SequenceStatus.FINISHED:
                continue
            seq.num_pending -= 1
            seq.token_ids[len(seq.token_ids) - seq.num_pending - 1] = result.token_ids[row]
            if stops.took_token(seq, result, row):
                if seq.num_pending:
                    del seq.token_ids[-seq.num_pending:]
                    seq.num_pending = 0
                ended.append(seq)
        return ended
