"""Prompt tuning: the conformance kit, parity with the real PEFT (both ways), generation, bookkeeping."""

from __future__ import annotations

import json

import pytest

import torch
import peft
import jsonschema

import adapterkit  # noqa: E402
import adapterkit.plugins.prompts.prefix_method as prefix_plugin  # noqa: E402
import adapterkit.plugins.prompts.prompt_method as prompt_plugin  # noqa: E402
from adapterkit.core.errors import AdapterkitError, FormatError, UsageError  # noqa: E402
from adapterkit.core.plugin.registry import Registry, default_registry, get_plugin_manager  # noqa: E402
from adapterkit.core.runtime.inject import attached  # noqa: E402
from adapterkit.testing import MethodConformance  # noqa: E402
from models import BUILDERS, sample_inputs  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def registry() -> Registry:
    """The installed plugins, plus ours while they are not entry points yet."""
    installed = default_registry()
    if {"prompt", "prefix"} <= set(installed.methods):
        return installed
    return Registry(*get_plugin_manager(plugins=[("prompt", prompt_plugin), ("prefix", prefix_plugin)]))


REG = registry()
N = 3


class TestPromptConformance(MethodConformance):
    method = "prompt"
    registry = REG
    configs = {
        "llama": {"num_virtual_tokens": 4},
        "gpt2": {"num_virtual_tokens": 3, "init": "sample_vocab"},
        "bert": {"num_virtual_tokens": 2, "init": "text", "init_text_ids": [5, 6, 7]},
    }


# ---- PEFT parity ----------------------------------------------------------------

def peft_prompt_model(kind: str, task_type: str = "CAUSAL_LM"):
    """A tiny model with a PEFT prompt-tuning adapter of random (non-trivial) virtual tokens."""
    torch.manual_seed(7)
    config = peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=N)
    model = peft.get_peft_model(BUILDERS[kind](seed=0), config).eval()
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.mul_(0.5).add_(0.1)
    return model


def padded_inputs():
    inputs = sample_inputs()
    inputs["attention_mask"][0, :2] = 0  # left padding in the first row
    return inputs


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_peft_folder_loads_applies_and_writes_back(kind, tiny_base_dirs, tmp_path):
    reference = peft_prompt_model(kind)
    reference.save_pretrained(tmp_path / "peft")
    inputs, labels = padded_inputs(), sample_inputs(seed=2)["input_ids"]
    with torch.no_grad():
        expected = reference(**inputs, labels=labels)
    assert expected.logits.shape[1] == N + 8  # PEFT's logits include the virtual positions

    adapter = adapterkit.load(tmp_path / "peft", format="peft", registry=REG, base=tiny_base_dirs[kind])
    embedding = "model.embed_tokens" if kind == "llama" else "transformer.wte"
    assert set(adapter.tensors) == {f"{embedding}.prompt.embeddings"}
    assert adapter.manifest.config == {"num_virtual_tokens": N} and adapter.manifest.task == "causal-lm"
    model = adapterkit.apply(adapter, BUILDERS[kind](seed=0), registry=REG)
    with torch.no_grad():
        got = model(**inputs, labels=labels)
        base = BUILDERS[kind](seed=0)(**inputs).logits
    assert got.logits.shape == base.shape  # ours: the real tokens' positions only
    assert (got.logits - base).abs().max() > 1e-3
    assert (got.logits - expected.logits[:, N:]).abs().max().item() <= 1e-5
    assert abs(got.loss.item() - expected.loss.item()) <= 1e-5  # labels extended with -100 like PEFT

    adapterkit.save(adapter, tmp_path / "back", format="peft", registry=REG)
    config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == N
    again = peft.PeftModel.from_pretrained(BUILDERS[kind](seed=0), tmp_path / "back").eval()
    with torch.no_grad():
        assert (again(**inputs).logits - expected.logits).abs().max().item() <= 1e-5


