"""The multi-adapter runtime (core/runtime/pool.py, core/runtime/pool_layer.py).

Every row of a mixed batch must give what its adapter gives alone (adapterkit.apply, and
PEFT's own mixed batch), with LoRA, rsLoRA, per-module rank / alpha, ranks padded to the
slot, linear and GPT-2 Conv1D, adapters with random (non-zero) B; the gather kernel runs the
same ops whatever the mix (no Python loop over adapters); hot-swap copies in place (same
storage, no recompilation of a model compiled with the eager or inductor backend); everything a
pool refuses, it refuses before touching a slot.
"""

from __future__ import annotations

import json

import pytest

import torch

import adapterkit  # noqa: E402
from adapterkit.core.errors import AdapterkitError, UsageError  # noqa: E402
from adapterkit.core.runtime.pool import AdapterPool, read_adapter, read_native_fast  # noqa: E402
from adapterkit.core.runtime.pool_layer import PoolLayer, pool_layers  # noqa: E402
from adapterkit.testing import perturb  # noqa: E402
from models import BUILDERS, sample_inputs  # noqa: E402

ATOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

# per model kind: three adapters (different targets, ranks, alphas, rsLoRA, per-module patterns)
CONFIGS = {
    "llama": {
        "a": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "b": {"r": 2, "alpha": 3, "use_rslora": True, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "c": {"r": 8, "alpha": 4, "target_modules": ["q_proj", "v_proj", "down_proj"],
              "rank_pattern": {"down_proj": 3}, "alpha_pattern": {"v_proj": 5}},
    },
    "gpt2": {
        "a": {"r": 4, "alpha": 8, "target_modules": ["c_attn"]},
        "b": {"r": 2, "alpha": 3, "use_rslora": True, "target_modules": ["c_attn", "c_proj"]},
        "c": {"r": 8, "alpha": 16, "target_modules": ["c_attn", "c_fc"], "rank_pattern": {"c_fc": 5}},
    },
    "bert": {
        "a": {"r": 4, "alpha": 8, "target_modules": ["query", "value"]},
        "b": {"r": 2, "alpha": 3, "use_rslora": True, "target_modules": ["query", "key", "value"]},
        "c": {"r": 8, "alpha": 4, "target_modules": ["query", "dense"], "rank_pattern": {"dense": 6}},
    },
}
UNION = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bert": ["query", "key", "value", "dense"],
}
ROWS = {
    "interleaved": ["a", None, "b", "c", "a", "b"],  # groups of non-neighbouring rows and a single row
    "grouped": ["c", "c", "a", "a", None, "b"],  # contiguous groups
    "two groups": ["b", "b", "a", None],
}


def make_adapter(kind: str, name: str, seed: int) -> adapterkit.Adapter:
    model = BUILDERS[kind](0)
    handle = adapterkit.inject(model, "lora", CONFIGS[kind][name])
    perturb(handle.parameters(), seed=seed, scale=0.3)
    return handle.to_adapter()


@pytest.fixture(scope="module")
def adapters() -> dict[str, dict[str, adapterkit.Adapter]]:
    return {kind: {name: make_adapter(kind, name, seed) for seed, name in enumerate(CONFIGS[kind], 1)}
            for kind in CONFIGS}


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def applied(kind: str, adapter, inputs) -> torch.Tensor:
    """The logits of a fresh base with ``adapter`` applied by adapterkit.apply (None: the base alone)."""
    model = BUILDERS[kind](0)
    if adapter is not None:
        adapterkit.apply(adapter, model)
    return logits(model, inputs)


def make_pool(kind: str, adapters, names=("a", "b", "c"), **options) -> AdapterPool:
    options = {"max_adapters": 4, "max_rank": 8, "target_modules": UNION[kind], **options}
    pool = AdapterPool(BUILDERS[kind](0), **options)
    for name in names:
        pool.load(name, adapters[kind][name])
    return pool


def pooled(pool: AdapterPool, inputs, rows) -> torch.Tensor:
    with torch.no_grad():
        return pool(**inputs, adapter_names=rows).logits


