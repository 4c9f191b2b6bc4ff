"""``adapterkit.testing``: the conformance kit every method plugin runs.

A plugin author subclasses :class:`MethodConformance` in a test module; pytest
collects the inherited tests and runs them against tiny seeded models::

    from adapterkit.testing import MethodConformance

    class TestMyMethod(MethodConformance):
        method = "my_method"
        configs = {"llama": {"r": 4}, "gpt2": {"r": 4}, "bert": {"r": 4}}

Each test checks one clause of the method contract (docs/plugins.md):
injection trains only adapter parameters, a training step changes only them,
save -> load -> apply reproduces the outputs exactly, disabling restores the
base exactly, merge / unmerge are exact where the method declares them, and
validate accepts the saved adapter and rejects tampered files.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

MERGE_ATOL = 1e-5


# ---- tiny seeded models (built from a config, never downloaded) ------------

def tiny_llama(seed: int = 0) -> Any:
    """A 2-layer Llama with grouped-query attention (4 heads, 2 kv heads)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> Any:
    """A 2-layer GPT-2 (Conv1D projections, fused c_attn)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4)).eval()


def tiny_bert(seed: int = 0, num_labels: int = 3) -> Any:
    """A 2-layer BERT sequence classifier."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=num_labels,
    )
    return BertForSequenceClassification(config).eval()