def test_adapterkit_made_adapter_loads_in_peft(tiny_base_dirs, tmp_path):
    model = BUILDERS["llama"](seed=0)
    handle = adapterkit.inject(model, "prompt", num_virtual_tokens=5, registry=REG)
    inputs = sample_inputs()
    with torch.no_grad():
        ours = model(**inputs).logits
    adapter = handle.to_adapter()
    adapterkit.save(adapter, tmp_path / "peft", format="peft", registry=REG)
    theirs = peft.PeftModel.from_pretrained(BUILDERS["llama"](seed=0), tmp_path / "peft").eval()
    with torch.no_grad():
        assert (theirs(**inputs).logits[:, 5:] - ours).abs().max().item() <= 1e-5
    # and back: the PEFT folder reads into the same adapter
    again = adapterkit.load(tmp_path / "peft", format="peft", registry=REG, base=tiny_base_dirs["llama"])
    assert again.targets == adapter.targets
    assert all((again.tensors[k] == v).all() for k, v in adapter.tensors.items())


def test_sequence_classification_matches_peft():
    reference = peft_prompt_model("bert", task_type="SEQ_CLS")
    inputs = padded_inputs()
    inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    adapter_state = {"bert.embeddings.word_embeddings.prompt.embeddings":
                     reference.prompt_encoder["default"].embedding.weight.detach().clone()}
    model = BUILDERS["bert"](seed=0)
    handle = adapterkit.inject(model, "prompt", num_virtual_tokens=N, registry=REG)
    handle.load_state_dict(adapter_state)
    with torch.no_grad():
        assert (model(**inputs).logits - reference(**inputs).logits).abs().max().item() <= 1e-5


def test_reading_peft_needs_the_base(tmp_path):
    peft_prompt_model("llama").save_pretrained(tmp_path / "peft")
    assert REG.format("peft").detect(tmp_path / "peft")
    with pytest.raises(FormatError, match="base model is needed"):
        adapterkit.load(tmp_path / "peft", format="peft", registry=REG)
    live = adapterkit.load(tmp_path / "peft", format="peft", registry=REG, base=BUILDERS["llama"](seed=0))  # a live model
    assert list(live.targets) == ["model.embed_tokens"]


def test_peft_format_plugin_delegates_when_hooked_in(tiny_base_dirs, tmp_path):
    """The peft format plugin hands PEFT prompt-tuning folders to the prompts plugin's PROMPT_TUNING codec."""
    peft_prompt_model("gpt2").save_pretrained(tmp_path / "peft")
    assert REG.format("peft").detect(tmp_path / "peft")
    adapter = adapterkit.load(tmp_path / "peft", registry=REG, base=tiny_base_dirs["gpt2"])
    assert adapter.method == "prompt"
    adapterkit.save(adapter, tmp_path / "back", format="peft", registry=REG)
    assert REG.format("peft").detect(tmp_path / "back")


# ---- generation and the cache ---------------------------------------------------

