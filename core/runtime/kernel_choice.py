"""Which kernel a mixed batch of the adapter pool runs: the torch gather path or the Triton kernels.

Measured on an H200 (docs/runtime.md, "Numbers"): launched from eager PyTorch, Triton's
per-launch Python cost makes its kernels slower than the torch gather path, and for a prefill
the gather path is as fast or faster; inside a CUDA graph (``pool.compile()``) the Triton BGMV
kernel is the faster decode step. So ``kernel="auto"`` runs Triton only for the decode-sized
batches (at most ``BGMV_MAX_T`` token rows) of a compiled call on CUDA, and gather otherwise.
Torch-free at import; Triton is imported only to check that it is there.
"""

from __future__ import annotations

import sys
from typing import Any

from adapterkit.core.errors import UsageError

KERNELS = ("auto", "gather", "triton")
RETIRED_KERNELS = {"segment": "the segment kernel was retired: its loop over the adapters in a batch collapsed as "
                              "they grew (8.6 s against 0.61 s for 32 decoded tokens at 512 adapters on an H200); "
                              "the Triton kernels group rows by adapter in one launch on CUDA"}
_AVAILABLE: list[bool] = []  # whether the Triton kernels import (checked once per process)


def check_kernel(value: str) -> str:
    """``value`` if it names a kernel; a ``bad_option`` UsageError otherwise (with the reason for a retired one)."""
    if value in RETIRED_KERNELS:
        raise UsageError(RETIRED_KERNELS[value], expected=list(KERNELS), found=value, hint='use kernel="auto"',
                         code="bad_option")
    if value not in KERNELS:
        raise UsageError("unknown kernel", expected=list(KERNELS), found=value, code="bad_option")
    return value


def triton_available() -> bool:
    if not _AVAILABLE:
        try:
            from adapterkit.core.runtime import lora_triton  # noqa: F401  (registers torch.ops.adapterkit.lora_add)
            _AVAILABLE.append(True)
        except ImportError:
            _AVAILABLE.append(False)
    return _AVAILABLE[0]


def triton_tokens(kernel: str, device: Any, compiled: bool) -> int:
    """Up to how many token rows a mixed batch runs the Triton kernels (0: the torch gather path).

    ``auto``: decode-sized batches of a compiled call on CUDA; ``gather``: never; ``triton``:
    always (CUDA, or the CPU under ``TRITON_INTERPRET=1``), refused when it cannot run.
    """
    if kernel == "gather":
        return 0
    if kernel == "auto":
        if not (compiled and device.type == "cuda" and triton_available()):
            return 0
        from adapterkit.core.runtime.lora_triton import BGMV_MAX_T

        return BGMV_MAX_T
    if not triton_available():
        raise UsageError('kernel="triton" needs the triton package', hint='pip install triton, or use kernel="auto"',
                         code="bad_option")
    from adapterkit.core.runtime.lora_triton import interpreting

    if device.type != "cuda" and not interpreting():
        raise UsageError(f'kernel="triton" runs on CUDA devices; this pool is on {device}',
                         hint='use kernel="auto" (or TRITON_INTERPRET=1 to check the kernels on the CPU)',
                         code="bad_option")
    return sys.maxsize


def describe(kernel: str, device: Any) -> str:
    """What a mixed batch runs, in words (``pool.summary()["mixed_kernel"]``)."""
    if triton_tokens(kernel, device, compiled=False):
        return "triton"
    if triton_tokens(kernel, device, compiled=True):
        return "gather; triton for compiled decode steps"
    return "gather"
