from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from models import save_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_base_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny llama / gpt2 / bert saved once per run as HF folders."""
    root = tmp_path_factory.mktemp("tiny_bases")
    return {kind: save_tiny(kind, root / kind) for kind in ("llama", "gpt2", "bert")}


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M prepared once per session into the pytest temp folder (shared by every real-model test)."""
    from adapterkit.core import real_models

    return real_models.smollm2_path(tmp_path_factory.getbasetemp() / "adapterkit-cache")