# ---- mixed batches -------------------------------------------------------------------

@pytest.mark.parametrize("pattern", sorted(ROWS))
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_each_row_gets_its_own_adapter(kind, pattern, adapters):
    rows = ROWS[pattern]
    inputs = sample_inputs(batch=len(rows))
    inputs["attention_mask"][1, -3:] = 0  # padding passes through untouched
    expected = {name: applied(kind, adapters[kind].get(name), inputs) for name in set(rows)}
    for name in set(rows) - {None}:  # random B: every adapter moves the outputs (a zero B would prove nothing)
        assert (expected[name] - applied(kind, None, inputs)).abs().max().item() > 100 * ATOL, name
    pool = make_pool(kind, adapters)
    for kernel in ("auto", "gather"):
        pool.kernel = kernel
        got = pooled(pool, inputs, rows)
        assert pool.routing.index is None  # the routing is cleared after the call
        for i, name in enumerate(rows):
            diff = (got[i] - expected[name][i]).abs().max().item()
            assert diff <= ATOL, f"{kernel} kernel, row {i} ({name}): max abs diff {diff:.3g}"


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_row_alone_equals_the_same_row_in_a_mixed_batch(kind, adapters):
    rows = ROWS["interleaved"]
    inputs = sample_inputs(batch=len(rows))
    pool = make_pool(kind, adapters)
    for kernel in ("auto", "gather"):
        pool.kernel = kernel
        got = pooled(pool, inputs, rows)
        for i, name in enumerate(rows):  # each row run alone (batch of one) with its adapter applied, or the base
            alone = applied(kind, adapters[kind].get(name), {k: v[i:i + 1] for k, v in inputs.items()})
            diff = (got[i] - alone[0]).abs().max().item()
            assert diff <= ATOL, f"{kernel} kernel, row {i} ({name}): max abs diff {diff:.3g}"


