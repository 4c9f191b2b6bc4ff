"""``adapterkit train`` and adapterkit.core.train.run on tiny bases with a character tokenizer (no downloads)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import adapterkit
from adapterkit.cli.main import COMMANDS, cli
from adapterkit.core.train import data as train_data
from adapterkit.core.train import loop as train_loop
from adapterkit.core.train.run import train
from adapterkit.core.train.config import method_config, parse_targets
from adapterkit.core.io import parse_pairs
from adapterkit.core.train.data import DataError, read_jsonl
from adapterkit.testing import save_tiny_base
from train_helpers import number_rows, one_torch_thread, sentiment_rows, write_jsonl

one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)
FAST = ["--batch-size", "8", "--seed", "0"]


@pytest.fixture(scope="session")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train_bases")
    return {
        "llama": save_tiny_base("llama", root / "llama", tokenizer=True),
        # BertForSequenceClassification, 3 labels, head saved
        "bert": save_tiny_base("bert", root / "bert", tokenizer=True),
        "bare": save_tiny_base("llama", root / "bare"),
    }


@pytest.fixture(scope="session")
def numbers(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "numbers.jsonl", number_rows())


@pytest.fixture(scope="session")
def sentiment(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "sentiment.jsonl", sentiment_rows())


@pytest.fixture(autouse=True)
def _train_command(monkeypatch):
    """The command is registered in cli/main.py's COMMANDS; make sure it is while these tests run."""
    monkeypatch.setitem(COMMANDS, "train", COMMANDS.get("train", ("adapterkit.cli.train", "Train a new adapter.")))


