"""Whole-batch prefix planning: each shared prefix prefilled once, pinned while needed, never a deadlock.

End-to-end tests run a tiny fp32 model and compare every output with the same request run
alone. Scheduler-level tests drive the scheduler with a stand-in for the model (tokens are
made up, KV bookkeeping is real), so they can count pages and steps exactly.
"""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest

from forkserve import LLM, SamplingParams
from forkserve.engine.pages import PagePool
from forkserve.entrypoints.batch_runner import BatchRunner
from forkserve.engine.planner import BatchPlanner
from forkserve.engine.tree import common_prefix_len
from forkserve.engine.scheduler import Scheduler
from forkserve.engine.summary import batch_summary, step_breakdown
from forkserve.engine.sequence import Request, Sequence
from forkserve.engine.tree import PrefixTree

ENGINE = dict(device="cpu", dtype="float32", block_size=4, max_model_len=128)


def trie_size(prompts: list[list[int]]) -> int:
    """Distinct tokens of a set of prompts: the size of their token trie, counted node by node."""
    return len({tuple(p[:i]) for p in prompts for i in range(1, len(p) + 1)})


def grouped_batch(rng: random.Random, groups: int, per_group: int, prefix_len: int,
                  vocab: int = 500) -> tuple[list[list[int]], list[SamplingParams]]:
    """Groups sharing a long prefix, shuffled; mixed greedy and seeded sampling and output lengths."""
    prompts, params = [], []
    for _ in range(groups):
        prefix = [rng.randrange(3, vocab) for _ in range(prefix_len)]
        for m in range(per_group):
            prompts.append(prefix + [rng.randrange(3, vocab) for _ in range(rng.randint(5, 12))])
            params.append(SamplingParams(temperature=0.0 if m % 2 else 0.8, seed=m, max_tokens=rng.randint(2, 10),
                                         ignore_eos=True))
    order = list(range(len(prompts)))
    rng.shuffle(order)
    return [prompts[i] for i in order], [params[i] for i in order]


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory) -> str:
    return str(tiny_model_factory("llama"))


@pytest.fixture(scope="module")
def alone(model_dir: str):
    """`alone(prompt, params)`: the output tokens of that request run by itself (roomy pool)."""
    llm = LLM(model_dir, **ENGINE)

    def run(prompt: list[int], params: SamplingParams) -> list[int]:
        return llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0].token_ids

    return run


def run_batch(model_dir: str, prompts: list[list[int]], params: list[SamplingParams], **kwargs) -> tuple[LLM, list]:
    llm = LLM(model_dir, **ENGINE, **kwargs)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return llm, outputs


def assert_no_pins_left(tree: PrefixTree) -> None:
    assert all(node.pin_count == 0 for node in tree.iter_nodes())
    assert tree.num_free_pages + tree.num_evictable_pages == tree.pool.num_pages


# ----------------------------------------------------------------------------------- end to end
def test_shuffled_groups_prefill_each_prefix_once_in_a_small_pool(model_dir: str, alone) -> None:
    """The issue's bar: prefill computed <= 1.05 x unique prompt tokens, outputs as if run alone.

    6 groups of 5 share 64-token prefixes; one group's KV is about 36 pages, the pool has 40.
    (FIFO admission computed 1,687-1,950 prefill tokens here for 635 unique ones.)
    """
    prompts, params = grouped_batch(random.Random(0), groups=6, per_group=5, prefix_len=64)
    llm, outputs = run_batch(model_dir, prompts, params, num_gpu_blocks_override=40, max_num_batched_tokens=64)
    stats = llm.engine.stats()
    unique = trie_size(prompts)
    assert stats["unique_prompt_tokens"] == unique
    assert stats["prefill_tokens_computed"] <= 1.05 * unique, stats
    assert stats["peak_pages_in_use"] <= 40 < unique // 4  # the pool really cannot hold the batch
    for prompt, p, output in zip(prompts, params, outputs):
        assert output.outputs[0].token_ids == alone(prompt, p)
    # Every member but each group's first found the 64-token prefix in the tree.
    assert sorted(o.num_cached_tokens for o in outputs)[6:] == [64] * 24
    llm.engine.tree.check_invariants()
    assert_no_pins_left(llm.engine.tree)


