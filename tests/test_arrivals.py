"""Requests arriving over time (the server's engine loop): longest cached prefix runs first."""
from __future__ import annotations

import asyncio

from forkserve import SamplingParams
from forkserve.config import EngineConfig
from forkserve.engine.engine import Engine
from forkserve.entrypoints.engine_loop import EngineLoop


def test_engine_loop_runs_the_longest_cached_match_first(tiny_model_factory) -> None:
    """Two arrivals wait behind a running request (max_num_seqs=1); the one whose prompt is
    cached runs before the earlier one that matches nothing, because the loop reorders the
    waiting queue after arrivals (first come, first served would run the cold one first)."""
    engine = Engine(EngineConfig.from_kwargs(str(tiny_model_factory("llama")), device="cpu", dtype="float32",
                                             block_size=4, max_num_seqs=1))
    cached = list(range(3, 67))
    engine.add_request("warm", engine.make_prompt({"prompt_token_ids": cached + [70]}, "warm"),
                       SamplingParams(max_tokens=1))
    while engine.has_unfinished_requests():
        engine.step()
    greedy = SamplingParams(temperature=0.0, max_tokens=2)
    busy = (engine.make_prompt({"prompt_token_ids": [200] * 10}, "busy"),
            SamplingParams(max_tokens=40, ignore_eos=True))
    cold = engine.make_prompt({"prompt_token_ids": [300] * 65}, "cold")
    hot = engine.make_prompt({"prompt_token_ids": cached + [71]}, "hot")
    loop = EngineLoop(engine)

    async def finals() -> list[tuple[str, int]]:
        loop.start(asyncio.get_running_loop())
        try:
            first = loop.submit([("busy", *busy)], stream=False)
            while loop.num_waiting:  # until busy runs: what comes next has to wait for it
                await asyncio.sleep(0.005)
            handle = loop.submit([("cold", cold, greedy), ("hot", hot, greedy)], stream=False)
            order = []  # one stream's events come in the order the engine finished them
            while not handle.done:
                order += [(e.request_id, e.output.num_cached_tokens) for e in await handle.wait(30)
                          if e.kind == "final"]
            assert first.done
            return order
        finally:
            loop.stop()

    order = asyncio.run(finals())
    assert loop.error is None
    assert [rid for rid, _ in order] == ["hot", "cold"], order
    assert dict(order)["hot"] == 64
