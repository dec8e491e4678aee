"""Fork/join tree search: the two worked examples of docs/tree_search.md, exactness, memory, errors."""
from __future__ import annotations

import collections
from pathlib import Path
from typing import Callable

import pytest

from cpu_llm import PAGE, cpu_llm
from forkserve import LLM, SamplingParams
from forkserve.search.tree import Node

QUESTIONS = ["Q: what is two plus two? A:", "Q: name a colour. A:", "Q: is the sky green? A:"]
PARAMS = SamplingParams(temperature=1.0, seed=100, max_tokens=8)
DOCS = Path(__file__).resolve().parents[1] / "docs" / "tree_search.md"


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory) -> str:
    return str(tiny_model_factory("qwen2"))


def self_consistency(llm: LLM, questions: list[str], k: int, params: SamplingParams) -> list[str]:
    """Sample k answers per question (all questions in one batch) and keep the most common one."""
    roots = [llm.start(q, params) for q in questions]
    samples = [root.fork(k, stop="\n") for root in roots]
    llm.advance()  # every question's k samples run together
    answers = []
    for root, nodes in zip(roots, samples):
        votes = collections.Counter(node.text.strip().split(" ")[0] for node in nodes)
        answers.append(votes.most_common(1)[0][0])
        for node in nodes + [root]:
            node.release()
    return answers


def step_beam_search(llm: LLM, prompts: list[str], params: SamplingParams, score: Callable[[Node], float],
                     k: int, keep: int, steps: int, stop: str) -> list[list[Node]]:
    """Per prompt, expand each kept node into k steps, score them, keep the best `keep`; all trees batched."""
    frontiers = [[llm.start(p, params)] for p in prompts]
    for _ in range(steps):
        children = [[c for node in frontier if not node.is_terminal for c in node.fork(k, stop=stop)]
                    for frontier in frontiers]
        llm.advance([c for group in children for c in group])
        for i, (frontier, group) in enumerate(zip(frontiers, children)):
            ranked = sorted(group + [n for n in frontier if n.is_terminal], key=score, reverse=True)
            kept = ranked[:keep]
            for node in frontier + ranked[keep:]:
                if node not in kept:  # expanded parents and the losers
                    node.release()
            frontiers[i] = kept
    return frontiers


def test_self_consistency_samples_equal_n_sampling(model_dir: str) -> None:
    llm = cpu_llm(model_dir)
    answers = self_consistency(llm, QUESTIONS, 5, PARAMS)
    assert len(answers) == len(QUESTIONS) and all(isinstance(a, str) for a in answers)
    steps_together = llm.engine.stats()["steps"]
    assert llm.engine.pages_in_use == 0
    # The samples are exactly those of n=5 requests with the same seed and stop.
    root = llm.start(QUESTIONS[0], PARAMS)
    nodes = root.fork(5, stop="\n")
    reference = llm.generate(QUESTIONS[0], PARAMS.replace(n=5, stop="\n"), use_tqdm=False)[0]
    assert [n.step_token_ids for n in nodes] == [c.token_ids for c in reference.outputs]
    assert all(n.token_ids == n.step_token_ids and n.depth == 1 for n in nodes)
    # All questions advanced in the same batches: about as many steps as one question alone.
    single = cpu_llm(model_dir)
    self_consistency(single, QUESTIONS[:1], 5, PARAMS)
    assert steps_together < 2 * single.engine.stats()["steps"]


def test_step_beam_search_with_a_scoring_callback(model_dir: str) -> None:
    llm = cpu_llm(model_dir)
    calls = []

    def score(node: Node) -> float:
        calls.append(node)
        return node.cumulative_logprob / max(1, len(node.token_ids))

    params = PARAMS.replace(max_tokens=5)
    frontiers = step_beam_search(llm, QUESTIONS[:2], params, score, k=3, keep=2, steps=3, stop=" ")
    assert calls and all(len(f) == 2 for f in frontiers)
    for frontier in frontiers:
        assert all(node.depth == 3 or node.is_terminal for node in frontier)
        for node in frontier:
            # Each step is what a request continuing its parent, with seed s + (its sample index), draws.
            parent = node.parent
            prompt = {"prompt_token_ids": parent.seq.token_ids}
            ref = llm.generate(prompt, params.replace(seed=params.seed + node.index, stop=" "), use_tqdm=False)[0]
            assert node.step_token_ids == ref.outputs[0].token_ids
            assert node.token_ids == parent.token_ids + node.step_token_ids
            assert node.cumulative_logprob == pytest.approx(parent.cumulative_logprob + node.seq.cumulative_logprob)
        held = llm.engine.pages_in_use
        for node in frontier:
            node.release()
        assert llm.engine.pages_in_use < held
    assert llm.engine.pages_in_use == 0
    llm.engine.tree.check_invariants()