@pytest.mark.parametrize("case", ["duplicates", "prefixes_of_others", "group_bigger_than_pool", "nested"])
def test_malformed_batches_finish_correctly(model_dir: str, alone, case: str) -> None:
    rng = random.Random(1)
    base = [rng.randrange(3, 500) for _ in range(80)]
    if case == "duplicates":  # identical prompts, with n > 1 as well
        prompts = [base[:70]] * 4 + [base[:9]] * 2
    elif case == "prefixes_of_others":  # each prompt a prefix of the next, and a 1-token prompt
        prompts = [base[:n] for n in (1, 3, 16, 17, 40, 64, 65, 66, 80)]
    elif case == "group_bigger_than_pool":  # one group needing ~3x the pool
        prompts = [base[:72] + [rng.randrange(3, 500) for _ in range(8)] for _ in range(12)]
    else:  # groups sharing an outer prefix, with a sub-group inside one of them
        prompts = [base[:64] + base[64 + k:66 + k] + [rng.randrange(3, 500) for _ in range(rng.randint(1, 40))]
                   for k in (0, 0, 0, 5, 5, 9)]
        prompts += [prompts[1][:100] + [7, 8], prompts[1][:100] + [9]]
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 12), ignore_eos=True) for _ in prompts]
    params[0] = params[0].replace(n=3, temperature=0.8, seed=5)
    llm, outputs = run_batch(model_dir, prompts, params, num_gpu_blocks_override=36, max_num_batched_tokens=48,
                             min_shared_prefix_len=8)
    for prompt, p, output in zip(prompts, params, outputs):
        for completion in output.outputs:
            assert completion.token_ids == alone(prompt, p.replace(n=1, seed=None if p.seed is None
                                                                   else p.seed + completion.index))
    stats = llm.engine.stats()
    unique = trie_size(prompts)
    assert stats["unique_prompt_tokens"] == unique
    # Each sequence recomputes at most one partial page plus its last token; nothing else repeats.
    num_seqs = sum(p.n for p in params)
    assert stats["prefill_tokens_computed"] <= unique + num_seqs * 4, stats
    llm.engine.tree.check_invariants()
    assert_no_pins_left(llm.engine.tree)


def test_run_batch_file_is_planned_as_one_batch(model_dir: str, tmp_path: Path) -> None:
    """run-batch hands the whole file to the planner: a system prompt shared by every line is
    prefilled once, not once per request admitted in the first step."""
    system = "You are a helpful assistant. Answer briefly and clearly, in one sentence. " * 4
    questions = ["what is a prefix tree?", "why is the sky blue?", "what does paging do?", "name a prime number"]
    lines = [json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "tiny", "max_completion_tokens": 4, "temperature": 0,
                                  "messages": [{"role": "system", "content": system},
                                               {"role": "user", "content": q}]}})
             for i, q in enumerate(questions)]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    engine = LLM(model_dir, **ENGINE).engine
    summary = BatchRunner(inp, out).run(engine, ["tiny"], use_tqdm=False)
    assert summary.succeeded == len(questions)
    stats = engine.stats()
    assert stats["unique_prompt_tokens"] < stats["prompt_tokens"] - 2 * 64  # the system prompt is long
    assert stats["prefill_tokens_computed"] <= stats["unique_prompt_tokens"] + len(questions) * 4


def test_batch_summary_counts_that_batch_and_is_logged(model_dir: str, caplog: pytest.LogCaptureFixture) -> None:
    """The end-of-batch summary (LLM's log line, the bench's stats) has the issue's fields, counted
    over that batch alone: an earlier batch on the same engine must not leak into it."""
    llm = LLM(model_dir, **ENGINE)
    llm.generate([{"prompt_token_ids": [4 + i] * 30} for i in range(3)], SamplingParams(max_tokens=2), use_tqdm=False)
    prompts, params = grouped_batch(random.Random(2), groups=2, per_group=3, prefix_len=64)
    before = llm.engine.stats()
    with caplog.at_level(logging.INFO, logger="forkserve.api"):
        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    summary = batch_summary(before, llm.engine.stats())
    total, unique = sum(map(len, prompts)), trie_size(prompts)
    computed = summary["prefill_tokens_computed"]
    assert summary["prompt_tokens"] == total and summary["unique_prompt_tokens"] == unique
    assert unique <= computed <= 1.05 * unique
    assert summary["prefix_reuse"] == round(1 - computed / total, 4) > 0.5
    assert 0 < summary["peak_pages_in_use"] <= summary["kv_pages"]
    assert (f"batch summary: {total} prompt tokens, {unique} unique, {computed} prefill tokens computed"
            in caplog.text)
    assert f"prefix reuse {summary['prefix_reuse']:.1%}, peak {summary['peak_pages_in_use']} of" in caplog.text