TINY_MODELS: dict[str, Callable[..., Any]] = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def sample_inputs(seed: int = 1, batch: int = 2, length: int = 8) -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (batch, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def outputs(model: Any, inputs: Mapping[str, Any]) -> Any:
    """The model's logits under no_grad."""
    import torch

    with torch.no_grad():
        return model(**inputs).logits


def perturb(parameters: list[Any], seed: int = 0, scale: float = 0.2) -> None:
    """Give adapter parameters non-trivial values (PEFT-style zero init would prove nothing)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in parameters:
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            param.add_(noise.to(param.dtype) * scale)


def base_state(model: Any) -> dict[str, Any]:
    """Clones of every parameter and buffer that is not an adapter parameter."""
    from adapterkit.core.runtime.inject import attached

    adapter_ids = {id(p) for injected in attached(model).values() for p in injected.parameters()}
    state = {}
    for name, param in model.named_parameters():
        if id(param) not in adapter_ids:
            state[name] = param.detach().clone()
    return state


# ---- the conformance suite -------------------------------------------------

class MethodConformance:
    """Subclass with ``method`` and ``configs`` (model kind -> config) set."""

    method: ClassVar[str] = ""
    configs: ClassVar[dict[str, dict[str, Any]]] = {}
    #: model kind -> factory(seed) returning a fresh eval-mode model
    models: ClassVar[dict[str, Callable[..., Any]]] = TINY_MODELS
    registry: ClassVar[Any] = None

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:  # pragma: no cover - pytest hook
        if "kind" in metafunc.fixturenames:
            metafunc.parametrize("kind", sorted(self.configs))

    # helpers
    def _inject(self, kind: str, seed: int = 0) -> tuple[Any, Any]:
        import adapterkit

        model = self.models[kind](seed)
        handle = adapterkit.inject(model, self.method, self.configs[kind], registry=self.registry)
        return model, handle

    def _registry(self) -> Any:
        from adapterkit.core.plugin.registry import default_registry

        return self.registry or default_registry()

    def _saved(self, kind: str, folder: Path) -> tuple[Any, Any, Path]:
        import adapterkit

        model, handle = self._inject(kind)
        perturb(handle.parameters())
        path = adapterkit.save(handle.to_adapter(), folder / "adapter", registry=self._registry())
        return model, handle, path

    # the contract
    def test_method_is_registered(self) -> None:
        method = self._registry().method(self.method)
        assert method.name == self.method
        assert isinstance(method.config_schema(), dict)

    def test_only_adapter_parameters_train(self, kind: str) -> None:
        model, handle = self._inject(kind)
        adapter_params = {id(p) for p in handle.parameters()}
        assert adapter_params, "the method created no trainable parameters"
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert trainable == adapter_params, "parameters outside the adapter require grad (or adapter ones do not)"

    def test_training_step_changes_only_adapter(self, kind: str) -> None:
        import torch

        model, handle = self._inject(kind)
        perturb(handle.parameters(), seed=3, scale=0.05)
        before_base = base_state(model)
        before_adapter = [p.detach().clone() for p in handle.parameters()]
        model.train()
        optimizer = torch.optim.AdamW(handle.parameters(), lr=1e-2)
        loss = model(**sample_inputs()).logits.float().pow(2).mean()
        loss.backward()
        optimizer.step()
        model.eval()
        after_adapter = list(handle.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(before_adapter, after_adapter)), "no adapter parameter changed"
        for name, value in base_state(model).items():
            assert torch.equal(value, before_base[name]), f"base parameter {name} changed during training"

    def test_save_load_apply_identity(self, kind: str, tmp_path: Path) -> None:
        import torch

        import adapterkit

        model, _, path = self._saved(kind, tmp_path)
        inputs = sample_inputs()
        expected = outputs(model, inputs)
        fresh = adapterkit.apply(adapterkit.load(path, registry=self._registry()), self.models[kind](0),
                                 registry=self._registry())
        got = outputs(fresh, inputs)
        assert torch.equal(got, expected), f"max abs diff {(got - expected).abs().max().item():.3g} after reload"

    def test_disable_restores_base(self, kind: str) -> None:
        import torch

        inputs = sample_inputs()
        base_out = outputs(self.models[kind](0), inputs)
        model, handle = self._inject(kind)
        perturb(handle.parameters())
        assert not torch.equal(outputs(model, inputs), base_out), "the adapter does not change the output"
        with handle.disabled():
            assert torch.equal(outputs(model, inputs), base_out), "disabled adapter changes the output"

    def test_merge_or_refusal(self, kind: str) -> None:
        import torch

        model, handle = self._inject(kind)
        perturb(handle.parameters())
        inputs = sample_inputs()
        method = self._registry().method(self.method)
        from adapterkit.core.plugin.capabilities import can_merge

        if not can_merge(method):
            assert method.merge_refusal(handle.config), "a non-mergeable method must say why it cannot merge"
            from adapterkit.core.errors import AdapterkitError

            with pytest.raises((NotImplementedError, AdapterkitError)):
                handle.merge()
            return
        unmerged = outputs(model, inputs)
        original = base_state(model)
        handle.merge()
        merged = outputs(model, inputs)
        assert (merged - unmerged).abs().max().item() <= MERGE_ATOL, "merged output differs from unmerged"
        handle.merged = False  # a second merge must be a no-op at the method level too
        method.merge(model, handle.name)
        handle.merged = True
        assert (outputs(model, inputs) - unmerged).abs().max().item() <= MERGE_ATOL, "merging twice is not idempotent"
        handle.unmerge()
        for name, value in base_state(model).items():
            assert torch.equal(value, original[name]), f"unmerge did not restore {name} exactly"

    def test_validate_accepts_saved_and_rejects_tampered(self, kind: str, tmp_path: Path) -> None:
        import adapterkit
        from adapterkit.core.format import safetensors_io

        _, _, path = self._saved(kind, tmp_path)
        report = adapterkit.validate(path, registry=self._registry())
        assert report.valid, [str(e) for e in report.errors]
        # 1. one flipped byte in the tensor data: the checksum must catch it
        manifest = json.loads((path / "adapter.json").read_text())
        tensor_file = path / next(iter(manifest["tensors"]))
        data = bytearray(tensor_file.read_bytes())
        data[-3] ^= 0xFF
        tensor_file.write_bytes(bytes(data))
        assert not adapterkit.validate(path, registry=self._registry()).valid, "a flipped byte went unnoticed"
        # 2. a tensor of the wrong shape with a matching checksum: the shape check must catch it
        data[-3] ^= 0xFF
        tensor_file.write_bytes(bytes(data))
        tensors, metadata = safetensors_io.load(tensor_file)
        key = sorted(tensors)[0]
        tensors[key] = tensors[key].reshape(-1)[:-1].copy() if tensors[key].size > 1 else tensors[key].repeat(2)
        blob = safetensors_io.serialize(tensors, metadata)
        tensor_file.write_bytes(blob)
        import hashlib

        manifest["tensors"][tensor_file.name] = {"sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)}
        (path / "adapter.json").write_text(json.dumps(manifest))
        report = adapterkit.validate(path, registry=self._registry())
        assert not report.valid and any(key in str(e) for e in report.errors), "a wrong tensor shape went unnoticed"


# ---- PEFT interop: a method plugin's `peft` codec against PEFT itself -------

#: the special tokens of :func:`char_tokenizer` (ids 0-3)
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


def char_tokenizer() -> Any:
    """A character-level fast tokenizer inside the tiny models' vocabulary of 128 (no downloads): the 4
    :data:`SPECIALS` then printable ASCII (99 ids); every text gets ``<bos>`` in front."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIALS, *(chr(c) for c in range(32, 127))])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def save_tiny_base(kind: str, folder: Path, seed: int = 0, models: Mapping[str, Callable[..., Any]] | None = None,
                   tokenizer: bool = False, **model_kwargs: Any) -> Path:
    """A tiny seeded model of :data:`TINY_MODELS` (or ``models``) saved as a Hugging Face folder; with
    ``tokenizer``, :func:`char_tokenizer` is saved beside it (what ``adapterkit train`` needs)."""
    (models or TINY_MODELS)[kind](seed, **model_kwargs).save_pretrained(folder)
    if tokenizer:
        char_tokenizer().save_pretrained(folder)
    return Path(folder)