def invoke(*args, exit_code: int | None = 0):
    result = CliRunner().invoke(cli, ["train", *map(str, args)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"adapterkit train {' '.join(map(str, args))} crashed") from result.exception
    if exit_code is not None:
        assert result.exit_code == exit_code, (result.stdout, result.stderr)
    return result


def assert_clean_error(result, *needles: str) -> None:
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def manifest(path: Path) -> dict:
    return json.loads((path / "adapter.json").read_text())


# ---- end to end ------------------------------------------------------------------------

def test_cli_trains_lora_and_saves_a_valid_adapter(bases, numbers, tmp_path):
    out = tmp_path / "lora"
    result = invoke("--base", bases["llama"], "--method", "lora", "--data", numbers, "-o", out, "--rank", "4",
                    "--alpha", "8", "--targets", "all-linear", "--max-steps", "20", "--lr", "2e-2", *FAST, "--json")
    report = json.loads(result.stdout)
    assert report["steps"] == 20 and report["path"] == str(out)
    assert report["best_val_loss"] < report["initial_val_loss"] - 0.05  # the held-out loss went down
    assert report["train_examples"] == 90 and report["val_examples"] == 10
    assert adapterkit.validate(out, base=bases["llama"]).valid
    data = manifest(out)
    assert data["method"]["name"] == "lora" and data["method"]["config"]["r"] == 4
    assert data["task"] == "causal-lm"
    training = data["provenance"]["training"]
    assert data["provenance"]["created_at"].endswith("Z")
    assert training["steps"] == 20 and training["best_val_loss"] == round(report["best_val_loss"], 6)
    assert training["data"]["sha256"] == hashlib.sha256(numbers.read_bytes()).hexdigest()
    assert training["trainable_parameters"] == report["trainable_parameters"] > 0
    assert training["evaluations"][0]["step"] == 0 and training["world_size"] == 1


@pytest.mark.parametrize(("method", "options"), [
    ("prompt", ["--num-virtual-tokens", "4", "--lr", "5e-2"]),
    ("bottleneck", ["--reduction-factor", "4", "--lr", "1e-2"]),
    ("prefix", ["--num-virtual-tokens", "4", "--lr", "1e-2"]),
    ("dora", ["--rank", "4", "--targets", "q_proj,v_proj", "--lr", "1e-2"]),
])
def test_cli_trains_other_methods(bases, numbers, tmp_path, method, options):
    out = tmp_path / method
    result = invoke("--base", bases["llama"], "--method", method, "--data", numbers, "-o", out, "--max-steps", "6",
                    "--eval-every", "3", *options, *FAST)
    assert f"Trained a {method} adapter" in result.stdout and "validation loss" in result.stdout
    assert adapterkit.validate(out, base=bases["llama"]).valid
    data = manifest(out)
    assert data["method"]["name"] == method
    assert [e["step"] for e in data["provenance"]["training"]["evaluations"]] == [0, 3, 6]


def test_quantize_trains_qlora(bases, numbers, tmp_path):
    out = tmp_path / "qlora"
    invoke("--base", bases["llama"], "--method", "lora", "--quantize", "nf4", "--rank", "4", "--data", numbers,
           "-o", out, "--max-steps", "3", "--lr", "1e-2", *FAST)
    data = manifest(out)
    assert data["method"]["name"] == "qlora"
    assert adapterkit.validate(out, base=bases["llama"]).valid


def test_best_adapter_is_saved_and_early_stopping(bases, numbers, tmp_path):
    """A learning rate far too high: the validation loss turns up, training stops, the best adapter is the saved one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = train(bases["llama"], "lora", numbers, tmp_path / "best", config={"r": 4, "alpha": 8}, lr=0.5,
                   max_steps=40, eval_every=1, patience=2, batch_size=8, seed=0, max_grad_norm=None)
    assert result.stopped_early and result.steps < 40
    assert result.best_step == result.steps - 2  # two evaluations without improvement after the best
    assert result.evaluations[-1]["val_loss"] > result.best_val_loss
    # the saved adapter, applied to a fresh base, scores exactly the best validation loss
    dataset = read_jsonl(numbers)
    tokenizer = AutoTokenizer.from_pretrained(bases["llama"])
    _, val_idx = train_data.split(len(dataset), 0.1, 0)
    rows = [train_data.encode(dataset, tokenizer, 512)[i] for i in val_idx]
    model = adapterkit.apply(adapterkit.load(result.path), AutoModelForCausalLM.from_pretrained(bases["llama"],
                                                                                                dtype=torch.float32))
    from adapterkit.core.train.dist import Dist

    loss, accuracy = train_loop.evaluate(model, rows, 8, train_data.pad_id(tokenizer), Dist())
    assert loss == pytest.approx(result.best_val_loss, abs=1e-6)
    assert accuracy == pytest.approx(result.best_val_accuracy, abs=1e-9)  # the accuracy of that same adapter
    training = manifest(result.path)["provenance"]["training"]
    assert training["stopped_early"] is True and training["best_step"] == result.best_step


# ---- classification -----------------------------------------------------------------------

def test_classification_with_the_bases_head(bases, sentiment, tmp_path):
    out = tmp_path / "cls"
    report = json.loads(invoke("--base", bases["bert"], "--method", "lora", "--rank", "4", "--data", sentiment, "-o",
                               out, "--max-steps", "30", "--lr", "5e-2", "--eval-every", "5", *FAST, "--json").stdout)
    assert report["task"] == "sequence-classification" and report["labels"] == ["neg", "neu", "pos"]
    assert report["best_val_loss"] < report["initial_val_loss"]
    evaluations = report["evaluations"]  # right examples out of the validation split, at each evaluation
    assert all(e["val_accuracy"] * report["val_examples"] == pytest.approx(
        round(e["val_accuracy"] * report["val_examples"]), abs=1e-4) for e in evaluations)
    assert report["best_val_accuracy"] == pytest.approx(
        next(e["val_accuracy"] for e in evaluations if e["step"] == report["best_step"]), abs=1e-6)
    data = manifest(out)
    assert data["task"] == "sequence-classification"
    assert data["provenance"]["training"]["labels"] == ["neg", "neu", "pos"]
    assert data["provenance"]["training"]["head"] == {"frozen": True, "source": "base"}
    assert not any("classifier" in module for module in data["targets"])  # the head is the base's, untouched
    assert adapterkit.validate(out, base=bases["bert"]).valid


def test_classification_without_a_head_needs_head_base(bases, sentiment, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    result = invoke("--base", bases["llama"], "--method", "lora", "--data", sentiment, "-o", tmp_path / "x",
                    exit_code=None)
    assert_clean_error(result, "no trained classification head", "--head-base")
    assert not (tmp_path / "x").exists()

    head, out = tmp_path / "llama-head", tmp_path / "cls"
    invoke("--base", bases["llama"], "--method", "lora", "--rank", "4", "--data", sentiment, "-o", out,
           "--head-base", head, "--max-steps", "4", "--lr", "1e-2", *FAST)
    config = json.loads((head / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "neu", "2": "pos"}
    assert (head / "tokenizer.json").is_file()
    assert adapterkit.validate(out, base=head).valid
    data = manifest(out)
    assert data["provenance"]["training"]["head"]["source"] == "new"
    assert data["base_model"]["name"] == str(head)
    # the head base reloads with the same (frozen) head every time: the adapter's outputs are reproducible
    first, second = (adapterkit.apply(adapterkit.load(out), AutoModelForSequenceClassification.from_pretrained(head))
                     for _ in range(2))
    ids = torch.tensor([[1, 40, 41, 42]])
    with torch.no_grad():
        assert torch.equal(first(input_ids=ids).logits, second(input_ids=ids).logits)


def test_label_names():
    ds = train_data.Dataset(Path("d.jsonl"), train_data.CLASSIFICATION,
                            [train_data.Example(1, "a", label=2), train_data.Example(2, "b", label=0)], "")
    assert train_data.label_names(ds) == ["0", "1", "2"]
    assert train_data.label_names(ds, ["LABEL_0", "LABEL_1", "LABEL_2", "LABEL_3"]) == ["0", "1", "2", "3"]
    named = train_data.Dataset(Path("d.jsonl"), train_data.CLASSIFICATION, [train_data.Example(4, "a", label="x")], "")
    with pytest.raises(DataError, match="d.jsonl:4"):
        train_data.label_names(named, ["neg", "pos"])


# ---- errors ---------------------------------------------------------------------------------

BAD_DATA = [
    (['{"text": "ok"}', "{not json"], 2, "not valid JSON"),
    (['[1, 2]'], 1, "not a JSON object"),
    (['{"text": "ok"}', '{"txt": "a"}'], 2, "unexpected fields"),
    (['{"text": 3}'], 1, "'text' must be a string"),
    (['{"prompt": "a", "completion": ""}'], 1, "'completion' is empty"),
    (['{"text": "a", "label": true}'], 1, "'label' must be"),
    (['{"text": "a"}', "", '{"text": "b", "label": "x"}'], 3, "sequence-classification line in a causal-lm file"),
    (['{"text": "a", "label": "x"}', '{"text": "b", "label": 1}'], 2, "labels mix strings and integers"),
    (['{"text": "ok"}', '{"prompt": "a"}'], 2, "missing field 'completion'"),
    (['{"label": "x"}'], 1, "missing field 'text'"),
    (['{}'], 1, "no fields"),
    (['{"text": "a", "label": -1}'], 1, "an integer label must be >= 0"),
]


@pytest.mark.parametrize(("lines", "line", "needle"), BAD_DATA)
def test_bad_data_names_file_and_line(tmp_path, lines, line, needle):
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    assert str(info.value).startswith(f"{path}:{line}: ") and needle in str(info.value)


def test_empty_data_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="no examples"):
        read_jsonl(path)


def test_cli_bad_data_exits_1_with_file_and_line(bases, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ['{"text": "fine"}', '{"text": "fine"}', '{"text": "x", "oops": 1}'])
    result = invoke("--base", bases["llama"], "--method", "lora", "--data", path, "-o", tmp_path / "out",
                    exit_code=None)
    assert_clean_error(result, f"{path}:3", "unexpected fields")


@pytest.mark.parametrize(("args", "needles"), [
    (["--method", "prompt", "--rank", "4"], ["--rank does not apply to method 'prompt'"]),
    (["--method", "lora", "--config", "nope=1"], ["unknown LoRA option 'nope'"]),
    (["--method", "lora", "--config", "r=0"], ["$.method.config.r", "r must be an integer >= 1"]),
    (["--method", "lora", "--config", "broken"], ["--config must be KEY=VALUE"]),
    (["--method", "prompt", "--quantize", "nf4"], ["--quantize trains on a quantised base", "use --method lora"]),
    (["--method", "nope"], ["unknown method 'nope'"]),
    (["--method", "lora", "--rank", "4", "--config", "r=8"], ["r is given twice"]),
])
def test_cli_option_errors(bases, numbers, tmp_path, args, needles):
    result = invoke("--base", bases["llama"], "--data", numbers, "-o", tmp_path / "out", *args, exit_code=None)
    assert_clean_error(result, *needles)


def test_cli_refuses_base_without_tokenizer(bases, numbers, tmp_path):
    result = invoke("--base", bases["bare"], "--method", "lora", "--data", numbers, "-o", tmp_path / "o",
                    exit_code=None)
    assert_clean_error(result, "no tokenizer")


def test_cli_refuses_existing_output_before_training(bases, numbers, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    result = invoke("--base", bases["llama"], "--method", "lora", "--data", numbers, "-o", tmp_path / "out",
                    exit_code=None)
    assert_clean_error(result, "output already exists", "--overwrite")
    assert "step" not in result.stderr  # refused before any training


def test_cli_usage_errors_exit_2(bases, numbers, tmp_path):
    assert invoke("--base", bases["llama"], "--data", numbers, "-o", tmp_path / "o", exit_code=None).exit_code == 2
    assert invoke("--base", bases["llama"], "--method", "lora", "--data", numbers, "-o", tmp_path / "o",
                  "--lr", "0", exit_code=None).exit_code == 2


def test_patience_needs_validation(bases, numbers, tmp_path):
    result = invoke("--base", bases["llama"], "--method", "lora", "--data", numbers, "-o", tmp_path / "o",
                    "--val-fraction", "0", "--patience", "2", exit_code=None)
    assert_clean_error(result, "early stopping (patience) needs validation data")


def test_train_help_does_not_import_torch():
    code = ("import sys; from click.testing import CliRunner; from adapterkit.cli.main import COMMANDS, cli; "
            "COMMANDS.setdefault('train', ('adapterkit.cli.train', '')); "
            "r = CliRunner().invoke(cli, ['train', '--help']); assert r.exit_code == 0, r.output; "
            "assert '--num-virtual-tokens' in r.output; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ---- pieces ---------------------------------------------------------------------------------

def test_split_is_seeded_and_disjoint():
    train_idx, val_idx = train_data.split(100, 0.1, seed=3)
    assert train_data.split(100, 0.1, seed=3) == (train_idx, val_idx)
    assert train_data.split(100, 0.1, seed=4) != (train_idx, val_idx)
    assert len(val_idx) == 10 and sorted(train_idx + val_idx) == list(range(100))
    assert train_data.split(5, 0.01, 0)[1] and train_data.split(5, 0, 0)[1] == []


def test_encode_masks_the_prompt(tmp_path):
    from adapterkit.testing import char_tokenizer

    tokenizer = char_tokenizer()
    ds = read_jsonl(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ab", "completion": "cd"}, {"text": "xy"}]))
    first, second = train_data.encode(ds, tokenizer, 64)
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    assert first.ids[0] == bos and first.ids[-1] == eos and len(first.ids) == 6
    assert first.targets[:3] == (train_data.IGNORE,) * 3 and first.units == 3  # "c", "d", EOS
    assert second.units == 3 and second.targets == second.ids  # "x", "y", EOS after BOS
    assert train_data.encode(ds, tokenizer, 4)[0].units == 1  # cut at 4 tokens: only "c" is left to learn


def test_parse_targets_and_pairs():
    assert parse_targets("all-linear") == "all-linear"
    assert parse_targets("q_proj, v_proj") == ["q_proj", "v_proj"]
    assert parse_targets(r".*\.(q|v)_proj") == r".*\.(q|v)_proj"
    assert parse_pairs(["r=4", "use_rslora=true", "preset=par_bn", "targets=[\"a\"]"]) == {
        "r": 4, "use_rslora": True, "preset": "par_bn", "targets": ["a"]}


def test_method_config_maps_shortcuts_through_the_schema():
    assert method_config("lora", shortcuts={"rank": 4, "alpha": 8}) == ("lora", {"r": 4, "alpha": 8})
    assert method_config("bottleneck", {"preset": "par_bn"}, shortcuts={"reduction_factor": 4}) == (
        "bottleneck", {"reduction_factor": 4, "preset": "par_bn"})
    assert method_config("lora", quantize="nf4")[0] == "qlora"


def test_lr_schedule():
    assert [train_loop.lr_factor(i, 2, 10, "constant") for i in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert train_loop.lr_factor(2, 2, 10, "linear") == 1.0 and train_loop.lr_factor(9, 2, 10, "linear") < 0.2
    assert train_loop.lr_factor(6, 2, 10, "cosine") == pytest.approx(0.5)


def test_global_batches_cover_each_epoch():
    batches = train_loop.global_batches(10, 4, seed=0)
    epoch = [next(batches) for _ in range(3)]
    assert [len(b) for b in epoch] == [4, 4, 2] and sorted(sum(epoch, [])) == list(range(10))
    assert sum([next(batches) for _ in range(3)], []) != sum(epoch, [])  # a new order each epoch


def test_gradient_checkpointing_changes_nothing_and_bf16_runs(bases, numbers):
    settings = {"config": {"r": 4}, "lr": 1e-2, "max_steps": 3, "batch_size": 8, "eval_every": 3}
    plain = train(bases["llama"], "lora", numbers, None, **settings)
    checkpointed = train(bases["llama"], "lora", numbers, None, gradient_checkpointing=True, **settings)
    for key, value in plain.adapter.tensors.items():
        assert abs(value - checkpointed.adapter.tensors[key]).max() <= 1e-6
    assert checkpointed.adapter.manifest.provenance["training"]["gradient_checkpointing"] is True
    bf16 = train(bases["llama"], "lora", numbers, None, bf16=True, **settings)
    assert bf16.adapter.manifest.provenance["training"]["precision"] == "bf16-autocast"
    assert bf16.best_val_loss < bf16.initial_val_loss
    # autocast really ran in bfloat16: the numbers moved (8 bits of mantissa), but stayed close
    drift = max(float(abs(value - bf16.adapter.tensors[key]).max()) for key, value in plain.adapter.tensors.items())
    assert 0 < drift < 5e-2
    assert bf16.initial_val_loss != plain.initial_val_loss
    assert bf16.initial_val_loss == pytest.approx(plain.initial_val_loss, rel=2e-2)


def test_gradient_checkpointing_recomputes_the_layers():
    """enable_checkpointing makes backward run the inside of each decoder layer again; the gradients are the same."""
    import torch

    from adapterkit.core.train.run import enable_checkpointing
    from adapterkit.testing import tiny_llama

    def layer_calls(checkpointing: bool) -> tuple[int, torch.Tensor]:
        model = tiny_llama(0)
        handle = adapterkit.inject(model, "lora", r=4)
        for param in model.parameters():
            param.requires_grad_(False)
        for param in handle.parameters():
            param.requires_grad_(True)
        if checkpointing:
            enable_checkpointing(model)
        calls = []
        # a pre-hook inside the checkpointed forward (torch may stop a recompute early, before a forward hook runs)
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
        model.train()
        ids = torch.arange(1, 13).reshape(2, 6)
        model(input_ids=ids).logits.float().pow(2).mean().backward()
        grads = torch.cat([p.grad.reshape(-1) for p in handle.parameters() if p.grad is not None])
        return len(calls), grads

    plain_calls, plain_grads = layer_calls(False)
    checkpointed_calls, checkpointed_grads = layer_calls(True)
    assert (plain_calls, checkpointed_calls) == (1, 2)
    assert torch.allclose(plain_grads, checkpointed_grads, atol=1e-6) and plain_grads.abs().max() > 0


def test_prefix_tuning_refuses_gradient_checkpointing_cleanly(bases, numbers, tmp_path):
    result = invoke("--base", bases["llama"], "--method", "prefix", "--data", numbers, "-o", tmp_path / "p",
                    "--max-steps", "2", "--gradient-checkpointing", *FAST, exit_code=None)
    assert_clean_error(result, "gradient checkpointing")
    assert not (tmp_path / "p").exists()


# ---- docs/methods.md: the numbers come from benchmarks/train_methods.py --------------------

def _train_methods_script():
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "train_methods.py"
    spec = importlib.util.spec_from_file_location("train_methods", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_methods_doc_has_a_real_row_for_every_built_in_method():
    """The generated table lists each method the script trains, each lowered the held-out loss, none failed."""
    script = _train_methods_script()
    text = script.DOC.read_text()
    block = text[text.index(script.BEGIN):text.index(script.END)]
    assert {m[2] for m in script.METHODS} == {"lora", "dora", "qlora", "prompt", "prefix", "bottleneck"}
    for _, label, *_ in script.METHODS:
        row = next((line for line in block.splitlines() if line.startswith(f"| {label} |")), None)
        assert row is not None, f"docs/methods.md has no row for {label}: rerun benchmarks/train_methods.py"
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert not cells[1].startswith("failed"), row
        before, after = float(cells[2]), float(cells[3].split()[0])
        assert after < before, row
    assert "load average" in block and "SmolLM2-135M" in block


def test_methods_doc_rewrite_replaces_only_the_block(tmp_path):
    script = _train_methods_script()
    doc = tmp_path / "methods.md"
    doc.write_text(f"intro\n\n{script.BEGIN}\nold\n{script.END}\n\noutro\n")
    result = {"trainable_parameters": 10, "initial_val_loss": 2.0, "best_val_loss": 1.0, "best_step": 4, "exact": 1,
              "held_out": 2, "steps": 4, "train_seconds": 3.0, "cpu_seconds": 2.0, "peak_rss_bytes": 2**20,
              "evaluations": [{"step": 0, "val_loss": 2.0}, {"step": 4, "val_loss": 1.0}]}
    script.rewrite_doc(script.table([("LoRA", result), ("Broken", {"error": "boom"})]), doc)
    text = doc.read_text()
    assert text.startswith("intro\n\n") and text.endswith("\n\noutro\n") and "old" not in text
    assert "| LoRA | 10 | 2 | 1 (4) | 1 / 2 | 4 | 3 s | 2 s | 1 MiB |" in text and "| Broken | failed: boom |" in text


def test_evaluate_counts_right_predictions():
    """evaluate's accuracy: examples whose argmax is the label (classification), completion tokens whose
    argmax is the next token (causal LM); prompt and padding positions do not count."""
    import torch
    from types import SimpleNamespace

    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, input_ids, attention_mask):
            return SimpleNamespace(logits=self.logits)

    labels = torch.tensor([0, 2, 1])
    logits = torch.tensor([[5.0, 0, 0], [0, 0, 3.0], [4.0, 1, 0]])  # right, right, wrong
    batch = {"input_ids": torch.zeros(3, 2, dtype=torch.long), "attention_mask": torch.ones(3, 2), "labels": labels}
    loss, hits = train_loop.batch_loss_and_hits(Fixed(logits), batch)
    assert hits == 2 and loss.item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item())
    # causal LM: targets[:, 1:] are scored where not IGNORE; logits at t predict targets at t + 1
    ignore = train_loop.IGNORE
    targets = torch.tensor([[ignore, ignore, 1, 2], [ignore, 0, 0, ignore]])
    lm = torch.zeros(2, 4, 3)
    lm[0, 1, 1] = lm[0, 2, 0] = 5.0  # row 0: predicts 1 (right), then 0 (wrong; 2 expected)
    lm[1, 0, 0] = lm[1, 1, 0] = 5.0  # row 1: predicts 0, 0 (both right)
    lm[1, 2, 2] = 9.0  # a padding position's prediction: not scored
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4), "targets": targets}
    _, hits = train_loop.batch_loss_and_hits(Fixed(lm), batch)
    assert hits == 3
