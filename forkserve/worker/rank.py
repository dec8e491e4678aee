"""A tensor-parallel rank other than 0: `python -m forkserve.worker.rank`, started by rank 0's
`Worker` (forkserve/distributed/ranks.py). It builds its `Worker` (its shard of the model, its
KV heads' pool) and runs each step's forward as rank 0 sends it, until rank 0 closes the pipe.
A failure is reported to rank 0 before the process exits.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback

from forkserve.config import EngineConfig
from forkserve.distributed import RankLink
from forkserve.worker.worker import Worker

logger = logging.getLogger("forkserve.worker.rank")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one tensor-parallel rank (started by rank 0)")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--settings", required=True, help="JSON: config, max_levels, store_port")
    parser.add_argument("--messages-fd", type=int, required=True)
    parser.add_argument("--report-fd", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"rank {args.rank} %(levelname)s %(name)s: %(message)s")
    link = RankLink(args.messages_fd, args.report_fd)
    try:
        settings = json.loads(args.settings)
        worker = Worker(EngineConfig(**settings["config"]), settings["max_levels"], args.rank, settings["store_port"])
        worker.serve_rank(link.receive)
    except Exception as error:  # rank 0 names this rank and its error
        traceback.print_exc()
        link.report(f"{type(error).__name__}: {error}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
