"""``validate --probe``: run the base, then the base with the adapter, on a small input; how far do the outputs move?

The tensors say whether an update is zero (:mod:`adapterkit.core.check.effect`); only a forward
pass says what the whole adapter does to the model: bottleneck layers and virtual tokens have no
capability that tells, and a module can be non-zero yet change nothing that reaches the logits.
The probe also applies the adapter exactly as :func:`adapterkit.apply` does, so anything apply
refuses is an error of the report.

Torch (imported when called).
"""

from __future__ import annotations

import inspect as _inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterkit.core.errors import AdapterkitError, UsageError
from adapterkit.core.format.adapter import Adapter
from adapterkit.core.format.report import ValidationReport

#: default relative change (max |delta logit| / max |base logit|) below which the adapter "changes nothing"
DEFAULT_THRESHOLD = 1e-5


@dataclass
class ProbeResult:
    output: str  # "logits" or "last_hidden_state"
    batch: int
    tokens: int
    max_abs_change: float
    max_abs_base: float

    @property
    def relative_change(self) -> float:
        return self.max_abs_change / self.max_abs_base if self.max_abs_base > 0 else float(self.max_abs_change > 0)

    def to_dict(self) -> dict[str, Any]:
        return {"output": self.output, "inputs": [self.batch, self.tokens], "max_abs_change": self.max_abs_change,
                "max_abs_base": self.max_abs_base, "relative_change": self.relative_change}


def run_probe(adapter: Adapter, base: str | Path, registry: Any = None, *, batch: int = 2, tokens: int = 16,
              seed: int = 0) -> ProbeResult:
    """Outputs of the base and of the base with ``adapter`` applied on ``batch x tokens`` seeded token ids."""
    require_torch()
    import torch

    from adapterkit.core.runtime.inject import apply
    from adapterkit.core.runtime.models import load_base

    model = load_base(base)
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab < 2:
        raise UsageError("the base config has no vocab_size to draw probe tokens from", file=str(base),
                         location="vocab_size", code="bad_base")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, tokens), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    name, reference = _output(model, inputs)
    apply(adapter, model, registry=registry)
    _, adapted = _output(model, inputs)
    if adapted.shape != reference.shape:  # a method that adds positions: compare the real tokens' outputs
        adapted = adapted[..., -reference.shape[-2]:, :] if adapted.dim() == reference.dim() == 3 else adapted
    if adapted.shape != reference.shape:
        raise AdapterkitError("the adapted model's output has another shape than the base's", location=name,
                              expected=list(reference.shape), found=list(adapted.shape), code="probe_shape")
    change = float((adapted.double() - reference.double()).abs().max())
    return ProbeResult(name, batch, tokens, change, float(reference.double().abs().max()))


def require_torch() -> None:
    """--probe runs the model: a clear usage error when torch or transformers is missing."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise UsageError("--probe runs the model: it needs torch and transformers", code="missing_dependency",
                         hint="pip install torch transformers, or validate without --probe") from None


def _output(model: Any, inputs: dict[str, Any]) -> tuple[str, Any]:
    import torch

    params = _inspect.signature(type(model).forward).parameters
    extra = {"use_cache": False} if "use_cache" in params else {}
    with torch.no_grad():
        out = model(**inputs, return_dict=True, **extra)
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return name, value.float()
    raise UsageError(f"{type(model).__name__} returns neither logits nor last_hidden_state", code="no_output")


def check_probe(report: ValidationReport, adapter: Adapter, base: str | Path, registry: Any,
                threshold: float = DEFAULT_THRESHOLD, strict: bool = False) -> ProbeResult | None:
    """Run the probe and add its verdict to ``report``: apply's refusals are errors; a change below
    ``threshold`` (relative to the largest base output) a warning, or an error with ``strict``."""
    require_torch()
    try:
        result = run_probe(adapter, base, registry)
    except AdapterkitError as exc:
        exc.hint = exc.hint or "adapterkit.apply refuses the adapter on this base"
        report.error(exc)
        return None
    report.probe = result.to_dict()
    report.checks.append(f"probe: base vs base + adapter on {result.batch}x{result.tokens} tokens")
    if result.relative_change < threshold:
        (report.error if strict else report.warn)(AdapterkitError(
            f"on a probe input the adapter moves the model's {result.output} by at most {result.max_abs_change:.3g} "
            f"({result.relative_change:.3g} of the largest base value): it changes (almost) nothing",
            file=report.path, location=result.output, expected=f">= {threshold:g} (relative)",
            found=f"{result.relative_change:.3g}", code="probe_no_effect",
            hint="check that the adapter was trained and saved after training" +
                 ("" if strict else "; validate --strict makes this an error")))
    return result