def count_ops(fn) -> int:
    """How many torch functions and tensor methods ``fn`` calls."""
    from torch.overrides import TorchFunctionMode

    class Counter(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Counter.calls += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        fn()
    return Counter.calls


def test_gather_kernel_does_not_loop_over_adapters(adapters):
    """BGMV: the same ops whatever the number of distinct adapters in the batch (no Python loop over them)."""
    inputs = sample_inputs(batch=6)
    pool = make_pool("llama", adapters, kernel="gather")
    mixes = [["a", "b", "a", "b", "a", "b"], ["a", "b", "c", None, "c", "a"], ["c", None, "a", "b", "a", None]]
    counts = {tuple(m): count_ops(lambda m=m: pooled(pool, inputs, m)) for m in mixes}
    assert len(set(counts.values())) == 1, counts
    pool.kernel = "auto"  # interleaved rows: auto gathers too
    assert count_ops(lambda: pooled(pool, inputs, mixes[1])) == counts[tuple(mixes[1])]


@pytest.mark.parametrize("kernel", ["auto", "gather"])
def test_rows_without_adapter_are_the_base(kernel, adapters):
    inputs = sample_inputs(batch=4)
    pool = make_pool("llama", adapters, kernel=kernel)
    got = pooled(pool, inputs, ["a", None, "b", None])
    base = logits(BUILDERS["llama"](0), inputs)
    assert torch.equal(got[1], base[1]) and torch.equal(got[3], base[3])
    assert torch.equal(pooled(pool, inputs, None), base)  # no names: the base (no adapter active)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_matches_peft_mixed_batch(kind, tmp_path):
    import peft
    configs = {
        "a": {"r": 4, "lora_alpha": 8},
        "b": {"r": 2, "lora_alpha": 3, "use_rslora": True},
        "c": {"r": 8, "lora_alpha": 4, "rank_pattern": {"v_proj" if kind == "llama" else "c_proj": 3}},
    }
    targets = ["q_proj", "k_proj", "v_proj"] if kind == "llama" else ["c_attn", "c_proj"]
    extra = {"fan_in_fan_out": True} if kind == "gpt2" else {}
    torch.manual_seed(7)
    model = None
    for name, config in configs.items():
        lora = peft.LoraConfig(target_modules=targets, init_lora_weights=False, **extra, **config)
        if model is None:
            model = peft.get_peft_model(BUILDERS[kind](0), lora, adapter_name=name)
        else:
            model.add_adapter(name, lora)
    model.eval()
    model.save_pretrained(tmp_path / "peft")  # one subfolder per (non-"default") adapter
    pool = AdapterPool(BUILDERS[kind](0), max_adapters=3, max_rank=8, target_modules=targets)
    for name in configs:
        pool.load(name, tmp_path / "peft" / name)  # PEFT's format, from disk
    rows = ["a", "b", None, "c", "b", "a"]
    inputs = sample_inputs(batch=len(rows))
    with torch.no_grad():
        expected = model(**inputs, adapter_names=[n or "__base__" for n in rows]).logits
    for kernel in ("auto", "gather"):
        pool.kernel = kernel
        diff = (pooled(pool, inputs, rows) - expected).abs().max().item()
        assert diff <= ATOL, f"{kernel}: max abs diff to PEFT {diff:.3g}"
    # hot-swap from a PEFT folder: slot "a" (r=4) now holds "c" (r=8, another rank on one module)
    pool.load("a", tmp_path / "peft" / "c")
    with torch.no_grad():
        expected = model(**inputs, adapter_names=[{"a": "c"}.get(n, n) or "__base__" for n in rows]).logits
    diff = (pooled(pool, inputs, rows) - expected).abs().max().item()
    assert diff <= ATOL, f"after a hot-swap from PEFT's format: max abs diff to PEFT {diff:.3g}"


# ---- life cycle ---------------------------------------------------------------------

def test_hot_swap_copies_in_place(adapters):
    inputs = sample_inputs(batch=3)
    pool = make_pool("llama", adapters, names=("c",))  # rank 8 (3 on down_proj)
    layer = pool.model.get_submodule("model.layers.0.self_attn.q_proj")
    pointers = (layer.lora_A_slots.data_ptr(), layer.lora_B_slots.data_ptr())
    slot = pool.slot("c")
    assert pool.load("c", adapters["llama"]["b"]) == slot  # rank 2, other targets: the old rank-8 tail must go
    assert (layer.lora_A_slots.data_ptr(), layer.lora_B_slots.data_ptr()) == pointers
    got = pooled(pool, inputs, ["c", None, "c"])
    expected = applied("llama", adapters["llama"]["b"], inputs)
    assert (got[0] - expected[0]).abs().max().item() <= ATOL
    assert (got[2] - expected[2]).abs().max().item() <= ATOL
    down = pool.model.get_submodule("model.layers.0.mlp.down_proj")  # b does not adapt it: the slot is zeros
    assert not down.lora_A_slots[slot].any() and not down.lora_B_slots[slot].any()


def test_a_refused_swap_leaves_the_old_weights(adapters):
    inputs = sample_inputs(batch=2)
    pool = make_pool("llama", adapters, names=("a",), max_rank=4)
    before = pooled(pool, inputs, ["a", "a"])
    with pytest.raises(UsageError, match="max_rank"):
        pool.load("a", adapters["llama"]["c"])  # rank 8 > 4
    bad = make_adapter("llama", "a", seed=9)
    key = next(k for k in bad.tensors if k.endswith("v_proj.lora.B"))
    bad.tensors[key] = bad.tensors[key].copy()
    bad.tensors[key][0, 0] = float("nan")
    with pytest.raises(UsageError, match="NaN"):
        pool.load("a", bad)
    assert torch.equal(pooled(pool, inputs, ["a", "a"]), before)


def test_targets_fixed_by_the_first_adapter(adapters):
    pool = AdapterPool(BUILDERS["llama"](0), max_adapters=4, max_rank=8)
    assert pool.targets == []
    pool.load("b", adapters["llama"]["b"])  # q/k/v/o
    assert len(pool.targets) == 8 and all(p.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) for p in pool.targets)
    pool.load("a", adapters["llama"]["a"])  # q/v: a subset is fine
    with pytest.raises(UsageError) as info:
        pool.load("c", adapters["llama"]["c"])  # down_proj is not a target
    assert info.value.code == "targets_mismatch" and "mlp.down_proj" in str(info.value)
    assert pool.names == ["b", "a"]


