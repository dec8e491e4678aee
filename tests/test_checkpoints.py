"""Checkpoints beyond the three tiny families of test_generate: Mistral, sharded safetensors with
their index file, every rope scaling kind, fp16 and bf16, a sliding window, and the errors that
name what is wrong with a checkpoint directory. HF transformers is the oracle for every token."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from cpu_llm import cpu_llm
from forkserve import SamplingParams
from forkserve.model import llama
from forkserve.model.config import ModelConfig
from hf_oracle import assert_matches_hf, hf_greedy, hf_model, tie_eps

MAX_NEW = 16


def variant(source: Path, target: Path, **config: Any) -> str:
    """A copy of a checkpoint directory with some config.json fields replaced (None deletes one)."""
    shutil.copytree(source, target)
    path = target / "config.json"
    values = json.loads(path.read_text())
    values.update(config)
    path.write_text(json.dumps({k: v for k, v in values.items() if v is not None}, indent=2))
    return str(target)


def prompts(vocab: int, lengths: tuple[int, ...] = (3, 21, 58)) -> list[list[int]]:
    rng = random.Random(5)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def check_greedy(model_dir: str, dtype: torch.dtype = torch.float32, **engine: Any) -> list[list[int]]:
    """Our greedy tokens for mixed-length prompts, each asserted equal to HF's; returns ours."""
    llm = cpu_llm(model_dir, dtype=str(dtype).removeprefix("torch."), **engine)
    batch = prompts(llm.engine.model_config.vocab_size)
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], SamplingParams(temperature=0.0, max_tokens=MAX_NEW),
                        use_tqdm=False)
    for prompt, out in zip(batch, outs):
        assert_matches_hf(model_dir, prompt, out.outputs[0].token_ids, MAX_NEW, dtype)
    return [out.outputs[0].token_ids for out in outs]


@pytest.fixture(scope="module")
def llama_dir(tiny_model_factory) -> Path:
    return Path(tiny_model_factory("llama"))


@pytest.fixture(scope="module")
def sharded_mistral(tiny_model_factory, tmp_path_factory) -> str:
    """The tiny Mistral written by HF in several shards plus model.safetensors.index.json."""
    source = Path(tiny_model_factory("mistral"))
    target = tmp_path_factory.mktemp("mistral-sharded")
    hf_model(str(source)).save_pretrained(target, max_shard_size="100KB")
    for path in source.iterdir():
        if path.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(path, target / path.name)
    return str(target)


# ------------------------------------------------------------------------------ checkpoints
def test_sharded_mistral_matches_hf(sharded_mistral: str) -> None:
    shards = sorted(p.name for p in Path(sharded_mistral).glob("*.safetensors"))
    index = json.loads((Path(sharded_mistral) / "model.safetensors.index.json").read_text())
    assert len(shards) >= 3 and sorted(set(index["weight_map"].values())) == shards
    assert ModelConfig.from_dir(sharded_mistral).architecture == "MistralForCausalLM"
    check_greedy(sharded_mistral)


