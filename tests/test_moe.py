"""Mixture-of-experts families (Qwen3-MoE, Mixtral) on CPU: greedy tokens equal HF transformers'
(fp32) with prefix reuse, chunked prefill and preemption; seeded sampling independent of the
batch; expert weights stacked as HF holds them; config and checkpoint errors that name the
problem. The Triton kernels' check (interpreted on CPU) is in test_moe_kernel.py."""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from cpu_llm import cpu_llm
from forkserve import LLM, SamplingParams
from forkserve.model.config import ModelConfig
from forkserve.model.moe import SparseMoE
from forkserve.model.tiny import make_tiny_model
from hf_oracle import assert_matches_hf, hf_model
from test_generate import prompts_with_shared_prefix

MAX_NEW = 16
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3_moe": ("qwen3_moe", {}),
    # layers 1 and 3 would be sparse (every 2nd); 3 is listed dense: only layer 1 is
    "qwen3_moe_sparse_step": ("qwen3_moe", dict(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3])),
    "mixtral": ("mixtral", {}),
}


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {name: str(make_tiny_model(tmp_path_factory.mktemp(name), family, **config))
            for name, (family, config) in MODELS.items()}


# Prefix reuse, chunked prefill and preemption at once (each alone: test_generate.SETTINGS)
ALL_ON = dict(enable_prefix_caching=True, max_num_batched_tokens=7, block_size=4, num_gpu_blocks_override=30,
              max_model_len=120, reserve_output_kv=False)


@pytest.mark.parametrize("model", list(MODELS))
def test_greedy_matches_hf(moe_models: dict[str, str], model: str) -> None:
    """HF's tokens, with prompts split into 7-token chunks, a pool that forces preemption, and a
    second pass that finds the first's prompts cached (and must give the same tokens)."""
    model_dir = moe_models[model]
    llm = LLM(model_dir, device="cpu", dtype="float32", **ALL_ON)
    prompts = prompts_with_shared_prefix(llm.engine.model_config.vocab_size)
    passes = [llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=MAX_NEW), use_tqdm=False) for _ in range(2)]
    for prompt, first, second in zip(prompts, *passes):
        assert_matches_hf(model_dir, prompt, first.outputs[0].token_ids, MAX_NEW)
        assert second.outputs[0].token_ids == first.outputs[0].token_ids
    assert sum(o.num_cached_tokens for o in passes[1]) > 0
    assert llm.engine.scheduler.num_preemptions > 0
    llm.engine.tree.check_invariants()


@pytest.mark.parametrize("model", list(MODELS))
def test_sparse_layers_and_stacked_experts_are_hfs(moe_models: dict[str, str], model: str) -> None:
    """The sparse layers are those HF makes sparse, and their router and stacked experts hold
    HF's weights (w13: gate rows, then up rows)."""
    model_dir = moe_models[model]
    ours = cpu_llm(model_dir, num_gpu_blocks_override=64, max_model_len=64).engine.worker.model
    theirs = hf_model(model_dir)
    sparse = [i for i, layer in enumerate(ours.layers) if isinstance(layer.mlp, SparseMoE)]
    assert sparse == [i for i, layer in enumerate(theirs.model.layers) if hasattr(layer.mlp, "experts")]
    assert sparse == ([1] if model == "qwen3_moe_sparse_step" else [0, 1, 2])
    for i in sparse:
        block = theirs.model.layers[i].mlp
        assert torch.equal(ours.layers[i].mlp.gate, block.gate.weight)
        assert torch.equal(ours.layers[i].mlp.w13, block.experts.gate_up_proj)
        assert torch.equal(ours.layers[i].mlp.w2, block.experts.down_proj)


def test_seeded_sampling_is_batch_independent(moe_models: dict[str, str]) -> None:
    """A seeded request draws the same tokens alone and amid others (whose tokens share its
    experts' matmuls), and again; another seed draws others."""
    llm = cpu_llm(moe_models["qwen3_moe"])
    vocab = llm.engine.model_config.vocab_size
    rng = random.Random(3)
    target = {"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(12)]}
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([target], params, use_tqdm=False)[0].outputs[0].token_ids
    others = [{"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(rng.randint(3, 40))]} for _ in range(4)]
    mixed = llm.generate(others[:2] + [target] + others[2:],
                         [SamplingParams(temperature=1.0, max_tokens=12)] * 2 + [params]
                         + [SamplingParams(temperature=0.7, seed=9, n=2, max_tokens=20)] * 2, use_tqdm=False)
    assert mixed[2].outputs[0].token_ids == alone
    assert llm.generate([target], params, use_tqdm=False)[0].outputs[0].token_ids == alone
    assert llm.generate([target], params.replace(seed=4321), use_tqdm=False)[0].outputs[0].token_ids != alone


_QWEN3_MOE_CONFIG = {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 32, "hidden_size": 16,
                     "intermediate_size": 32, "moe_intermediate_size": 8, "num_experts": 4, "num_experts_per_tok": 2,
                     "num_hidden_layers": 4, "num_attention_heads": 2}


def _config_with(**fields: Any) -> dict[str, Any]:
    """The small Qwen3-MoE config above with fields replaced (None deletes one)."""
    config = {**_QWEN3_MOE_CONFIG, **fields}
    return {k: v for k, v in config.items() if v is not None}


@pytest.mark.parametrize("fields, needle", [
    (dict(num_experts=None), "number of experts"),
    (dict(num_experts_per_tok=5), "num_experts_per_tok 5"),
    (dict(decoder_sparse_step=0), "decoder_sparse_step 0"),
], ids=["no_experts", "top_k", "sparse_step"])
def test_bad_moe_config_names_the_field(fields: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        ModelConfig.from_dict(_config_with(**fields))


def test_num_experts_under_either_name() -> None:
    """Hub checkpoints say num_experts; transformers 5 writes num_local_experts."""
    renamed = _config_with(num_experts=None, num_local_experts=4, mlp_only_layers=[0], decoder_sparse_step=1)
    parsed = ModelConfig.from_dict(renamed)
    assert parsed.num_experts == 4 and parsed.moe_layers == (1, 2, 3) and not parsed.norm_topk_prob


def test_missing_expert_tensor_is_named(moe_models: dict[str, str], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(moe_models["mixtral"], broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.2.block_sparse_moe.experts.3.w3.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensor.*layers.2.block_sparse_moe.experts.3.w3.weight"):
        cpu_llm(str(broken), max_model_len=64)
