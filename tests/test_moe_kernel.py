"""The fused MoE Triton kernels (forkserve/kernels/moe.py), run by Triton's interpreter on CPU,
against the pure-torch reference (forkserve/model/moe.py) on random data: routing, the sort by
expert, and the whole block, including experts that receive no tokens and one that receives
every token. The same cases run compiled, in bf16, in tests/test_gpu.py."""
from __future__ import annotations

import inspect
import os
import sys
from typing import Callable

import pytest
import torch

from forkserve.model import moe
from forkserve.model.llama import MLP_CHUNK_TOKENS
from forkserve.model.moe import reference_moe, route
from moe_routing import routing_case

if torch.cuda.is_available():
    pytest.skip("on a GPU the compiled kernels are checked (tests/test_gpu.py)", allow_module_level=True)
# Triton decides whether to interpret a kernel, its own library's included, when it is decorated:
# before triton is first imported. Nothing else in a CPU run imports it.
assert "triton" not in sys.modules, "triton was imported before the interpreter could be switched on"
os.environ["TRITON_INTERPRET"] = "1"
interpreter = pytest.importorskip("triton.runtime.interpreter")
from forkserve.kernels import moe as kernels  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend  # noqa: E402

_patch_lang_tensor = interpreter._patch_lang_tensor


def _patch_index(tensor: type, scope: object) -> None:
    """Triton 3.6's interpreter takes a loop bound's int() of a one-element array, which numpy 2.4
    refuses: take its element instead."""
    _patch_lang_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))


interpreter._patch_lang_tensor = _patch_index


CASES = [  # (routing, tokens, experts, top_k, hidden, intermediate): 16-, 32- and 64-row tiles, E not a power of 2
    ("random", 5, 8, 2, 64, 32),
    ("random", 40, 6, 3, 48, 40),
    ("random", 150, 4, 2, 64, 32),
    ("few_experts_only", 23, 8, 2, 64, 32),
    ("one_expert_gets_all", 70, 8, 2, 64, 32),
]


@pytest.mark.parametrize("case, tokens, num_experts, top_k, hidden, intermediate", CASES,
                         ids=[f"{c[0]}-T{c[1]}-E{c[2]}" for c in CASES])
def test_fused_moe_matches_reference(case: str, tokens: int, num_experts: int, top_k: int,
                                     hidden: int, intermediate: int) -> None:
    generator = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=generator)
    w13 = torch.randn(num_experts, 2 * intermediate, hidden, generator=generator) / hidden ** 0.5
    w2 = torch.randn(num_experts, hidden, intermediate, generator=generator) / intermediate ** 0.5
    experts = routing_case(case, tokens, num_experts, top_k, generator).to(torch.int32)
    weights = torch.rand(tokens, top_k, generator=generator)
    expected = reference_moe(x, w13, w2, weights, experts)

    block_m = kernels._block_m(tokens * top_k / num_experts)
    sorted_ids, block_experts, num_padded = kernels.align(experts, num_experts, block_m)
    flat = experts.flatten().tolist()
    runs = sorted_ids[:num_padded.item()].tolist()
    assert [e for e in runs if e < len(flat)] == sorted(range(len(flat)), key=lambda e: flat[e])  # stable
    for block, start in enumerate(range(0, num_padded.item(), block_m)):
        owned = [e for e in runs[start:start + block_m] if e < len(flat)]
        assert owned and all(flat[e] == block_experts[block].item() for e in owned)

    out = torch.full_like(x, float("nan"))
    assert kernels.fused_moe(x, w13, w2, weights, experts, out) is out
    assert torch.allclose(out, expected, rtol=1e-4, atol=1e-5), (out - expected).abs().max()