def test_mlp_in_chunks_matches_hf(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps longer than MLP_CHUNK_TOKENS run their MLP a chunk at a time (bounded activation
    memory): with chunks of 5 tokens every prompt's prefill is chunked, and the tokens are HF's."""
    monkeypatch.setattr(llama, "MLP_CHUNK_TOKENS", 5)
    calls, mm = [], torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: calls.append(1) or mm(*a, **k))
    check_greedy(str(llama_dir))
    assert calls, "no step ran its MLP in chunks"


def test_sliding_window_bounds_the_context(tiny_model_factory, tmp_path: Path) -> None:
    """Attention here is never windowed, so a model is served only up to its window, where HF's
    windowed attention sees every token too; beyond it the engine refuses, naming the limit."""
    window = 40
    model_dir = variant(Path(tiny_model_factory("mistral")), tmp_path / "windowed", sliding_window=window)
    assert ModelConfig.from_dir(model_dir).max_position_embeddings == window
    with pytest.raises(ValueError, match=f"max_position_embeddings {window}"):
        cpu_llm(model_dir, max_model_len=2 * window)
    llm = cpu_llm(model_dir)
    assert llm.engine.max_model_len == window
    prompt = prompts(llm.engine.model_config.vocab_size, (window - MAX_NEW,))[0]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=MAX_NEW),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == MAX_NEW and out.finish_reason == "length"
    assert_matches_hf(model_dir, prompt, out.token_ids, MAX_NEW)


ROPES = {  # rope_parameters as HF transformers 5 writes them (rope_theta inside)
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256},
    "yarn_attention_factor": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512,
                              "attention_factor": 0.8, "beta_fast": 16, "beta_slow": 2},
}


@pytest.mark.parametrize("kind", list(ROPES))
def test_rope_scaling_matches_hf(llama_dir: Path, tmp_path: Path, kind: str) -> None:
    rope = dict(ROPES[kind], rope_theta=500000.0)
    model_dir = variant(llama_dir, tmp_path / kind, rope_parameters=rope)
    ours = check_greedy(model_dir)
    # The scaling matters: HF's tokens move with it, except for dynamic (which rescales only past
    # max_position_embeddings, so it must equal unscaled rope here).
    unscaled = variant(llama_dir, tmp_path / "unscaled", rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    plain = [hf_greedy(unscaled, p, MAX_NEW).tokens for p in prompts(ModelConfig.from_dir(unscaled).vocab_size)]
    assert (ours == plain) == (kind == "dynamic")


def test_legacy_rope_scaling_key() -> None:
    """Checkpoints written by transformers 4 say rope_scaling and 'type'."""
    config = json.loads(json.dumps(_LLAMA_CONFIG))
    config["rope_scaling"] = {"type": "linear", "factor": 2.0}
    parsed = ModelConfig.from_dict(config)
    assert parsed.rope_scaling == {"type": "linear", "factor": 2.0, "rope_type": "linear"}
    assert parsed.rope_theta == 10000.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_matches_hf_in_the_same_dtype(llama_dir: Path, dtype: torch.dtype) -> None:
    """Greedy tokens as HF's up to the first half-precision tie, and every reported log-prob
    within the tie margin of HF's (teacher-forced on our tokens), so a test that stops early
    still checks all of them."""
    model_dir = str(llama_dir)
    llm = cpu_llm(model_dir, dtype=str(dtype).removeprefix("torch."))
    assert llm.engine.worker.kv_cache.k.dtype == dtype
    assert all(p.dtype == dtype for p in llm.engine.worker.model.parameters())
    batch = prompts(llm.engine.model_config.vocab_size)
    outs = llm.generate([{"prompt_token_ids": p} for p in batch],
                        SamplingParams(temperature=0.0, max_tokens=MAX_NEW, logprobs=5), use_tqdm=False)
    for prompt, out in zip(batch, outs):
        tokens = out.outputs[0].token_ids
        assert_matches_hf(model_dir, prompt, tokens, MAX_NEW, dtype)
        with torch.inference_mode():
            logits = hf_model(model_dir, dtype)(torch.tensor([prompt + tokens])).logits[0].float()
        reference = torch.log_softmax(logits, dim=-1)[len(prompt) - 1:]
        for step, entry in enumerate(out.outputs[0].logprobs):
            for token, logprob in entry.items():
                assert abs(logprob.logprob - reference[step, token].item()) < tie_eps(dtype), (step, token)


# ---------------------------------------------------------------------------------- errors
_LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 16,
                 "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}


def _drop_tensor(directory: Path, name: str) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(path)
    del tensors[name]
    save_file(tensors, path)


def _reshape_tensor(directory: Path, name: str) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(path)
    tensors[name] = tensors[name][:-1]
    save_file(tensors, path)


def _index_with_missing_shard(directory: Path) -> None:
    names = load_file(directory / "model.safetensors").keys()
    (directory / "model.safetensors").rename(directory / "model-00001-of-00002.safetensors")
    weight_map = {n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(names)}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _no_tokenizer(directory: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (directory / name).unlink(missing_ok=True)


def _only_pickles(directory: Path) -> None:
    (directory / "model.safetensors").rename(directory / "pytorch_model.bin")


def _set(**fields: Any) -> Callable[[Path], None]:
    def change(directory: Path) -> None:
        path = directory / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return change


@pytest.mark.parametrize("breakage, error, needle", [
    (lambda d: (d / "config.json").unlink(), FileNotFoundError, "no config.json"),
    (_set(architectures=["GPT2LMHeadModel"]), ValueError, "GPT2LMHeadModel"),
    (_set(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), ValueError, "'longrope'"),
    (_set(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), ValueError,
     "original_max_position_embeddings"),
    (lambda d: (d / "model.safetensors").unlink(), FileNotFoundError, r"no \*.safetensors"),
    (_only_pickles, ValueError, "pytorch_model.bin"),
    (_index_with_missing_shard, FileNotFoundError, "model-00002-of-00002.safetensors"),
    (lambda d: _drop_tensor(d, "lm_head.weight"), ValueError, "missing tensor.*lm_head.weight"),
    (lambda d: _reshape_tensor(d, "model.layers.1.mlp.up_proj.weight"), ValueError,
     r"model.layers.1.mlp.up_proj.weight .* has shape \(127, 64\)"),
    (_no_tokenizer, ValueError, "cannot load a tokenizer from .*broken"),
], ids=["no_config", "architecture", "rope_type", "rope_key", "no_weights", "pickles", "missing_shard",
        "missing_tensor", "wrong_shape", "no_tokenizer"])
def test_bad_checkpoint_errors_name_the_problem(llama_dir: Path, tmp_path: Path, breakage, error, needle) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(llama_dir, broken)
    breakage(broken)
    with pytest.raises(error, match=needle):
        cpu_llm(str(broken), max_model_len=64)
