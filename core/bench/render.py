"""Show a :class:`~adapterkit.core.bench.measure.BenchReport`: an aligned text report and a PNG chart.

``format_text(report)`` is what ``adapterkit bench`` prints; ``plot(report, path)``
writes the chart of ``--plot`` (matplotlib, Agg backend, imported only here and only
when called). Neither imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adapterkit.core.errors import UsageError
from adapterkit.core.io import atomic_write_bytes
from adapterkit.core.units import human_bytes as size, human_count as count


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) < 1:
        return f"{value * 1000:.1f} ms"
    return f"{value:.3f} s"


def _timing(t: Any) -> list[str]:
    return ["-", "-", "-"] if t is None else [seconds(t.min), seconds(t.median), seconds(t.max)]


def _grid(rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        out.append(indent + "  ".join(cells).rstrip())
    return out


def _overhead(result: Any, which: str) -> str:
    extra = result.overhead(which)
    if extra is None:
        return ""
    return f" ({'+' if extra >= 0 else '-'}{seconds(abs(extra))}, {100 * extra / result.base.median:+.1f} %)"


def format_text(report: Any) -> str:
    """The report for a terminal: a few aligned blocks, medians first, min and max beside them."""
    m, s, p, z = report.machine, report.settings, report.parameters, report.sizes
    config = " ".join(f"{k}={v}" for k, v in sorted(report.config.items()) if not isinstance(v, (dict, list)))
    lines = [
        f"adapterkit bench: {report.adapter} ({report.format}, {report.method} {config}".rstrip() + ")",
        f"base: {report.base}",
        f"machine: {m['cpu']}, {m['cores']} cores, {s['threads']} torch threads, torch {m['torch']}, "
        f"load average {m['load_average']}; float32; every time is the median of {s['repeats']} runs after "
        f"{s['warmup']} warm-up (min and max beside it)",
        "",
        f"parameters   adapter {count(p['adapter'])} ({_percent(p['adapter_relative_to_base'])} of the base's "
        f"{count(p['base'])}); trainable {count(p['trainable'])}",
        f"size         adapter {size(z['adapter_file_bytes'] or z['adapter_tensor_bytes'])} "
        f"({_percent(z['adapter_relative_to_base'])} of the base's {size(z['base_bytes'])})",
        f"storage      {z['copies']} full copies of this base = {size(z['full_copies_bytes'])}; "
        f"{z['copies']} adapters = {size(z['adapter_copies_bytes'])} "
        f"(one base + {z['copies']} adapters = {size(z['base_plus_adapters_bytes'])})",
        "",
        "load and apply",
    ]
    rows = [["", "median", "min", "max"]]
    for key, label in (("base_load", "load the base (from_pretrained)"), ("adapter_read", "read the adapter"),
                       ("apply", "apply onto a fresh base")):
        t = report.load.get(key)
        median, lo, hi = _timing(t)[1], _timing(t)[0], _timing(t)[2]
        rows.append([label, median, lo, hi])
    lines += _grid(rows)
    lines += ["", f"forward latency (seq-len {s['seq_len']}; overhead over the base's median)"]
    rows = [["batch", "base", "unmerged", "merged"]]
    for r in report.forward:
        merged = "cannot merge" if r.merged is None else seconds(r.merged.median) + _overhead(r, "merged")
        unmerged = seconds(r.unmerged.median) + _overhead(r, "unmerged")
        rows.append([str(r.batch), seconds(r.base.median), unmerged, merged])
        rows.append(["  min-max", f"{seconds(r.base.min)}-{seconds(r.base.max)}",
                     f"{seconds(r.unmerged.min)}-{seconds(r.unmerged.max)}",
                     "" if r.merged is None else f"{seconds(r.merged.min)}-{seconds(r.merged.max)}"])
    lines += _grid(rows)
    if report.merge_refusal:
        lines.append(f"  not merged: {report.merge_refusal}")
    t = report.train_step
    if t:
        lo, mid, hi = _timing(t["seconds"])
        memory = t.get("peak_rss_delta_bytes")
        peak = f"+{size(memory)}" if memory is not None else "not measured"
        lines += ["", f"training step (batch {t['batch']} x {t['seq_len']}, cross-entropy, backward, AdamW on "
                      f"{t['trainable_tensors']} adapter tensors): {mid} (min {lo}, max {hi}); "
                      f"peak memory {peak} over the loaded model"]
    pool = report.pool
    lines.append("")
    if pool.get("available"):
        mixed = pool["mixed_batch"]
        lo, mid, hi = _timing(pool["hot_swap"])
        lines += [
            f"adapter pool: hot-swap (pool.load of a loaded name, from the {pool['hot_swap_source']}) {mid} "
            f"(min {lo}, max {hi})",
            f"              mixed batch {mixed['rows']} x {mixed['tokens']} over {pool['slots']} slots: "
            f"{mixed['pool_tokens_per_second']:.0f} tokens/s vs the base's {mixed['base_tokens_per_second']:.0f} "
            f"({100 * mixed['overhead_fraction']:+.1f} % time)",
        ]
    else:
        lines.append(f"adapter pool: not available ({pool.get('reason')})")
    return "\n".join(lines)


def _percent(fraction: float | None) -> str:
    if fraction is None:
        return "-"
    return f"{100 * fraction:.3g} %"


# ---- the chart -------------------------------------------------------------------------------

def plot(report: Any, path: str | os.PathLike[str]) -> Path:
    """Write a PNG chart of ``report`` to ``path`` (atomically): latency bars with min-max error bars,
    the other timings, and the storage comparison."""
    import io

    try:
        from matplotlib.figure import Figure  # a Figure draws with the Agg canvas; pyplot is never imported
    except ImportError:
        raise UsageError("a chart needs matplotlib, which is not installed", file=str(path),
                         hint="pip install matplotlib (or leave out --plot)", code="missing_dependency") from None

    fig = Figure(figsize=(15, 4.8), layout="constrained")
    left, middle, right = fig.subplots(1, 3, width_ratios=[1.4, 1.1, 0.9])
    _latency_panel(left, report)
    _timings_panel(middle, report)
    _storage_panel(right, report)
    m, s = report.machine, report.settings
    fig.suptitle(f"{Path(report.adapter).name} ({report.method}) on {Path(report.base).name}  |  {m['cpu']}, "
                 f"{s['threads']} threads, torch {m['torch']}  |  median of {s['repeats']} runs, bars: min-max",
                 fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


_COLORS = {"base": "#8c8c8c", "unmerged": "#d95f02", "merged": "#1b9e77"}


def _bar(ax: Any, x: float, timing: Any, width: float, color: str, label: str | None, scale: float = 1.0) -> None:
    mid = timing.median * scale
    err = [[mid - timing.min * scale], [timing.max * scale - mid]]
    ax.bar(x, mid, width, yerr=err, capsize=3, color=color, label=label, edgecolor="black", linewidth=0.4)


def _latency_panel(ax: Any, report: Any) -> None:
    width = 0.26
    for i, r in enumerate(report.forward):
        for j, which in enumerate(("base", "unmerged", "merged")):
            timing = getattr(r, which)
            x = i + (j - 1) * width
            if timing is None:
                ax.text(x, r.base.median * 1000 * 0.05, "cannot\nmerge", ha="center", va="bottom", fontsize=7,
                        rotation=90)
                continue
            _bar(ax, x, timing, width, _COLORS[which], which if i == 0 else None, scale=1000)
            if which != "base":
                pct = 100 * r.overhead(which) / r.base.median
                ax.annotate(f"{pct:+.1f}%", (x, timing.max * 1000), textcoords="offset points", xytext=(0, 3),
                            ha="center", fontsize=7)
    ax.set_xticks(range(len(report.forward)), [f"batch {r.batch} x {r.seq_len}" for r in report.forward])
    ax.set_ylabel("forward latency (ms)")
    ax.set_title("forward: base vs adapter unmerged / merged", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.margins(y=0.15)


def _timings_panel(ax: Any, report: Any) -> None:
    items = [("load base", report.load.get("base_load")), ("read adapter", report.load.get("adapter_read")),
             ("apply", report.load.get("apply"))]
    if report.train_step:
        items.append((f"train step\n(batch {report.train_step['batch']})", report.train_step["seconds"]))
    if report.pool.get("available"):
        items.append(("hot-swap", report.pool["hot_swap"]))
    items = [(label, t) for label, t in items if t is not None]
    for i, (label, t) in enumerate(items):
        _bar(ax, i, t, 0.6, "#7570b3", None)
        ax.annotate(seconds(t.median), (i, t.max), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
    ax.set_xticks(range(len(items)), [label for label, _ in items], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("seconds (log scale)")
    ax.set_title("load, apply, train, swap", fontsize=10)
    ax.margins(y=0.2)


def _storage_panel(ax: Any, report: Any) -> None:
    z = report.sizes
    adapter = z["adapter_file_bytes"] or z["adapter_tensor_bytes"]
    items = [(f"{z['copies']} full\ncopies", z["full_copies_bytes"], "#8c8c8c"),
             (f"base +\n{z['copies']} adapters", z["base_plus_adapters_bytes"], "#1b9e77"),
             (f"{z['copies']}\nadapters", z["adapter_copies_bytes"], "#d95f02"),
             ("1 adapter", adapter, "#e6ab02")]
    from matplotlib.ticker import FuncFormatter

    for i, (label, value, color) in enumerate(items):
        ax.bar(i, value, 0.6, color=color, edgecolor="black", linewidth=0.4)
        ax.annotate(size(value), (i, value), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
    ax.set_xticks(range(len(items)), [label for label, _, _ in items], fontsize=8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: size(value)))
    ax.set_ylabel("bytes (log scale)")
    ax.set_title("storage", fontsize=10)
    ax.margins(y=0.2)
