"""Paging in the adapter pool (core/runtime/residency.py, paging.py, wide_batch.py, pool.py).

Many adapters registered in host memory, a few device slots: every row of every batch must
give what its adapter gives alone (``adapterkit.apply`` on a fresh base) while adapters page
in and out, the device memory stays that of the slots, batches naming more distinct adapters
than slots are served exactly (forward and generate), pinned and active adapters are never
evicted, and a compiled model keeps its graph through page-ins. The CUDA variants run where a
GPU is present (the side-stream page-in); on the CPU they are skipped.
"""

from __future__ import annotations

import random

import pytest

import torch

import adapterkit
from adapterkit.core.errors import UsageError
from adapterkit.core.runtime.pool import AdapterPool
from adapterkit.core.runtime.residency import Residency, plan_sub_batches
from adapterkit.core.runtime.wide_batch import merge_sequences, reassemble
from adapterkit.testing import perturb
from models import BUILDERS, sample_inputs

ATOL = 1e-5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]

# varied adapters: ranks 2..8 (padded into rank-8 slots), target subsets, rsLoRA, per-module patterns
SHAPES = [
    {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    {"r": 2, "alpha": 3, "use_rslora": True, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    {"r": 8, "alpha": 4, "target_modules": ["q_proj", "v_proj", "down_proj"], "rank_pattern": {"down_proj": 3}},
    {"r": 6, "alpha": 12, "target_modules": ["k_proj", "o_proj", "down_proj"]},
]


def make_adapter(index: int) -> adapterkit.Adapter:
    handle = adapterkit.inject(BUILDERS["llama"](0), "lora", SHAPES[index % len(SHAPES)])
    perturb(handle.parameters(), seed=100 + index, scale=0.3)
    return handle.to_adapter()


@pytest.fixture(scope="module")
def catalogue() -> dict[str, adapterkit.Adapter]:
    return {f"t{i}": make_adapter(i) for i in range(24)}


@pytest.fixture(scope="module")
def inputs():
    data = sample_inputs(seed=3, batch=8, length=6)
    data["attention_mask"][2, :2] = 0  # a left-padded row
    return data


@pytest.fixture(scope="module")
def expected(catalogue, inputs) -> dict:
    """Each adapter applied alone to a fresh base (and the base itself), over the whole input batch."""
    out = {}
    for name, adapter in [*catalogue.items(), (None, None)]:
        model = BUILDERS["llama"](0)
        if adapter is not None:
            adapterkit.apply(adapter, model)
        with torch.no_grad():
            out[name] = model(**inputs).logits
    return out


def make_pool(catalogue, slots: int, device: str = "cpu", names=None, **options) -> AdapterPool:
    pool = AdapterPool(BUILDERS["llama"](0).to(device), max_adapters=slots, max_rank=8, target_modules=TARGETS,
                       **options)
    for name in names if names is not None else catalogue:
        pool.load(name, catalogue[name])
    return pool


def check_rows(got: torch.Tensor, rows: list, expected: dict, where: str) -> None:
    for i, name in enumerate(rows):
        diff = (got[i].cpu() - expected[name][i]).abs().max().item()
        assert diff <= ATOL, f"{where}, row {i} ({name}): max abs diff {diff:.3g}"


def slot_bytes(slots: int) -> int:
    """Bytes of a pool with ``slots`` device slots on the tiny llama's targets (rank 8, float32, slot 0 included)."""
    model = BUILDERS["llama"](0)
    total = 0
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and path.split(".")[-1] in TARGETS:
            total += (slots + 1) * 8 * (module.in_features + module.out_features) * 4
    return total


# ---- acceptance ---------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_24_adapters_in_4_slots_serve_batch_after_batch_exactly(device, catalogue, inputs, expected):
    pool = make_pool(catalogue, slots=4, device=device)
    assert pool.names == list(catalogue) and len(pool) == 24
    assert pool.resident == ["t0", "t1", "t2", "t3"]  # free slots taken at load; the rest wait in host memory
    assert pool.slot("t3") == 4 and pool.slot("t4") is None
    summary = pool.summary()
    assert summary["slot_bytes"] == slot_bytes(4)  # the device holds 4 slots, not 24
    assert summary["host_bytes"] > 0 and summary["adapters"]["t23"] is None
    layer = pool.model.get_submodule("model.layers.0.self_attn.q_proj")
    pointers = (layer.lora_A_slots.data_ptr(), layer.lora_B_slots.data_ptr())
    rng = random.Random(0)
    names = list(catalogue)
    inputs_dev = {k: v.to(device) for k, v in inputs.items()}
    for batch in range(12):
        chosen = rng.sample(names, 4)  # at most 4 distinct per batch: served in one pass, paging as needed
        rows = [rng.choice([*chosen, None]) for _ in range(8)]
        with torch.no_grad():
            got = pool(**inputs_dev, adapter_names=rows).logits
        check_rows(got, rows, expected, f"batch {batch}")
        assert set(n for n in rows if n) <= set(pool.resident)
    stats = pool.stats
    assert stats.misses > 10 and stats.evictions > 10 and stats.page_ins >= stats.misses and stats.hits > 0
    assert stats.page_in_seconds > 0 and stats.wide_calls == 0
    assert pool.summary()["slot_bytes"] == slot_bytes(4)
    assert (layer.lora_A_slots.data_ptr(), layer.lora_B_slots.data_ptr()) == pointers  # copies into the same storage
    assert len(pool.resident) == 4


@pytest.mark.parametrize("device", DEVICES)
def test_a_batch_naming_8_distinct_adapters_is_served_exactly(device, catalogue, inputs, expected):
    pool = make_pool(catalogue, slots=4, device=device)
    rows = ["t5", "t9", None, "t0", "t17", "t22", "t21", "t12"]  # 7 distinct adapters and a row with none
    wide = ["t5", "t9", "t1", "t0", "t17", "t22", "t21", "t12"]  # 8 distinct adapters in 8 rows
    inputs_dev = {k: v.to(device) for k, v in inputs.items()}
    for label, names in (("7 distinct and None", rows), ("8 distinct", wide)):
        before = pool.stats.wide_calls
        with torch.no_grad():
            out = pool(**inputs_dev, adapter_names=names)
        check_rows(out.logits, names, expected, label)
        assert out.past_key_values is None  # each sub-batch had its own cache: none is returned
        assert pool.stats.wide_calls == before + 1
    assert pool.stats.sub_batches >= 4
    assert pool.summary()["slot_bytes"] == slot_bytes(4)
    with pytest.raises(UsageError) as info:  # a cache cannot be one cache across sub-batches
        pool(**inputs_dev, adapter_names=wide, use_cache=True)
    assert info.value.code == "wide_batch" and "max_adapters=4" in str(info.value)
    with pytest.raises(UsageError) as info:  # nor a batch-mean loss
        pool(**inputs_dev, adapter_names=wide, labels=inputs_dev["input_ids"])
    assert info.value.code == "wide_batch"
    with pytest.raises(UsageError) as info, pool.routed(wide, 8):  # routed() cannot split: it says so
        pass
    assert info.value.code == "too_many_adapters" and "max_adapters=4" in str(info.value)
    assert pool.routing.index is None and not pool._residency.locked  # nothing left locked or routed


@pytest.mark.parametrize("device", DEVICES)
def test_a_pinned_adapter_stays_resident_through_heavy_traffic(device, catalogue, inputs, expected):
    pool = make_pool(catalogue, slots=4, device=device)
    pool.pin("t20")  # paged in now (evicting the least recently used)
    slot = pool.slot("t20")
    assert slot is not None and pool.pinned == ["t20"]
    rng = random.Random(1)
    others = [n for n in catalogue if n != "t20"]
    inputs_dev = {k: v.to(device) for k, v in inputs.items()}
    for batch in range(16):
        chosen = rng.sample(others, 3)  # fills every other slot each batch: heavy churn
        rows = [chosen[i % 3] for i in range(7)] + ["t20"]
        with torch.no_grad():
            got = pool(**inputs_dev, adapter_names=rows).logits
        check_rows(got, rows, expected, f"batch {batch}")
        assert pool.slot("t20") == slot, f"batch {batch}: the pinned adapter moved"
    wide = [n for n in others[:7]] + [None]  # a wide batch around the pin: sub-batches of 3
    with torch.no_grad():
        check_rows(pool(**inputs_dev, adapter_names=wide).logits, wide, expected, "wide batch around a pin")
    assert pool.slot("t20") == slot and pool.stats.evictions > 30
    pool.pin("t0"), pool.pin("t1")
    with pytest.raises(UsageError) as info:  # a 4th pin would leave no slot for anything else
        pool.pin("t2")
    assert info.value.code == "pinned_full"
    for name in ("t0", "t1", "t20"):
        pool.unpin(name)
    for batch in range(3):
        pool(**inputs_dev, adapter_names=[others[4 * batch + i % 4] for i in range(8)])
    assert "t20" not in pool.resident  # unpinned: evicted like any other


# ---- life cycle under paging -----------------------------------------------------------------

def test_lru_order_hits_misses_and_evictions(catalogue):
    pool = make_pool(catalogue, slots=2, names=["t0", "t1", "t2"])
    inputs = sample_inputs(batch=2)
    assert pool.resident == ["t0", "t1"] and pool.slot("t2") is None
    with torch.no_grad():
        pool(**inputs, adapter_names=["t0", "t0"])  # hit; t1 is now the least recently used
        pool(**inputs, adapter_names=["t2", None])  # miss: evicts t1
        assert pool.resident == ["t0", "t2"]
        pool(**inputs, adapter_names=["t1", "t2"])  # t1 misses, t2 hits: evicts t0
    assert pool.resident == ["t1", "t2"] and pool.slot("t1") == 1
    stats = pool.stats
    assert (stats.hits, stats.misses, stats.evictions) == (2, 2, 2)
    assert stats.page_ins == 2 + 2  # the two loads into free slots, the two misses
    assert pool._residency.lru_order == ["t1", "t2"]


def test_load_hot_swap_and_unload_of_resident_and_host_only_adapters(catalogue, inputs, expected):
    pool = make_pool(catalogue, slots=2, names=["t0", "t1", "t2"])
    assert pool.load("t2", catalogue["t5"]) is None  # hot-swap of an adapter in host memory only: no slot
    assert pool.load("t0", catalogue["t6"]) == 1  # hot-swap of a resident one: its slot, in place
    with torch.no_grad():
        got = pool(**inputs, adapter_names=["t0", "t2", "t0", "t2", None, "t0", "t2", "t0"]).logits
    renamed = {"t0": "t6", "t2": "t5", None: None}
    check_rows(got, [renamed[n] for n in ["t0", "t2", "t0", "t2", None, "t0", "t2", "t0"]], expected, "swapped")
    slot = pool.slot("t2")
    pool.unload("t2")  # resident: the slot is zeroed and freed
    assert "t2" not in pool and pool.slot("t0") is not None
    for layer in pool._layers.values():
        assert not layer.lora_A_slots[slot].any() and not layer.lora_B_slots[slot].any()
    assert pool.load("t3", catalogue["t3"]) == slot  # the freed slot is taken at load
    with pytest.raises(UsageError) as info:
        pool(**inputs, adapter_names=["t2"] * 8)
    assert info.value.code == "unknown_adapter"


def test_active_adapter_is_held_and_serves_rows_without_a_name(catalogue, inputs, expected):
    pool = make_pool(catalogue, slots=2)
    pool.activate("t7")
    slot = pool.slot("t7")
    with torch.no_grad():
        for i in range(6):
            rows = [f"t{i}", None] * 4  # each batch a new adapter beside the active one
            check_rows(pool(**inputs, adapter_names=rows).logits, ["t7" if n is None else n for n in rows],
                       expected, f"batch {i}")
            assert pool.slot("t7") == slot
        direct = pool.model(**inputs).logits  # a direct call of the model: the active adapter
    check_rows(direct, ["t7"] * 8, expected, "direct call")
    with pytest.raises(UsageError) as info:  # the active adapter plus a pin would fill both slots
        pool.pin("t1")
    assert info.value.code == "pinned_full"
    pool.deactivate()
    with torch.no_grad():
        check_rows(pool(**inputs, adapter_names=[None] * 8).logits, [None] * 8, expected, "deactivated")


def test_prefetch_pages_in_ahead_and_the_call_hits(catalogue, inputs, expected):
    pool = make_pool(catalogue, slots=3)
    assert pool.prefetch(["t10", "t11", "t0"]) == ["t10", "t11"]  # t0 was resident already
    assert set(pool.resident) == {"t0", "t10", "t11"}
    misses = pool.stats.misses
    with torch.no_grad():
        rows = ["t10", "t11", "t0", None] * 2
        check_rows(pool(**inputs, adapter_names=rows).logits, rows, expected, "after prefetch")
    assert pool.stats.misses == misses  # every adapter was resident


def test_wide_generate_equals_all_resident_generate(catalogue):
    rows = ["t1", "t8", None, "t3", "t14", "t8", "t19", "t2"]  # 6 distinct adapters, 2 slots
    inputs = sample_inputs(seed=5, batch=len(rows), length=5)
    inputs["attention_mask"][1, :2] = 0  # left padding, as generate expects
    options = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    paged = make_pool(catalogue, slots=2)
    resident = make_pool(catalogue, slots=8, names=sorted({n for n in rows if n}))
    with torch.no_grad():
        got = paged.generate(**inputs, adapter_names=rows, **options)
        want = resident.generate(**inputs, adapter_names=rows, **options)
    assert torch.equal(got, want)
    assert paged.stats.wide_calls == 1 and paged.stats.sub_batches == 3
    with pytest.raises(UsageError) as info:
        paged.generate(**inputs, adapter_names=rows, num_beams=2, **options)
    assert info.value.code == "wide_batch" and "num_beams" in str(info.value)


def test_compiled_pool_keeps_its_graph_through_page_ins(catalogue, inputs, expected):
    import torch._dynamo

    torch._dynamo.reset()
    pool = make_pool(catalogue, slots=2, names=[f"t{i}" for i in range(6)], kernel="gather")
    pool.compile(backend="eager", fullgraph=True, dynamic=False)
    with torch.no_grad():
        check_rows(pool(**inputs, adapter_names=["t0", "t1"] * 4).logits, ["t0", "t1"] * 4, expected, "first")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for pair in (("t2", "t3"), ("t4", "t0"), ("t5", "t1")):  # each batch pages in and evicts
            rows = [pair[0], None, pair[1], pair[0]] * 2
            check_rows(pool(**inputs, adapter_names=rows).logits, rows, expected, f"compiled {pair}")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert pool.stats.evictions >= 4


def test_max_registered_and_bad_names(catalogue):
    pool = make_pool(catalogue, slots=2, names=["t0", "t1", "t2"], max_registered=3)
    with pytest.raises(UsageError) as info:
        pool.load("t3", catalogue["t3"])
    assert info.value.code == "pool_full" and "max_registered" in str(info.value)
    assert pool.load("t0", catalogue["t4"]) == 1  # a hot-swap is not a new registration
    for call in (lambda: pool.pin("zzz"), lambda: pool.prefetch(["zzz"]), lambda: pool.slot("zzz")):
        with pytest.raises(UsageError) as info:
            call()
        assert info.value.code == "unknown_adapter"


# ---- the pure parts --------------------------------------------------------------------------

def test_residency_is_all_or_nothing_and_evicts_least_recently_used():
    cache = Residency(3)
    assert [slot for _, slot, _ in cache.acquire(["a", "b", "c"])] == [1, 2, 3]
    cache.release(["a", "b", "c"])
    cache.acquire(["a"])  # a is locked while its call runs
    with pytest.raises(UsageError) as info:  # b, c evictable, a locked: 3 new ones cannot fit
        cache.acquire(["d", "e", "f"])
    assert info.value.code == "too_many_adapters"
    assert cache.resident == {"a": 1, "b": 2, "c": 3}  # unchanged
    assert cache.acquire(["d"]) == [("d", 2, "b")]  # b: least recently used, not locked
    cache.release(["a", "d"])
    cache.hold("c", pin=True)
    assert cache.acquire(["e", "f"]) == [("e", 1, "a"), ("f", 2, "d")]  # c is pinned
    assert cache.stats.evictions == 3


def test_sub_batches_put_resident_adapters_first_and_free_rows_in_the_first():
    rows = ["x", "a", None, "y", "b", "p", "z", "a"]
    subs = plan_sub_batches(rows, resident={"y", "z"}, held={"p"}, capacity=2)
    # resident y, z first (with the None row and the held p), then x, a, then b
    assert subs == [[2, 3, 5, 6], [0, 1, 7], [4]]
    assert plan_sub_batches(["a", "b"], resident=(), held=(), capacity=2) == [[0, 1]]


def test_reassembly_and_padding_keep_row_order():
    parts = [([0, 2], torch.tensor([[1, 1, 1], [3, 3, 3]])), ([1], torch.tensor([[2, 2]]))]
    merged = merge_sequences(parts, total=3, pad=9)
    assert merged.tolist() == [[1, 1, 1], [2, 2, 9], [3, 3, 3]]
    out = reassemble([([1], torch.tensor([[5.0]])), ([0, 2], torch.tensor([[4.0], [6.0]]))], total=3)
    assert out.tolist() == [[4.0], [5.0], [6.0]]