def greedy(model, inputs, steps):
    """Reference decoding: every step recomputes the whole sequence (no cache), positions as generate() makes them."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


def prompted(kind: str = "llama", seed: int = 3):
    model = BUILDERS[kind](seed=0)
    handle = adapterkit.inject(model, "prompt", num_virtual_tokens=N, registry=REG)
    torch.manual_seed(seed)
    with torch.no_grad():
        handle.parameters()[0].mul_(0.5)
    return model, handle


def test_generate_matches_full_recomputation():
    # PEFT 0.21.2's own cached generate() re-prepends the prompt at every step under transformers 5
    # (it looks for past_key_values, now called cache), so the reference is an uncached greedy loop.
    model, _ = prompted()
    inputs = padded_inputs()
    want = greedy(model, inputs, 6)
    assert model.generate(**inputs, max_new_tokens=6, do_sample=False).tolist() == want.tolist()
    assert model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False).tolist() == want.tolist()


def test_continuing_from_the_returned_cache():
    model, _ = prompted()
    inputs = sample_inputs(length=9)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        full = model(**inputs).logits
        first = model(input_ids=ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
        rest = model(input_ids=ids[:, 6:], attention_mask=mask, cache=first.cache).logits
    assert first.logits.shape[1] == 6 and rest.shape[1] == 3
    assert (rest - full[:, 6:]).abs().max().item() <= 1e-5


def test_a_foreign_cache_is_refused():
    from transformers import DynamicCache

    model, handle = prompted()
    ids = sample_inputs()["input_ids"]
    with torch.no_grad(), handle.disabled():
        cache = model(input_ids=ids, use_cache=True).cache  # filled without the prompt
    with pytest.raises(UsageError, match="not run through this prompt"):
        model(input_ids=ids[:, :1], cache=cache)
    with torch.no_grad():  # an empty cache is fine (generate() passes one)
        assert model(input_ids=ids, cache=DynamicCache()).logits.shape[1] == ids.shape[1]


def test_explicit_positions_and_hidden_states():
    model, _ = prompted()
    inputs = sample_inputs()
    positions = torch.arange(8).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        plain = model(**inputs, output_hidden_states=True)
        explicit = model(**inputs, position_ids=positions).logits
    assert torch.equal(plain.logits, explicit)
    assert all(h.shape[1] == 8 for h in plain.hidden_states)  # virtual positions stripped


def test_inputs_embeds_and_positional_arguments():
    model, _ = prompted()
    inputs = sample_inputs()
    with torch.no_grad():
        want = model(**inputs).logits
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        assert torch.equal(model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits, want)
        assert torch.equal(model(inputs["input_ids"], inputs["attention_mask"]).logits, want)


# ---- life cycle -------------------------------------------------------------------

def test_init_from_vocabulary_and_text():
    model = BUILDERS["llama"](seed=0)
    table = model.get_input_embeddings().weight
    handle = adapterkit.inject(model, "prompt", num_virtual_tokens=5, init="text", init_text_ids=[3, 9], registry=REG)
    assert torch.equal(handle.parameters()[0], table[[3, 9, 3, 9, 3]])
    other = adapterkit.inject(model, "prompt", {"num_virtual_tokens": 4, "init": "sample_vocab"}, name="b", registry=REG)
    rows = other.parameters()[0]
    assert all(any(torch.equal(row, t) for t in table) for row in rows)
    # two adapters on one model: their prompts are concatenated in injection order
    with torch.no_grad():
        assert model(**sample_inputs()).logits.shape[1] == 8


def test_config_errors_say_how_to_fix():
    method = REG.method("prompt")
    with pytest.raises(UsageError, match="init_text_ids"):
        method.resolve_config({"init": "text"})
    with pytest.raises(UsageError, match="unknown prompt-tuning option") as info:
        method.resolve_config({"prompt_tuning_init": "TEXT"})
    assert "init" in str(info.value)
    assert method.resolve_config({"init": "SAMPLE_VOCAB"})["init"] == "sample_vocab"
    schema = method.config_schema()
    jsonschema.validate({"num_virtual_tokens": 4, "init": "text", "init_text_ids": [1]}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"init": "text"}, schema)


def test_not_mergeable_and_unload_restores_the_base():
    model, handle = prompted()
    inputs = sample_inputs()
    assert "extra inputs" in REG.method("prompt").merge_refusal({})
    with pytest.raises((NotImplementedError, AdapterkitError)):
        handle.merge()
    REG.method("prompt").unload(model)
    assert not attached(model) and not hasattr(model, "adapterkit_prompt")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, BUILDERS["llama"](seed=0)(**inputs).logits)


def test_validate_against_the_base(tiny_base_dirs, tmp_path):
    _, handle = prompted("gpt2")
    path = adapterkit.save(handle.to_adapter(), tmp_path / "a", registry=REG)
    assert adapterkit.validate(path, base=tiny_base_dirs["gpt2"], registry=REG).valid
    wrong = adapterkit.validate(path, base=tiny_base_dirs["llama"], registry=REG)
    assert not wrong.valid
