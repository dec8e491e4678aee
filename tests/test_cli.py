"""The command line of the core engine: `forkserve make-tiny-model` (each family, --seed) and
`forkserve generate` (--prompt / --input), run through `forkserve.cli.main` as the console script
and `python -m forkserve` run it."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

from forkserve import LLM, SamplingParams
from forkserve.cli import main
from forkserve.model.tiny import FAMILIES

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "mistral": "MistralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM"}


def test_make_tiny_model_family_and_seed(tiny_model_factory, tmp_path: Path, capsys) -> None:
    first, again = tmp_path / "a", tmp_path / "b"
    assert main(["make-tiny-model", str(first), "--family", "qwen3", "--seed", "3"]) == 0
    assert "qwen3" in capsys.readouterr().out
    assert main(["make-tiny-model", str(again), "--family", "qwen3", "--seed", "3"]) == 0
    assert json.loads((first / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    weights, same = load_file(first / "model.safetensors"), load_file(again / "model.safetensors")
    other = load_file(Path(tiny_model_factory("qwen3", seed=0)) / "model.safetensors")
    assert all((weights[name] == same[name]).all() for name in weights)  # a seed makes one model
    assert any((weights[name] != other[name]).any() for name in weights)  # another seed, another one
    assert "q_norm" in " ".join(weights)  # the family's own layers
    # A real tokenizer and a chat template, so text prompts and chat run with no model hub.
    llm = LLM(str(first), device="cpu", dtype="float32", num_gpu_blocks_override=2048, block_size=4)
    out = llm.chat([{"role": "user", "content": "Why is the sky blue?"}], SamplingParams(max_tokens=2), use_tqdm=False)
    assert llm.get_tokenizer().decode(out[0].prompt_token_ids).startswith("<|im_start|>user\nWhy is the sky blue?")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_is_its_architecture(tiny_model_factory, family: str) -> None:
    config = json.loads((Path(tiny_model_factory(family)) / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURES[family]]


def test_unknown_family_is_refused(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["make-tiny-model", str(tmp_path / "x"), "--family", "gpt2"])
    assert "gpt2" in capsys.readouterr().err


def test_generate_prints_each_completion(tiny_model_factory, tmp_path: Path, capsys) -> None:
    model_dir = str(tiny_model_factory("llama"))
    prompts = ["You are a helpful assistant. Answer briefly and clearly. Question: what is paging?",
               "You are a helpful assistant. Answer briefly and clearly. Question: what is a tree?",
               "The weather today is"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    flags = ["--model", model_dir, "--device", "cpu", "--block-size", "4", "--num-gpu-blocks-override", "2048",
             "--max-tokens", "5"]
    assert main(["generate", *flags, "--input", str(tmp_path / "prompts.txt")]) == 0
    out = capsys.readouterr().out
    llm = LLM(model_dir, device="cpu", dtype="float32", block_size=4, num_gpu_blocks_override=2048)
    expected = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=5), use_tqdm=False)
    for prompt, output in zip(prompts, expected):
        shown = re.escape(f"--- {prompt!r} (cached prompt tokens: ") + r"\d+, finish: length\)\n"
        assert re.search(shown + re.escape(output.outputs[0].text) + "\n", out), prompt
    summary = re.search(r"3 requests, (\d+) prompt tokens \((\d+) from the prefix cache\), 15 generated tokens", out)
    assert summary and int(summary[1]) == sum(len(o.prompt_token_ids) for o in expected)

    assert main(["generate", *flags, "--prompt", "Once upon a time", "--prompt", "Numbers: one"]) == 0
    assert capsys.readouterr().out.count("--- ") == 2


def test_generate_errors_name_the_problem(tmp_path: Path, capsys) -> None:
    assert main(["generate", "--model", str(tmp_path / "nowhere"), "--device", "cpu", "--prompt", "hi"]) == 2
    assert "no config.json" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("\n")
    assert main(["generate", "--model", str(tmp_path), "--input", str(tmp_path / "empty.txt")]) == 2
    assert "no prompts" in capsys.readouterr().err
