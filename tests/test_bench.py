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


def test_idle_between_kernels_sums_gaps_by_the_kernels_around_them() -> None:
    from types import SimpleNamespace

    import torch

    from forkserve.bench.profile import idle_between_kernels

    def event(start: float, end: float, name: str, device=torch.autograd.DeviceType.CUDA) -> SimpleNamespace:
        return SimpleNamespace(time_range=SimpleNamespace(start=start, end=end), name=name, device_type=device)

    # us: a [0, 100), b [90, 150) overlapping a, gap 50, a [200, 300), gap 100, copy [400, 410); a CPU event ignored
    events = [event(200, 300, "a"), event(0, 100, "a"), event(90, 150, "b"), event(400, 410, "copy"),
              event(150, 390, "host", torch.autograd.DeviceType.CPU)]
    span, busy, gaps = idle_between_kernels(SimpleNamespace(events=lambda: events))
    assert span == pytest.approx(0.410) and busy == pytest.approx(0.260)
    assert gaps == [(pytest.approx(0.1), 1, "a", "copy"), (pytest.approx(0.05), 1, "b", "a")]


def test_idle_per_marker_splits_the_timeline_at_each_marker_kernel() -> None:
    from types import SimpleNamespace

    import torch

    from forkserve.bench.profile import idle_per_marker

    def event(start: float, end: float, name: str) -> SimpleNamespace:
        return SimpleNamespace(time_range=SimpleNamespace(start=start, end=end), name=name,
                               device_type=torch.autograd.DeviceType.CUDA)

    # us: step 0 = mark [0, 1), a [1, 100), gap 50, b [150, 200); step 1 = mark [500, 501) after a gap of 300, c [501, 600)
    events = [event(0, 1, "mark"), event(1, 100, "a"), event(150, 200, "b"), event(500, 501, "mark"),
              event(501, 600, "c")]
    steps = idle_per_marker(SimpleNamespace(events=lambda: events), "mark")
    assert steps == [(pytest.approx(0.35), pytest.approx(0.3), "b", "mark"), (0.0, 0.0, "", "")]
