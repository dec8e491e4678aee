"""`make_tiny_model`: a small random checkpoint with a real trained tokenizer, made locally.

The demo and the tests need a model but no hub is reachable, so we write one: transformers'
own model class (so HF is a faithful oracle) with tiny dimensions, and a byte-level BPE
tokenizer trained with the `tokenizers` library on the text below, with a ChatML template.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "qwen3_moe", "mixtral")

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = """\
A prefix tree stores strings so that strings sharing a beginning share a path from the root.
Language models read a prompt, then write one token at a time. Each new token attends to every
token before it, so the keys and values of earlier tokens are kept in a cache. When many requests
share a system prompt, a few examples, or a long document, that shared beginning needs to be read
and stored only once. The quick brown fox jumps over the lazy dog. The weather today is mild, with
a light wind from the west and a chance of rain in the evening. Once upon a time, in a quiet village
by the sea, there lived an old fisherman who told stories to anyone who would listen. He spoke of
storms and stars, of ships that sailed beyond the edge of the map, and of the patience it takes to
mend a net. You are a helpful assistant. Answer briefly and clearly. Question: what is the capital
of France? Answer: Paris. Question: how many days are in a week? Answer: seven. Question: why is the
sky blue? Answer: because air scatters blue light more than red light. Numbers: one, two, three,
four, five, six, seven, eight, nine, ten, 0 1 2 3 4 5 6 7 8 9. Paging splits memory into fixed-size
blocks so that a sequence can grow without moving what it already has. Continuous batching lets new
requests join a running batch at every step, and finished ones leave it at once.
"""

_DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6)
_MOE_DIMS = dict(num_experts_per_tok=2, output_router_logits=False, router_aux_loss_coef=0.0)
_INIT_STD = 0.15  # larger than HF's 0.02 so that greedy top-2 logits are rarely near-ties


def _hf_config(family: str, vocab_size: int, eos: int, head_dim: int, overrides: dict[str, Any]):
    from transformers import LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    common = dict(_DIMS, head_dim=head_dim, vocab_size=vocab_size, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                  initializer_range=_INIT_STD, torch_dtype="float32", **overrides)
    if family == "llama":
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256, "rope_theta": 500000.0}
        return LlamaConfig(**common, rope_theta=500000.0, rope_scaling=rope, tie_word_embeddings=False,
                           architectures=["LlamaForCausalLM"])
    if family == "mistral":  # as Mistral 7B v0.2 on: no sliding window
        return MistralConfig(**common, rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False,
                             architectures=["MistralForCausalLM"])
    if family == "qwen3_moe":  # 8 experts of width 32 (the dense MLP of mlp_only_layers stays 128 wide)
        return Qwen3MoeConfig(**{"num_experts": 8, "moe_intermediate_size": 32, "norm_topk_prob": True, **common},
                              **_MOE_DIMS, rope_theta=1000000.0, tie_word_embeddings=False, attention_bias=False,
                              use_sliding_window=False, architectures=["Qwen3MoeForCausalLM"])
    if family == "mixtral":
        return MixtralConfig(**{"num_local_experts": 4, **common}, **_MOE_DIMS, rope_theta=1000000.0,
                             sliding_window=None, tie_word_embeddings=False, architectures=["MixtralForCausalLM"])
    if family == "qwen2":
        return Qwen2Config(**common, rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False,
                           architectures=["Qwen2ForCausalLM"])
    return Qwen3Config(**common, rope_theta=1000000.0, tie_word_embeddings=True, attention_bias=False,
                       use_sliding_window=False, architectures=["Qwen3ForCausalLM"])


def train_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on CORPUS, with SPECIAL_TOKENS and the ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


@torch.no_grad()
def make_tiny_model(out_dir: str | Path, family: str = "llama", seed: int = 0, head_dim: int = 16,
                    **config: Any) -> Path:
    """Write config.json, model.safetensors and tokenizer files of a tiny `family` model;
    `config` overrides fields of its HF config (e.g. Qwen3-MoE's mlp_only_layers).

    GPU kernels need head_dim >= 64; the CPU tests use 16 to stay fast.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r}: choose one of {', '.join(FAMILIES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(vocab_size=1024)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = _hf_config(family, len(tokenizer), eos, head_dim, config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        # Norm scales and biases off their defaults, so that loading them wrongly shows.
        if name.endswith("norm.weight"):
            param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
        elif name.endswith(".bias"):
            param.copy_(0.1 * torch.randn(param.shape, generator=generator))
        else:
            param.copy_(_INIT_STD * torch.randn(param.shape, generator=generator))
    model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    meta = json.loads((out / "config.json").read_text())
    meta.setdefault("torch_dtype", "float32")
    (out / "config.json").write_text(json.dumps(meta, indent=2))
    return out
