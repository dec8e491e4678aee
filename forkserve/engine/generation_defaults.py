"""Sampling defaults from a checkpoint's generation_config.json, as vLLM's generation_config="auto" reads them."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# generation_config.json key -> SamplingParams field (the keys vLLM takes over)
_KEYS = {"repetition_penalty": "repetition_penalty", "temperature": "temperature", "top_k": "top_k",
         "top_p": "top_p", "min_p": "min_p", "max_new_tokens": "max_tokens"}


def generation_defaults(model_dir: str, setting: str) -> dict[str, Any]:
    """The SamplingParams fields the generation config sets: none for "vllm" (vLLM's own defaults),
    the model directory's file for "auto", or the file in the directory `setting` names."""
    if setting == "vllm":
        return {}
    directory = Path(model_dir if setting == "auto" else setting)
    path = directory / "generation_config.json"
    if not path.is_file():
        if setting != "auto":
            raise ValueError(f"generation_config={setting!r}: no generation_config.json there; give 'auto', "
                             "'vllm' or a directory holding one")
        return {}
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err
    overrides = {field: values[key] for key, field in _KEYS.items() if values.get(key) is not None}
    if overrides:
        logger.info("default sampling parameters from %s: %s (generation_config='vllm' ignores them)", path,
                    overrides)
    return overrides