@pytest.mark.parametrize("renormalise", [True, False])
def test_route_matches_reference(renormalise: bool) -> None:
    """Both routers choose by logit, ties to the lower expert id: bf16 logits on a coarse grid tie
    often (the one-hot rows make every expert but one tie), and the choices must be identical."""
    generator = torch.Generator().manual_seed(1)
    logits = (torch.randint(-3, 4, (40, 6), generator=generator) * 0.5).to(torch.bfloat16)
    logits[:3] = torch.eye(6)[:3].to(torch.bfloat16)
    weights, experts = kernels.route(logits, 3, renormalise)
    expected_weights, expected_experts = route(logits, 3, renormalise)
    assert expected_experts[0].tolist() == [0, 1, 2] and expected_experts[1].tolist() == [1, 0, 2]
    assert torch.equal(experts, expected_experts)
    assert torch.allclose(weights, expected_weights, rtol=1e-6)


@pytest.mark.parametrize("renormalise", [True, False])
def test_sparse_moe_block_through_the_kernels(monkeypatch: pytest.MonkeyPatch, renormalise: bool) -> None:
    """The model's block takes the kernels' path where they apply (on CUDA; here forced), into a
    given output as the chunked MLP passes one, and gives the reference path's result."""
    block = moe.SparseMoE(64, 32, 8, 2, renormalise, torch.float32, "cpu")
    generator = torch.Generator().manual_seed(2)
    for param in block.parameters():
        param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    x = torch.randn(37, 64, generator=generator)
    expected = block(x)
    calls = []
    monkeypatch.setattr(moe, "gpu_kernels", lambda name, tensor: calls.append(name) or kernels)
    out = torch.empty(40, 64)
    assert block(x, out=out[:37]).data_ptr() == out.data_ptr()
    assert calls == ["moe"] and torch.allclose(out[:37], expected, rtol=1e-4, atol=1e-5)


KERNELS = ("_route_kernel", "_count_kernel", "_scan_kernel", "_place_kernel", "_expert_gemm_kernel")


class _LaunchKeys:
    """Stands in for a kernel: records each launch's compile key by Triton's own rule (constexprs
    and launch options as given, and for every other argument its type and Triton's
    specialisation: ints equal to 1 or divisible by 16, unless do_not_specialize), runs nothing."""

    def __init__(self, name: str, kernel: object, keys: set) -> None:
        self.name, self.keys = name, keys
        self.params = list(inspect.signature(kernel.fn).parameters.values())
        unspecialised = getattr(kernel, "do_not_specialize", None) or kernel.kwargs.get("do_not_specialize") or ()
        self.unspecialised = set(unspecialised)

    def __getitem__(self, grid: tuple) -> Callable[..., None]:
        def launch(*args: object, **options: object) -> None:
            specialised = tuple(native_specialize_impl(BaseBackend, arg, False, param.name not in self.unspecialised,
                                                       param.name not in self.unspecialised)
                                for param, arg in zip(self.params, args))
            self.keys.add((self.name, tuple(sorted(options.items())), specialised))
        return launch


def test_warm_up_compiles_every_configuration_a_step_meets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The block's start-up compile launches every kernel configuration that any step's token
    count (1 to an MLP chunk's MLP_CHUNK_TOKENS) leads to: all tile rows, and no per-step size
    that Triton would specialise on (a new key is a JIT compile inside a timed step)."""
    warm, stepped = set(), set()
    block = moe.SparseMoE(32, 16, 8, 2, True, torch.float32, "cpu")
    monkeypatch.setattr(moe, "gpu_kernels", lambda name, tensor: kernels)
    for name in KERNELS:
        monkeypatch.setattr(kernels, name, _LaunchKeys(name, getattr(kernels, name), warm))
    block.compile_kernels()
    assert {dict(key[1])["BLOCK_M"] for key in warm if key[0] == "_expert_gemm_kernel"} == set(kernels.TILE_ROWS)
    for name in KERNELS:
        getattr(kernels, name).keys = stepped
    for tokens in list(range(1, 260)) + [1000, 4095, MLP_CHUNK_TOKENS]:
        block(torch.zeros(tokens, 32))
    assert stepped - warm == set()