def run_cli(*args: str, python: str | None = None, env: Mapping[str, str] | None = None, timeout: float = 300,
            cwd: str | Path | None = None) -> Any:
    """``python -m adapterkit ARGS`` in a subprocess, as a user runs it (the installed plugins, offline, one
    thread, ``ADAPTERKIT_PLUGINS`` removed); ``env`` adds variables. Returns the ``CompletedProcess``."""
    import os
    import subprocess
    import sys

    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("ADAPTERKIT_PLUGINS", None)
    return subprocess.run([python or sys.executable, "-m", "adapterkit", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd)


class PeftInterop:
    """Subclass with ``method`` and ``peft_configs`` (model kind -> factory of a PEFT config) to check a method's
    ``peft`` codec against the installed PEFT on tiny seeded models::

        class TestLohaPeft(PeftInterop):
            method = "loha"
            peft_configs = {"llama": lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])}

    For each kind: PEFT's own folder (every trainable adapter parameter filled with seeded noise,
    :meth:`randomize`) read by adapterkit and applied gives PEFT's logits; the folder adapterkit
    writes from it loads in PEFT with the same logits; peft -> adapterkit -> peft -> adapterkit is
    exact; ``adapterkit merge`` gives the weights of PEFT's ``merge_and_unload``. With ``configs``
    (kind -> adapterkit config, as :class:`MethodConformance` has), an adapter made by adapterkit
    itself is also written as a PEFT folder and loaded in PEFT. Reading always passes the saved
    tiny base (``base=``).
    """

    method: ClassVar[str] = ""
    peft_configs: ClassVar[dict[str, Callable[[], Any]]] = {}
    configs: ClassVar[dict[str, dict[str, Any]]] = {}
    models: ClassVar[dict[str, Callable[..., Any]]] = TINY_MODELS
    registry: ClassVar[Any] = None
    #: the largest float32 difference of logits and merged weights allowed
    atol: ClassVar[float] = 1e-5
    #: the scale of the seeded noise :meth:`randomize` adds
    noise: ClassVar[float] = 0.2
    #: whether the codec refuses a config field it does not know (``PeftReadContext.refuse_unknown_fields``)
    refuses_unknown_fields: ClassVar[bool] = True

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:  # pragma: no cover - pytest hook
        if "kind" in metafunc.fixturenames:
            metafunc.parametrize("kind", sorted(self.peft_configs))

    def randomize(self, peft_model: Any, seed: int) -> None:
        """Give every trainable parameter of the PEFT model seeded noise (PEFT zero-initialises parts)."""
        perturb([p for p in peft_model.parameters() if p.requires_grad], seed=seed, scale=self.noise)

    # helpers
    def _registry(self) -> Any:
        from adapterkit.core.plugin.registry import default_registry

        return self.registry or default_registry()

    def _peft_folder(self, kind: str, root: Path, seed: int = 7) -> tuple[Path, Path, Any]:
        """(tiny base folder, PEFT's saved adapter folder, PEFT's logits)."""
        import peft

        base = save_tiny_base(kind, root / "base", models=self.models)
        model = peft.get_peft_model(self.models[kind](0), self.peft_configs[kind]())
        self.randomize(model, seed)
        model.eval()
        logits = outputs(model, sample_inputs())
        model.save_pretrained(root / "peft")
        return base, root / "peft", logits

    def _applied(self, kind: str, adapter: Any) -> Any:
        import adapterkit

        return outputs(adapterkit.apply(adapter, self.models[kind](0), registry=self._registry()), sample_inputs())

    def _peft_logits(self, kind: str, folder: Path) -> Any:
        import peft

        return outputs(peft.PeftModel.from_pretrained(self.models[kind](0), str(folder)).eval(), sample_inputs())

    def _load(self, path: Path, base: Path) -> Any:
        import adapterkit

        return adapterkit.load(path, base=base, registry=self._registry())

    # the checks
    def test_peft_folder_applies_with_peft_logits(self, kind: str, tmp_path: Path) -> None:
        base, folder, theirs = self._peft_folder(kind, tmp_path)
        adapter = self._load(folder, base)
        assert adapter.method == self.method, f"read as {adapter.method!r}"
        diff = (self._applied(kind, adapter) - theirs).abs().max().item()
        assert diff <= self.atol, f"max abs diff {diff:.3g} from PEFT's logits"

    def test_written_folder_loads_in_peft_with_the_same_logits(self, kind: str, tmp_path: Path) -> None:
        import adapterkit

        base, folder, theirs = self._peft_folder(kind, tmp_path)
        adapter = self._load(folder, base)
        native = adapterkit.save(adapter, tmp_path / "native", registry=self._registry())
        written = adapterkit.convert(native, tmp_path / "written", to="peft", base=base, registry=self._registry())
        diff = (self._peft_logits(kind, written) - theirs).abs().max().item()
        assert diff <= self.atol, f"PEFT loading our folder: max abs diff {diff:.3g} from its own logits"
        if kind in self.configs:  # an adapter adapterkit made itself, with no PEFT config to start from
            model = self.models[kind](0)
            handle = adapterkit.inject(model, self.method, self.configs[kind], registry=self._registry())
            perturb(handle.parameters(), seed=11, scale=self.noise)
            ours = outputs(model, sample_inputs())
            made = adapterkit.save(handle.to_adapter(), tmp_path / "made", registry=self._registry())
            written = adapterkit.convert(made, tmp_path / "made-peft", to="peft", base=base, registry=self._registry())
            diff = (self._peft_logits(kind, written) - ours).abs().max().item()
            assert diff <= self.atol, f"PEFT loading an adapterkit-made adapter: max abs diff {diff:.3g}"

    def test_round_trip_is_exact(self, kind: str, tmp_path: Path) -> None:
        import adapterkit

        base, folder, _ = self._peft_folder(kind, tmp_path)
        one = self._load(folder, base)
        native = adapterkit.save(one, tmp_path / "one", registry=self._registry())
        again = adapterkit.convert(native, tmp_path / "again", to="peft", base=base, registry=self._registry())
        two = self._load(again, base)
        assert one.targets == two.targets
        assert sorted(one.tensors) == sorted(two.tensors)
        for key, value in one.tensors.items():
            assert value.dtype == two.tensors[key].dtype and value.tobytes() == two.tensors[key].tobytes(), key

    def test_a_config_field_the_codec_does_not_know_is_refused(self, kind: str, tmp_path: Path) -> None:
        """A set field of another PEFT release (here a made-up one) is refused at its JSON path, not dropped; a
        codec declared with ``refuses_unknown_fields = False`` reads the folder exactly as without the field."""
        import adapterkit

        base, folder, _ = self._peft_folder(kind, tmp_path)
        before = self._load(folder, base)
        config = json.loads((folder / "adapter_config.json").read_text("utf-8"))
        config["field_of_a_later_peft"] = {"enabled": True}
        (folder / "adapter_config.json").write_text(json.dumps(config), "utf-8")
        if not self.refuses_unknown_fields:
            after = self._load(folder, base)
            assert after.targets == before.targets and after.config == before.config
            assert all(after.tensors[k].tobytes() == v.tobytes() for k, v in before.tensors.items())
            return
        with pytest.raises(adapterkit.LossyConversionError) as caught:
            self._load(folder, base)
        assert caught.value.code == "unsupported" and caught.value.location == "$.field_of_a_later_peft"

    def test_merge_equals_peft_merge_and_unload(self, kind: str, tmp_path: Path) -> None:
        import peft

        import adapterkit
        from adapterkit.core.format import safetensors_io

        base, folder, _ = self._peft_folder(kind, tmp_path)
        out = adapterkit.merge(self._load(folder, base), base, tmp_path / "merged", registry=self._registry())
        ours: dict[str, Any] = {}
        for file in sorted(Path(out).glob("*.safetensors")):
            ours.update(safetensors_io.load(file)[0])
        merged = peft.PeftModel.from_pretrained(self.models[kind](0), str(folder)).merge_and_unload()
        theirs = {k: v.detach().float().numpy() for k, v in merged.state_dict().items()}
        compared = 0
        for key, value in theirs.items():
            if key not in ours:
                continue
            diff = float(abs(ours[key].astype("float32") - value).max()) if value.size else 0.0
            assert diff <= self.atol, f"{key}: merged weight max abs diff {diff:.3g} from PEFT's merge_and_unload"
            compared += 1
        assert compared >= len(theirs) - 2, f"only {compared} of {len(theirs)} merged tensors were compared"


def delta_weights(adapter: Any, registry: Any = None) -> dict[str, np.ndarray]:
    """module -> the adapter's delta weight (float32, in the stored orientation), from its method's
    :class:`adapterkit.DeltaWeight` capability."""
    from adapterkit.core.plugin.registry import default_registry

    method = (registry or default_registry()).method(adapter.method)
    return {module: method.delta_weight(module, target, adapter.manifest.config, adapter.module_tensors(module))
            for module, target in adapter.targets.items()}


@functools.cache
def _lycoris_names() -> dict[str, str]:
    """LyCORIS' kohya name of each module of the tiny Llama's layers (its inner ``model`` as the text encoder)."""
    return {"lora_te_" + m[len("model."):].replace(".", "_"): m
            for m, _ in TINY_MODELS["llama"](0).named_modules() if m.startswith("model.layers.")}


class LycorisJudge:
    """LyCORIS itself (the ``lycoris-lora`` package, imported on first use) as the judge of a ``kohya`` codec, on
    the tiny Llama whose inner ``model`` plays a text encoder (its attention and MLP linear layers, 14 modules)::

        with LycorisJudge(tmp_path) as judge:
            model, net = judge.network("loha", r=2, alpha=3.0)  # LyCORIS' network, applied, every weight random
            net.save_weights(str(file), torch.float32, {"ss_network_module": "lycoris.kohya"})
            adapter = adapterkit.load(file, base=judge.base)
            ours = delta_weights(adapter)
            for lora in net.text_encoder_loras:
                assert abs(ours[judge.module_of(lora.lora_name)] - judge.forward_delta(lora)).max() <= 1e-5

    It saves the tiny base under ``root``, runs torch on one thread, and restores the class-level preset state
    ``create_network`` overwrites in LyCORIS when it is left.
    """

    #: the LyCORIS preset: attention and MLP blocks of the text encoder, nothing else
    PRESET = ('enable_conv = false\nunet_target_module = []\nunet_target_name = []\n'
              'text_encoder_target_module = ["LlamaAttention", "LlamaMLP"]\ntext_encoder_target_name = []\n')
    _PRESET_ATTRS = ("ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
                     "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME", "MODULE_ALGO_MAP",
                     "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")

    def __init__(self, root: Path) -> None:
        import torch
        import lycoris.kohya

        self.kohya = lycoris.kohya
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "preset.toml").write_text(self.PRESET, "utf-8")
        #: the tiny Llama saved as a Hugging Face folder (``base=`` of the reads)
        self.base = save_tiny_base("llama", self.root / "base")
        cls = self.kohya.LycorisNetworkKohya
        self._saved = {a: getattr(cls, a) for a in self._PRESET_ATTRS if hasattr(cls, a)}
        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __enter__(self) -> LycorisJudge:
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        for attr, value in self._saved.items():
            setattr(self.kohya.LycorisNetworkKohya, attr, value)
        torch.set_num_threads(self._threads)

    def network(self, algo: str, r: int, alpha: float, seed: int = 0, scale: float = 0.3, **kwargs: Any) -> tuple[Any, Any]:
        """``(model, net)``: LyCORIS' kohya network of ``algo`` (``"loha"``, ``"lokr"``, ...) with ``kwargs`` as its
        network args, applied to a fresh tiny Llama, every parameter seeded noise (LyCORIS zero-inits parts)."""
        import torch

        model, unet = TINY_MODELS["llama"](0), torch.nn.Module()
        net = self.kohya.create_network(1.0, r, alpha, None, model.model, unet, algo=algo,
                                        preset=str(self.root / "preset.toml"), **kwargs)
        net.apply_to(model.model, unet, apply_text_encoder=True, apply_unet=False)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * scale)
        return model, net

    def loaded(self, file: Path) -> tuple[Any, Any]:
        """``(model, net)``: the kohya file as LyCORIS loads it (``create_network_from_weights``), applied to a fresh
        tiny Llama."""
        import torch

        model, unet = TINY_MODELS["llama"](0), torch.nn.Module()
        net, _ = self.kohya.create_network_from_weights(1.0, str(file), None, model.model, unet)
        net.apply_to(model.model, unet, apply_text_encoder=True, apply_unet=False)
        return model, net

    @staticmethod
    def module_of(lora_name: str) -> str:
        """The tiny Llama module LyCORIS names ``lora_name`` (``lora_te_layers_0_self_attn_q_proj``)."""
        return _lycoris_names()[lora_name]

    @staticmethod
    def forward_delta(lora: Any) -> np.ndarray:
        """The delta weight ``[out, in]`` LyCORIS' forward applies: ``lora(I) - I @ W^T``, transposed."""
        import torch

        eye = torch.eye(lora.shape[1])
        with torch.no_grad():
            return (lora(eye) - torch.nn.functional.linear(eye, lora.org_weight)).T.numpy()