def test_unload_zeroes_and_frees_the_slot(adapters):
    pool = make_pool("llama", adapters)
    slot = pool.slot("b")
    pool.unload("b")
    assert "b" not in pool and len(pool) == 2
    for _, layer in pool_layers(pool.model):
        assert not layer.lora_A_slots[slot].any() and not layer.lora_B_slots[slot].any()
    with pytest.raises(UsageError, match="no adapter named 'b'"):
        pooled(pool, sample_inputs(batch=1), ["b"])
    assert pool.load("d", adapters["llama"]["b"]) == slot  # the freed slot is reused


def test_activate_serves_direct_model_calls(adapters):
    inputs = sample_inputs(batch=2)
    pool = make_pool("llama", adapters)
    pool.activate("a")
    expected = applied("llama", adapters["llama"]["a"], inputs)
    assert (logits(pool.model, inputs) - expected).abs().max().item() <= ATOL  # e.g. model.generate
    assert (pooled(pool, inputs, [None, "b"])[0] - expected[0]).abs().max().item() <= ATOL  # None: the active one
    pool.deactivate()
    assert torch.equal(logits(pool.model, inputs), applied("llama", None, inputs))


def test_generate_with_one_adapter_per_row(adapters):
    rows = ["a", None, "c"]
    inputs = sample_inputs(batch=len(rows), length=5)
    pool = make_pool("llama", adapters)
    options = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        got = pool.generate(**inputs, adapter_names=rows, **options)
    for i, name in enumerate(rows):
        model = BUILDERS["llama"](0)
        if name:
            adapterkit.apply(adapters["llama"][name], model)
        with torch.no_grad():
            alone = model.generate(**{k: v[i:i + 1] for k, v in inputs.items()}, **options)
        assert torch.equal(got[i], alone[0]), f"row {i} ({name})"
    with pytest.raises(ValueError, match="beam search"), torch.no_grad():
        pool.generate(**inputs, adapter_names=rows, num_beams=2, max_new_tokens=2, pad_token_id=0)


def test_refusals(adapters):
    pool = make_pool("llama", adapters, names=("a",), max_adapters=1, max_registered=1)
    inputs = sample_inputs(batch=2)
    cases = [
        (lambda: pool.load("b", adapters["llama"]["b"]), "pool_full"),  # max_registered, not the device slots
        (lambda: pooled(pool, inputs, ["a"]), "bad_adapter_names"),
        (lambda: pooled(pool, inputs, "a"), "bad_adapter_names"),
        (lambda: pooled(pool, inputs, ["a", "zzz"]), "unknown_adapter"),
        (lambda: AdapterPool(pool.model), "pool_exists"),
        (lambda: AdapterPool(BUILDERS["llama"](0), kernel="loop"), "bad_option"),
        (lambda: AdapterPool(BUILDERS["llama"](0), kernel="segment"), "bad_option"),  # retired (issue 16)
        (lambda: AdapterPool(BUILDERS["llama"](0), max_registered=0), "bad_option"),
        (lambda: AdapterPool(BUILDERS["llama"](0), max_rank=0), "bad_option"),
        (lambda: AdapterPool(BUILDERS["llama"](0), target_modules=["nothing_here"]), "no_targets"),
    ]
    for call, code in cases:
        with pytest.raises(UsageError) as info:
            call()
        assert info.value.code == code, (code, str(info.value))
    dora_model = BUILDERS["llama"](0)
    handle = adapterkit.inject(dora_model, "dora", {"r": 2, "target_modules": ["q_proj"]})
    with pytest.raises(UsageError) as info:
        AdapterPool(BUILDERS["llama"](0)).load("d", handle.to_adapter())
    assert info.value.code == "unsupported_method"


# ---- from disk -------------------------------------------------------------------------

