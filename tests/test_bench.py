"""The bench's workloads: the same request lists as ../shared/bench/workloads.py builds, and
warm-up batches that share no prefix with them."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from forkserve.bench.worker import warm_up_workloads
from forkserve.bench.workloads import build

SHARED_WORKLOADS = Path(__file__).resolve().parents[2] / "shared" / "bench" / "workloads.py"


@pytest.mark.skipif(not SHARED_WORKLOADS.exists(), reason="../shared/bench/workloads.py is not present")
def test_request_lists_equal_the_shared_workloads() -> None:
    spec = importlib.util.spec_from_file_location("shared_workloads", SHARED_WORKLOADS)
    shared = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shared)
    ours = {name: build(name).requests for name in ("sharedprefix", "samples", "nosharing")}
    assert [(r.prompt_token_ids, r.max_tokens) for r in ours["sharedprefix"]] == shared.shared_prefix()
    assert [(r.prompt_token_ids, r.max_tokens, r.n) for r in ours["samples"]] == shared.parallel_samples()
    assert [(r.prompt_token_ids, r.max_tokens) for r in ours["nosharing"]] == shared.no_sharing()
    assert all(r.n == 1 for name in ("sharedprefix", "nosharing") for r in ours[name])


def test_warm_ups_share_no_prefix_with_the_timed_batches() -> None:
    """A warm-up prompt sharing a first page with a timed one would hand the timed batch cached KV."""
    def first_pages(workloads) -> set[tuple[int, ...]]:
        return {tuple(r.prompt_token_ids[:16]) for w in workloads for r in w.requests}

    timed = first_pages([build(name) for name in ("sharedprefix", "samples", "nosharing")])
    warm = first_pages(warm_up_workloads())
    assert warm and not timed & warm