def test_batch_summary_peak_is_the_batchs_own(model_dir: str) -> None:
    """The bench runs a warm-up and several workloads on one engine: each must report its own peak."""
    llm = LLM(model_dir, **ENGINE)
    llm.generate([{"prompt_token_ids": [4 + i] * 40} for i in range(8)], SamplingParams(max_tokens=4), use_tqdm=False)
    before = llm.engine.stats()
    llm.generate({"prompt_token_ids": [50] * 6}, SamplingParams(max_tokens=2), use_tqdm=False)
    summary = batch_summary(before, llm.engine.stats(), llm.engine.pages_in_use_series())
    assert summary["peak_pages_in_use"] == max(llm.engine.pages_in_use_series()[before["steps"]:])
    assert summary["peak_pages_in_use"] < llm.engine.stats()["peak_pages_in_use"]


def test_step_breakdown_splits_time_and_names_the_slowest_prefill_step() -> None:
    """Each step lasts until the next starts (the last until the end): a stall in one prefill
    step shows as the slowest, apart from the decode steps."""
    series = [(0.0, 0, 100), (1.0, 2, 50), (5.0, 3, 0), (5.5, 3, 0), (6.25, 1, 0)]
    assert step_breakdown(series, end=6.5) == dict(
        decode_steps=3, decode_seconds=1.5, mean_decode_batch=round(7 / 3, 1), prefill_steps=2,
        prefill_seconds=5.0, slowest_prefill_step_seconds=4.0, slowest_prefill_step_index=1)


def test_add_requests_refuses_taken_ids_and_queues_nothing(model_dir: str) -> None:
    llm = LLM(model_dir, **ENGINE)
    engine = llm.engine
    prompt = engine.make_prompt({"prompt_token_ids": [5, 6, 7]}, "p")
    with pytest.raises(ValueError, match="'a' is already in use"):
        engine.add_requests([("a", prompt, SamplingParams()), ("a", prompt, SamplingParams())])
    assert not engine.has_unfinished_requests() and not engine.scheduler.has_work()


# ----------------------------------------------------------------------------------- scheduler level
def make_seqs(prompts: list[list[int]], max_tokens: list[int]) -> list[Sequence]:
    seqs = []
    for i, (prompt, m) in enumerate(zip(prompts, max_tokens)):
        request = Request(str(i), None, list(prompt), SamplingParams(max_tokens=m))
        seq = Sequence(i, request, 0, list(prompt), len(prompt), None)
        request.seqs.append(seq)
        seqs.append(seq)
    return seqs


def make_scheduler(num_pages: int, max_num_seqs: int = 64, budget: int = 256, **kwargs) -> Scheduler:
    tree = PrefixTree(PagePool(num_pages, 4))
    return Scheduler(tree, max_num_seqs, budget, num_pages * 4, **kwargs)


def step(scheduler: Scheduler) -> list[Sequence]:
    """One step as the engine runs it, with made-up sampled tokens; returns the step's sequences."""
    tree = scheduler.tree
    batch = scheduler.schedule()
    assert batch, "no progress"
    sampled = [item.seq for item in batch if item.samples]
    for item in batch:
        seq = item.seq
        seq.num_computed_tokens += item.num_new_tokens
        if seq.num_computed_tokens <= seq.num_prompt_tokens:
            tree.publish(seq.kv, seq.token_ids[:seq.num_computed_tokens])
    scheduler.after_step(batch)
    for seq in sampled:
        seq.token_ids.append(1000 + len(seq.token_ids))
        if seq.num_output_tokens >= seq.request.params.max_tokens:
            scheduler.finish(seq)
    tree.check_invariants([s.kv for s in scheduler.running])
    return [item.seq for item in batch]


def drive(scheduler: Scheduler, max_steps: int = 1000) -> None:
    for _ in range(max_steps):
        if not scheduler.has_work():
            return
        step(scheduler)
    raise AssertionError(f"not done after {max_steps} steps")


def pinned_pages(tree: PrefixTree) -> int:
    return sum(len(node.pages) for node in tree.iter_nodes() if node.pin_count)