def test_load_from_disk_fast_path_and_integrity(adapters, tmp_path):
    path = adapterkit.save(adapters["llama"]["c"], tmp_path / "c")
    fast = read_native_fast(path)
    full = adapterkit.load(path)
    assert fast is not None and fast.manifest == full.manifest
    assert sorted(fast.tensors) == sorted(full.tensors)
    assert all((fast.tensors[k] == full.tensors[k]).all() for k in full.tensors)
    pool = make_pool("llama", adapters, names=())
    pool.load("c", path)
    inputs = sample_inputs(batch=2)
    assert (pooled(pool, inputs, ["c", "c"]) - applied("llama", full, inputs)).abs().max().item() <= ATOL
    # one flipped byte: the fast path declines, the full reader names the problem, the slot is untouched
    before = pooled(pool, inputs, ["c", "c"])
    tensor_file = path / next(iter(json.loads((path / "adapter.json").read_text())["tensors"]))
    data = bytearray(tensor_file.read_bytes())
    data[-5] ^= 0xFF
    tensor_file.write_bytes(bytes(data))
    assert read_native_fast(path) is None
    with pytest.raises(AdapterkitError, match="sha256|checksum"):
        read_adapter(path)
    with pytest.raises(AdapterkitError):
        pool.load("c", path)
    assert torch.equal(pooled(pool, inputs, ["c", "c"]), before)


def test_release_restores_the_base(adapters):
    model = BUILDERS["gpt2"](0)
    keys = sorted(model.state_dict())
    pool = AdapterPool(model, target_modules=UNION["gpt2"], max_rank=8)
    pool.load("a", adapters["gpt2"]["a"])
    assert pool_layers(model) and sorted(model.state_dict()) != keys  # wrapped: base_layer in the paths
    inputs = sample_inputs(batch=2)
    assert pool.release() is model and not pool_layers(model)
    assert sorted(model.state_dict()) == keys
    assert torch.equal(logits(model, inputs), applied("gpt2", None, inputs))
    assert pool.names == [] and pool.targets == []
    pool.load("b", adapters["gpt2"]["b"])  # released: the next load injects again, with its own targets
    assert len(pool.targets) == 6  # per layer: c_attn, attn.c_proj, mlp.c_proj (2 layers)
    expected = applied("gpt2", adapters["gpt2"]["b"], inputs)
    assert (pooled(pool, inputs, ["b", "b"]) - expected).abs().max().item() <= ATOL


# ---- torch.compile --------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["eager", "inductor"])  # inductor: torch.compile's default, generated code
def test_compiled_model_survives_swaps_without_recompiling(backend, adapters):
    import torch._dynamo

    torch._dynamo.reset()
    inputs = sample_inputs(batch=4)
    pool = make_pool("llama", adapters, names=("a", "b"))
    eager = make_pool("llama", adapters, names=("a", "b"))  # the same pool, never compiled
    pool.compile(backend=backend, fullgraph=True, dynamic=False)  # fullgraph: a graph break is an error
    first = pooled(pool, inputs, ["a", None, "b", "a"])
    assert (first - pooled(eager, inputs, ["a", None, "b", "a"])).abs().max().item() <= ATOL
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    steps = [
        ("another mix", lambda p: None, ["b", "b", None, "a"]),
        ("hot-swap a <- c", lambda p: p.load("a", adapters["llama"]["c"]), ["a", "b", "a", None]),
        ("unload b, load b <- a", lambda p: (p.unload("b"), p.load("b", adapters["llama"]["a"])),
         ["b", "a", None, "b"]),
        ("activate b", lambda p: p.activate("b"), [None, "a", None, "a"]),
    ]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for label, change, rows in steps:
            change(pool)
            change(eager)
            diff = (pooled(pool, inputs, rows) - pooled(eager, inputs, rows)).abs().max().item()
            assert diff <= ATOL, f"{label}: compiled and eager differ by {diff:.3g}"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    swapped = applied("llama", adapters["llama"]["c"], inputs)
    assert (pooled(pool, inputs, ["a"] * 4) - swapped).abs().max().item() <= ATOL  # the new adapter's outputs
    assert all(isinstance(m, PoolLayer) for _, m in pool_layers(pool.model))
