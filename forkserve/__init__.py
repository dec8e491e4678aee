"""forkserve: LLM inference for workloads where many sequences share context."""
from forkserve.api import LLM
from forkserve.outputs import CompletionOutput, Logprob, RequestOutput
from forkserve.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
__version__ = "0.1.0"