def docs_example(title: str) -> str:
    """The first python block under a heading of docs/tree_search.md."""
    section = DOCS.read_text().split(f"### {title}", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_docs_worked_examples_run_as_written(model_dir: str) -> None:
    """The docs' two examples, run as written, give what this file's copies give (so they cannot drift)."""
    params = PARAMS.replace(max_tokens=4)
    first: dict = {}
    exec(docs_example("Worked example 1"), first)
    assert first["self_consistency"](cpu_llm(model_dir), QUESTIONS, 3, params) == \
        self_consistency(cpu_llm(model_dir), QUESTIONS, 3, params)
    llm = cpu_llm(model_dir)
    second: dict = {"llm": llm, "params": params}
    exec(docs_example("Worked example 2"), second)  # ends with the docs' own call, on llm
    assert [len(frontier) for frontier in second["best"]] == [2, 2]
    args = (QUESTIONS[:2], params, lambda n: n.cumulative_logprob, 3, 2, 2, " ")
    ours = step_beam_search(cpu_llm(model_dir), *args)
    theirs = second["step_beam_search"](cpu_llm(model_dir), *args)
    assert [[n.token_ids for n in f] for f in theirs] == [[n.token_ids for n in f] for f in ours]


def test_fork_with_its_own_params(model_dir: str) -> None:
    """params given to fork replace the root's for that fork and its descendants' default."""
    llm = cpu_llm(model_dir)
    root = llm.start(QUESTIONS[2], PARAMS)
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    [child] = root.fork(1, greedy)
    sampled = root.fork(2)
    [grandchild] = child.fork(1)
    llm.advance()
    assert child.step_token_ids == llm.generate(QUESTIONS[2], greedy, use_tqdm=False)[0].outputs[0].token_ids
    assert child.text == llm.get_tokenizer().decode(child.token_ids, skip_special_tokens=True)
    again = llm.generate({"prompt_token_ids": child.seq.token_ids}, greedy, use_tqdm=False)[0].outputs[0]
    assert grandchild.step_token_ids == again.token_ids
    reference = llm.generate(QUESTIONS[2], PARAMS.replace(n=2), use_tqdm=False)[0]
    assert [n.step_token_ids for n in sampled] == [c.token_ids for c in reference.outputs]
    with pytest.raises(ValueError, match="fork: sampling params must be SamplingParams"):
        root.fork(2, {"temperature": 0.0})


def test_release_frees_a_branch_at_once(model_dir: str) -> None:
    llm = cpu_llm(model_dir)
    root = llm.start(QUESTIONS[0], SamplingParams(temperature=1.0, seed=1, max_tokens=9, ignore_eos=True))
    children = root.fork(4)
    llm.advance(children)
    engine = llm.engine
    free, in_use = engine.tree.num_free_pages, engine.pages_in_use
    children[0].release()
    assert children[0].released
    freed = engine.tree.num_free_pages - free
    assert freed >= 9 // PAGE  # its own pages are back in the pool, not parked as cache
    assert engine.pages_in_use == in_use - freed
    grandchildren = children[1].fork(2)
    children[1].release()  # a released parent's children keep their pages
    assert all(len(g.step_token_ids) == 9 for g in grandchildren)
    with pytest.raises(ValueError, match="released"):
        children[1].fork(2)
    with pytest.raises(ValueError, match="k must be"):
        children[2].fork(0)
    check_tree(llm)


def test_a_terminal_node_cannot_be_forked(model_dir: str) -> None:
    """A node at max_model_len has nothing left to generate: forking it is an error, not a hang."""
    llm = cpu_llm(model_dir, max_model_len=24)
    root = llm.start(QUESTIONS[0], SamplingParams(temperature=1.0, seed=0, max_tokens=64, ignore_eos=True))
    [leaf] = root.fork(1)
    assert leaf.is_terminal and len(leaf.seq.token_ids) == 24
    with pytest.raises(ValueError, match="cannot be continued"):
        leaf.fork(2)
    leaf.release()
    assert llm.engine.pages_in_use == 0


def test_fork_width_is_capped(model_dir: str) -> None:
    llm = cpu_llm(model_dir, max_n=3)
    with pytest.raises(ValueError, match="k=4 exceeds max_n=3"):
        llm.start(QUESTIONS[0]).fork(4)


def test_tree_search_on_a_tiny_pool_matches_a_roomy_one(model_dir: str) -> None:
    def run(llm: LLM) -> list[list[int]]:
        root = llm.start(QUESTIONS[1], SamplingParams(temperature=1.0, seed=3, max_tokens=10, ignore_eos=True))
        level = root.fork(6)
        leaves = [c for node in level for c in node.fork(2)]
        llm.advance()
        return [leaf.token_ids for leaf in leaves]

    roomy = cpu_llm(model_dir)
    tiny = cpu_llm(model_dir, num_gpu_blocks_override=14,
               max_model_len=48)
    assert run(tiny) == run(roomy)
    # 18 held nodes of about 5 pages each cannot all keep their KV in 14 pages: some was recomputed.
    assert tiny.engine.stats()["prefill_tokens_computed"] > roomy.engine.stats()["prefill_tokens_computed"]
    check_tree(tiny)


def check_tree(llm: LLM) -> None:
    """The tree's invariants, ref counts exact, with held nodes still around."""
    scheduler = llm.engine.scheduler
    live = [s.kv for s in [*scheduler.running, *scheduler.waiting, *scheduler.held] if s.kv is not None]
    llm.engine.tree.check_invariants(live)
