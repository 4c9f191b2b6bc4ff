from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def _no_gpu() -> bool:
    import torch

    return not torch.cuda.is_available()


# Without a GPU the Triton kernels (tests/test_lora_triton.py) run under Triton's interpreter. It must be on
# before triton is first imported: triton.language's own @jit helpers (tl.sum, tl.zeros) are fixed then.
if "TRITON_INTERPRET" not in os.environ and _no_gpu():
    os.environ["TRITON_INTERPRET"] = "1"

from models import save_tiny  # noqa: E402

# A shell without job control starts a background job with SIGINT ignored (POSIX), and every process the tests
# start inherits that: the Ctrl-C tests (test_io, test_faults) would then see no interruption at all. The suite
# tests Python's own handling, so it restores it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_report_header(config) -> str:
    """The fuzz profile in every log, so two CI runs can be compared (docs/reliability.md)."""
    from fuzz_helpers import fuzz_banner

    return fuzz_banner()


@pytest.fixture(scope="session")
def tiny_base_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny llama / gpt2 / bert saved once per run as HF folders."""
    root = tmp_path_factory.mktemp("tiny_bases")
    return {kind: save_tiny(kind, root / kind) for kind in ("llama", "gpt2", "bert")}


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M prepared once per session into the pytest temp folder (shared by every real-model test)."""
    from adapterkit.core.demo import real_models

    return real_models.smollm2_path(tmp_path_factory.getbasetemp() / "adapterkit-cache")
