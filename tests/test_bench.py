"""The bench's workloads: the same request lists as ../shared/bench/workloads.py builds, and
warm-up batches that share no prefix with them; and the profile tools' GPU-timeline arithmetic."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks.profile import device_spans, idle_between_kernels, idle_per_marker
from benchmarks.worker import warm_up_workloads
from benchmarks.workloads import build

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


def device_event(start: float, end: float, name: str, on_gpu: bool = True) -> SimpleNamespace:
    """What the profiler's events carry that the GPU timeline reads (times in microseconds)."""
    device = torch.autograd.DeviceType.CUDA if on_gpu else torch.autograd.DeviceType.CPU
    return SimpleNamespace(time_range=SimpleNamespace(start=start, end=end), name=name, device_type=device)


def test_idle_between_kernels_sums_gaps_by_the_kernels_around_them() -> None:
    # us: a [0, 100), b [90, 150) overlapping a, gap 50, a [200, 300), gap 100, copy [400, 410); a CPU event ignored
    events = [device_event(200, 300, "a"), device_event(0, 100, "a"), device_event(90, 150, "b"),
              device_event(400, 410, "copy"), device_event(150, 390, "host", on_gpu=False)]
    span, busy, gaps = idle_between_kernels(device_spans(SimpleNamespace(events=lambda: events)))
    assert span == pytest.approx(0.410) and busy == pytest.approx(0.260)
    assert gaps == [(pytest.approx(0.1), 1, "a", "copy"), (pytest.approx(0.05), 1, "b", "a")]


def test_idle_per_marker_splits_the_timeline_at_each_marker_kernel() -> None:
    # us: step 0 = mark [0, 1), a [1, 100), gap 50, b [150, 200); step 1 = mark [500, 501) after a gap of 300, c [501, 600)
    events = [device_event(0, 1, "mark"), device_event(1, 100, "a"), device_event(150, 200, "b"),
              device_event(500, 501, "mark"), device_event(501, 600, "c")]
    steps = idle_per_marker(device_spans(SimpleNamespace(events=lambda: events)), "mark")
    assert steps == [(pytest.approx(0.35), pytest.approx(0.3), "b", "mark"), (0.0, 0.0, "", "")]