def test_common_prefix_len_matches_a_token_by_token_count() -> None:
    rng = random.Random(5)
    for _ in range(500):
        a = [rng.randrange(3) for _ in range(rng.randrange(0, 80))]
        b = a[:rng.randrange(0, len(a) + 1)] + [rng.randrange(3) for _ in range(rng.randrange(0, 40))]
        expected = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        assert common_prefix_len(a, b, rng.choice([1, 4, 16])) == expected
        assert common_prefix_len(b, a, 16) == expected


def test_members_wait_for_the_leader_then_share_its_pages() -> None:
    prefix = list(range(1, 33))
    seqs = make_seqs([prefix + [100 + i, 200 + i] for i in range(4)] + [[7] * 10], [3, 3, 3, 3, 3])
    scheduler = make_scheduler(64, min_shared_prefix_len=8)
    scheduler.add_batch(seqs)
    first = step(scheduler)
    # One member of the group computes the prefix; the unrelated prompt is not held back.
    assert first == [seqs[0], seqs[4]]
    assert pinned_pages(scheduler.tree) == 8 and scheduler.planner.num_parked == 0
    assert list(scheduler.waiting) == seqs[1:4]  # woken in plan order, at the front
    second = step(scheduler)
    assert second == [seqs[0], seqs[4]] + seqs[1:4]
    assert all(s.kv.num_cached_tokens == 32 for s in seqs[1:4])
    # Every member is past prefill: the pin goes now, while they still decode, not at their end.
    assert pinned_pages(scheduler.tree) == 0 and all(not s.is_finished for s in seqs[:4])
    drive(scheduler)
    assert_no_pins_left(scheduler.tree)


def test_parked_members_hold_seats_so_whole_groups_run_together() -> None:
    """4 groups of 4 with seats for 8: only 2 groups start (leaders, then their members), not
    every group's leader; the other 2 start once seats free up."""
    groups = [[10 * g + 1] * 16 for g in range(4)]
    seqs = make_seqs([groups[g] + [100 + 4 * g + i] for g in range(4) for i in range(4)], [2] * 16)
    scheduler = make_scheduler(256, max_num_seqs=8, budget=1024, min_shared_prefix_len=8)
    scheduler.add_batch(seqs)
    started: list[set[int]] = []
    while scheduler.has_work():
        step(scheduler)
        started.append({s.token_ids[0] for s in scheduler.running})
    assert started[0] == {1, 11} and max(len(running) for running in started[:2]) == 2
    assert set().union(*started) == {1, 11, 21, 31}


def test_prefixes_shorter_than_the_threshold_are_not_shared_groups() -> None:
    """A short shared prefix saves too little to make its members wait for a leader: they are
    admitted together, while the members of a prefix at the threshold wait for theirs."""
    short, long = [1] * 12, [2] * 16
    seqs = make_seqs([short + [3, 4], short + [5], long + [6], long + [7, 8]], [1, 1, 1, 1])
    scheduler = make_scheduler(64, min_shared_prefix_len=16)
    scheduler.add_batch(seqs)
    assert [item.seq for item in scheduler.schedule()] == seqs[:3]
    assert scheduler.planner.num_parked == 1


def test_plan_is_depth_first_and_largest_decode_ratio_first() -> None:
    a, b = [1] * 64, [2] * 64
    prompts = [a + [9], [5] * 40, b + [3, 3], a + [4, 4, 4, 4], b + [8], a + [6]]
    max_tokens = [1, 1, 50, 40, 2, 30]
    seqs = make_seqs(prompts, max_tokens)
    order = BatchPlanner(PrefixTree(PagePool(64, 4)), 512, min_shared_len=16).plan(seqs)
    # Top level keeps the batch's order (group a first seen at 0, the loner at 1, group b at 2);
    # inside a group, largest max_tokens per uncached prompt token first.
    assert [s.seq_id for s in order] == [5, 3, 0, 1, 2, 4]


