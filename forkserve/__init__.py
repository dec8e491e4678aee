"""forkserve: LLM inference for workloads where many sequences share context."""
from forkserve.api import LLM
from forkserve.outputs import BeamSearchOutput, BeamSearchSequence, CompletionOutput, Logprob, RequestOutput
from forkserve.sampling_params import BeamSearchParams, SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "SamplingParams", "BeamSearchParams", "StructuredOutputsParams", "RequestOutput",
           "CompletionOutput", "Logprob", "BeamSearchOutput", "BeamSearchSequence"]
__version__ = "0.1.0"
