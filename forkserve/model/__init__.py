"""The decoder every family shares (dense and mixture-of-experts), its config, checkpoint loading,
and local tiny checkpoints."""
from forkserve.model.config import ModelConfig
from forkserve.model.llama import LlamaForCausalLM
from forkserve.model.loader import load_model
from forkserve.model.tiny import make_tiny_model

__all__ = ["ModelConfig", "LlamaForCausalLM", "load_model", "make_tiny_model"]