def test_idle_pinned_prefix_gives_way_instead_of_deadlocking() -> None:
    """Group 2's prefix is pinned (its leader ran beside group 1 and finished) while only group 1
    runs and needs more pages than are left.

    Without giving the idle pin up, group 1's sequences could not grow or be admitted, and the
    scheduler would make no progress (the pool holds 20 pages; the pin holds 12).
    """
    p1, p2 = [1] * 24, [2] * 48
    prompts = [p1 + [3] * 4, p1 + [4] * 4, p1 + [5] * 4, p2 + [6] * 4, p2 + [7] * 4]
    seqs = make_seqs(prompts, [1, 40, 40, 1, 1])
    scheduler = make_scheduler(20, max_num_seqs=4, reserve_output_kv=False, min_shared_prefix_len=8)
    scheduler.add_batch(seqs)
    drive(scheduler)
    assert scheduler.planner.pins_dropped >= 1
    assert all(s.num_output_tokens == s.request.params.max_tokens for s in seqs)
    assert_no_pins_left(scheduler.tree)


def test_pinned_prefix_outlasts_lru_while_its_members_wait() -> None:
    """Group B's prefix sits idle (pinned, no live sequence on it) while A's decodes grow past the
    pool: A preempts its own newest member rather than let LRU evict B's prefix, so B's members
    still find all of it cached."""
    a, b = [1] * 16, [2] * 32
    prompts = [a + [3] * 4, a + [4] * 4, a + [5] * 4, b + [6] * 4, b + [7] * 4, b + [8] * 4]
    seqs = make_seqs(prompts, [30, 30, 1, 1, 1, 1])
    scheduler = make_scheduler(20, max_num_seqs=2, reserve_output_kv=False, min_shared_prefix_len=8)
    scheduler.add_batch(seqs)
    idle_pin_at_preemption = False
    while scheduler.has_work():
        preemptions = scheduler.num_preemptions
        step(scheduler)
        if scheduler.num_preemptions > preemptions:
            idle_pin_at_preemption |= any(p.node.ref_count == 0 for p in scheduler.planner._pinned)
    assert idle_pin_at_preemption and scheduler.planner.pins_dropped == 0
    assert [s.request.num_cached_tokens for s in seqs[4:]] == [32, 32]
    assert_no_pins_left(scheduler.tree)


def test_reserving_output_kv_avoids_preemption() -> None:
    """Memory-centric admission: the same batch preempts when admitted optimistically, not when reserved."""
    prompts = [[i + 1] * 10 for i in range(6)]
    preemptions = {}
    for reserve in (False, True):
        scheduler = make_scheduler(24, reserve_output_kv=reserve)
        seqs = make_seqs(prompts, [20] * 6)
        scheduler.add_batch(seqs)
        drive(scheduler)
        assert all(s.num_output_tokens == 20 for s in seqs)
        preemptions[reserve] = scheduler.num_preemptions
    assert preemptions[False] > 0 and preemptions[True] == 0


def test_aborting_parked_members_and_the_leader() -> None:
    prefix = list(range(1, 33))
    seqs = make_seqs([prefix + [100 + i] for i in range(4)], [2, 2, 2, 2])
    scheduler = make_scheduler(64, min_shared_prefix_len=8)
    scheduler.add_batch(seqs)
    assert [item.seq for item in scheduler.schedule()] == [seqs[0]]  # aborts come before this step runs
    assert scheduler.planner.num_parked == 3
    scheduler.abort(seqs[1])
    assert scheduler.planner.num_parked == 2
    scheduler.abort(seqs[0])  # the leader: the parked members come back, one of them leads now
    assert scheduler.planner.num_parked == 0 and list(scheduler.waiting) == seqs[2:]
    drive(scheduler)
    assert [s.num_output_tokens for s in seqs] == [0, 0, 2, 2]
    assert_no_pins_left(scheduler.tree)


def test_cache_order_longest_match_first_with_ageing() -> None:
    scheduler = make_scheduler(64)
    cached = list(range(1, 33))
    scheduler.add_batch(make_seqs([cached + [50]], [1]))
    drive(scheduler)
    old = make_seqs([[9] * 20], [1])[0]
    scheduler.add(old)
    scheduler.num_steps += scheduler.planner.max_wait_steps - 1
    newer = make_seqs([cached[:16] + [60], cached + [70], [8] * 20], [1, 1, 1])
    for seq in newer:
        scheduler.add(seq)
    newer[2].num_preemptions = 1  # it was running once: it goes ahead of any cache match
    scheduler.prioritize_cached()
    assert list(scheduler.waiting) == [newer[2], newer[1], newer[0], old]
    scheduler.num_steps += 1  # now the unmatched one has waited long enough to go first (oldest first)
    scheduler.prioritize_cached()
    assert list(scheduler.waiting) == [old, newer[2], newer[1], newer[0]]
