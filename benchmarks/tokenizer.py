"""A tokenizer for a model shape without one: the tiny model's tokenizer padded to its vocabulary.

Structured outputs need a tokenizer whose vocabulary matches the model's logits (the grammar
masks every token id), and the bench's models are config.json files only. Both engines read
the same directory, laid out as Llama 3's: the tiny tokenizer's tokens, then `<|pad_i|>` text
tokens up to the lowest EOS id of the model's config, then special tokens to vocab_size
(`<|eos_i|>` at the EOS ids, the first one the tokenizer's eos_token; `<|special_i|>` between).
A generation_config.json names the first EOS id alone: vLLM stops on its generation config's
EOS ids, and its grammar (xgrammar) treats only the tokenizer's eos_token as a stop token, the
other special tokens as text; with one EOS both engines end an object on the token their
grammar allows there, and neither stops inside a string.
"""
from __future__ import annotations

import json
from pathlib import Path

from forkserve.model.tiny import train_tokenizer


def write_padded_tokenizer(model_dir: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and generation_config.json next to model_dir's config.json."""
    config = json.loads((model_dir / "config.json").read_text())
    vocab_size = config["vocab_size"]
    eos = config.get("eos_token_id")
    eos_ids = sorted(eos if isinstance(eos, list) else [] if eos is None else [eos])
    tokenizer = train_tokenizer(vocab_size=1024)
    tokenizer.save_pretrained(model_dir)
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    first_pad = len(vocab) + sum(1 for t in spec["added_tokens"] if t["content"] not in vocab)
    if vocab_size < first_pad or any(i < first_pad for i in eos_ids):
        raise ValueError(f"vocab_size {vocab_size} / eos ids {eos_ids} do not fit above the tiny tokenizer's "
                         f"{first_pad} tokens")
    first_special = eos_ids[0] if eos_ids else vocab_size
    for token_id in range(first_pad, first_special):
        vocab[f"<|pad_{token_id}|>"] = token_id
    for token_id in range(first_special, vocab_size):
        name = f"<|eos_{token_id}|>" if token_id in eos_ids else f"<|special_{token_id}|>"
        spec["added_tokens"].append({"id": token_id, "content": name, "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": True})
    (model_dir / "tokenizer.json").write_text(json.dumps(spec))
    settings = json.loads((model_dir / "tokenizer_config.json").read_text())
    if eos_ids:
        settings["eos_token"] = f"<|eos_{eos_ids[0]}|>"
        (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_ids[0]}))
    (model_dir / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
