"""The Triton gather-matmul kernels (core/runtime/lora_triton.py) against float64 math and the torch gather path.

On a machine without CUDA the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``,
set by tests/conftest.py before triton is imported), on CPU tensors: the same kernel code, checked for correctness (not speed). With
a GPU they are compiled and run on it, and the CUDA-graph test runs too. Triton is a test
dependency (constraints.txt, installed by `make install`): without it this module fails to import.
"""

from __future__ import annotations

import pytest

import torch
import triton  # noqa: F401 - a test dependency: fail here, not skip, when it is missing

import adapterkit
from adapterkit.core.runtime import lora_triton as K
from adapterkit.core.runtime.pool import AdapterPool
from adapterkit.testing import perturb
from models import BUILDERS, sample_inputs

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
#: one unit in the last place of the output dtype, relative (the kernels round y + delta once)
EPS = {torch.float32: 2.0 ** -20, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


@pytest.fixture(autouse=True)
def triton_mode():
    """Without a GPU the kernels are interpreted on the CPU (tests/conftest.py turns the interpreter on)."""
    if not CUDA:
        assert K.interpreting(), "TRITON_INTERPRET=1 must be set before triton is imported (tests/conftest.py)"


def slots(n_slots: int, r: int, n_in: int, n_out: int, dtype: torch.dtype, seed: int = 0):
    """Stacked A / B slots as the pool lays them out: slot 0 zeros, one adapter of a smaller rank (zero tail)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n_slots, r, n_in, generator=g) / n_in ** 0.5
    b = torch.randn(n_slots, n_out, r, generator=g)
    a[0], b[0] = 0, 0
    a[2, r // 2:], b[2, :, r // 2:] = 0, 0
    return a.to(dtype).to(DEVICE), b.to(dtype).to(DEVICE)


def reference(x, a, b, index, y) -> torch.Tensor:
    """``y + B[s] A[s] x`` per token in float64, from the very values the kernel reads."""
    idx = index.long().cpu()
    a64, b64 = a.double().cpu()[idx], b.double().cpu()[idx]
    h = torch.bmm(a64, x.double().cpu().unsqueeze(-1))
    return y.double().cpu() + torch.bmm(b64, h).squeeze(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("tokens", [1, 7, 64, 65, 150])  # bgmv up to 64 tokens, sgmv above
def test_kernels_match_float64(tokens, dtype):
    n_slots, r, n_in, n_out = 5, 16, 96, 160
    a, b = slots(n_slots, r, n_in, n_out, dtype)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, n_in, generator=g).to(dtype).to(DEVICE)
    y = torch.randn(tokens, n_out, generator=g).to(dtype).to(DEVICE)
    index = torch.randint(0, n_slots, (tokens,), generator=g).to(DEVICE)
    index[0] = 1  # at least one adapted token
    want = reference(x, a, b, index, y)
    got = K.lora_add_(x, a, b, index, y.clone())
    assert K.family(tokens) == ("bgmv" if tokens <= K.BGMV_MAX_T else "sgmv")
    scale = float(want.abs().max())
    err = float((got.double().cpu() - want).abs().max())
    assert err <= 2 * EPS[dtype] * scale + 1e-6, f"{K.family(tokens)} {dtype}: {err:.3g} (max |y| {scale:.3g})"
    untouched = (index == 0).cpu()  # slot 0: the row is not touched, bit for bit
    assert torch.equal(got.cpu()[untouched], y.cpu()[untouched])
    h = K.lora_shrink(x, a, index)
    assert h.dtype == torch.float32 and not h.cpu()[untouched].any()
    functional = K.lora_add(x, a, b, index, y)  # the custom op torch.compile uses: the same numbers, a new tensor
    assert torch.equal(functional.cpu(), got.cpu()) and not torch.equal(functional.cpu(), y.cpu())


@pytest.mark.parametrize("tokens", [5, 80])
def test_strided_output_view_int32_index_and_small_rank(tokens):
    """y a column slice of a wider tensor (a fused qkv output), an int32 index, r_max 8 (below tl.dot's 16)."""
    a, b = slots(4, 8, 64, 48, torch.float32, seed=1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, 64, generator=g).to(DEVICE)
    wide = torch.randn(tokens, 100, generator=g).to(DEVICE)
    index = torch.randint(0, 4, (tokens,), generator=g, dtype=torch.int32).to(DEVICE)
    before = wide.clone()
    view = wide[:, 30:78]
    want = reference(x, a, b, index, view)
    K.lora_add_(x, a, b, index, view)
    assert float((view.double().cpu() - want).abs().max()) <= 1e-5 * float(want.abs().max())
    assert torch.equal(wide[:, :30], before[:, :30]) and torch.equal(wide[:, 78:], before[:, 78:])


def test_split_k_gives_the_same_hidden_and_nothing_for_slot_zero():
    a, b = slots(3, 16, 300, 40, torch.float32, seed=3)
    x = torch.randn(2, 300, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    index = torch.tensor([2, 1], device=DEVICE)
    one = K.lora_shrink(x, a, index, split_k=1)
    for split in (2, 3):
        assert float((K.lora_shrink(x, a, index, split_k=split) - one).abs().max()) <= 1e-5
    y = torch.randn(2, 40, device=DEVICE)
    assert torch.equal(K.lora_add_(x, a, b, torch.zeros(2, dtype=torch.long, device=DEVICE), y.clone()), y)


# ---- through the pool -------------------------------------------------------------------------

def make_pool(kernel: str, count: int = 4) -> AdapterPool:
    pool = AdapterPool(BUILDERS["llama"](0).to(DEVICE), max_adapters=3, max_rank=8, kernel=kernel,
                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"])
    for i in range(count):
        handle = adapterkit.inject(BUILDERS["llama"](0), "lora",
                                   {"r": (8, 4, 2, 6)[i], "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]
                                    if i % 2 else ["k_proj", "o_proj", "gate_proj"]})
        perturb(handle.parameters(), seed=i, scale=0.3)
        pool.load(f"a{i}", handle.to_adapter())
    return pool


def test_pool_through_triton_matches_the_torch_gather_path():
    """Prefill (80 token rows: sgmv) and decode steps (8 rows: bgmv) with a KV cache, one adapter per row."""
    rows = ["a0", "a1", None, "a2", "a0", "a1", "a2", None]
    inputs = {k: v.to(DEVICE) for k, v in sample_inputs(seed=7, batch=len(rows), length=10).items()}
    results = {}
    for kernel in ("gather", "triton"):
        pool = make_pool(kernel)
        assert pool.summary()["mixed_kernel"] == kernel
        with torch.no_grad(), pool.routed(rows, len(rows)):
            out = pool.model(**inputs, use_cache=True)
            logits = [out.logits]
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            mask = inputs["attention_mask"]
            for _ in range(3):
                mask = torch.cat([mask, torch.ones_like(token)], dim=1)
                out = pool.model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
                logits.append(out.logits)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        results[kernel] = logits
    for step, (got, want) in enumerate(zip(results["triton"], results["gather"])):
        diff = float((got - want).abs().max())
        assert diff <= 1e-5, f"step {step}: triton vs gather {diff:.3g}"
    assert float((results["gather"][0] - results["gather"][0][2:3]).abs().max()) > 0  # rows differ: a real mix


def test_pool_pages_adapters_under_the_triton_kernel():
    """Four adapters, three slots: the Triton path reads the slots that paging rewrote."""
    pool, reference_pool = make_pool("triton"), make_pool("gather")
    inputs = {k: v.to(DEVICE) for k, v in sample_inputs(seed=8, batch=4, length=5).items()}
    with torch.no_grad():
        for rows in (["a0", "a1", "a2", None], ["a3", "a0", "a3", "a1"], ["a2", "a3", None, "a0"]):
            diff = float((pool(**inputs, adapter_names=rows).logits
                          - reference_pool(**inputs, adapter_names=rows).logits).abs().max())
            assert diff <= 1e-5, (rows, diff)
    assert pool.stats.evictions >= 1


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("options", [{}, {"backend": "cudagraphs"}], ids=["reduce-overhead", "cudagraphs"])
def test_compiled_pool_with_cuda_graphs_matches_eager_and_survives_page_ins(options):
    import torch._dynamo

    torch._dynamo.reset()
    pool, eager = make_pool("auto"), make_pool("gather")
    assert pool.summary()["mixed_kernel"] == "gather; triton for compiled decode steps"
    pool.compile(**options)  # CUDA, no options: mode="reduce-overhead" (CUDA graphs)
    inputs = {k: v.to(DEVICE) for k, v in sample_inputs(seed=9, batch=4, length=6).items()}
    with torch.no_grad():
        for rows in (["a0", "a1", "a2", None], ["a3", "a0", "a3", "a1"], ["a2", "a3", None, "a0"], ["a1"] * 4):
            for _ in range(2):  # the second call replays the graph
                got = pool(**inputs, adapter_names=rows, use_cache=False).logits.clone()
            want = eager(**inputs, adapter_names=rows, use_cache=False).logits
            assert float((got - want).abs().max()) <= 1e-4, rows
