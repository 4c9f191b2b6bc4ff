"""``adapterkit validate``."""

from __future__ import annotations

from typing import Any

import click

from .options import format_options, parse_format_options
from .output import echo_json

from adapterkit.core.check.targets import TARGETS

#: modules listed in the text form of a load plan before "... and N more"
PLAN_ROWS = 40


@click.command("validate")
@click.argument("path", type=click.Path(path_type=str))
@click.option("--base", type=click.Path(exists=True, file_okay=False), help="Local HF model folder to check the adapter against.")
@click.option("--from", "format_", metavar="FMT", help="Format of PATH (default: detected).")
@click.option("--target", type=click.Choice(TARGETS),
              help="Also give this serving runtime's load plan: each module's fate, coverage, flags.")
@click.option("--target-version", metavar="VERSION",
              help="The runtime's release whose rules apply (default: the newest one the rules were read from).")
@click.option("--strict", is_flag=True,
              help="An adapter (or module) that changes nothing, or a --probe below the threshold, is an error.")
@click.option("--probe", is_flag=True,
              help="Run the base and the base with the adapter on a small input (needs --base, torch).")
@click.option("--probe-threshold", type=click.FloatRange(0), default=None, metavar="X",
              help="Relative logit change below which --probe says the adapter changes nothing  [default: 1e-05]")
@format_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def command(path: str, base: str | None, format_: str | None, target: str | None, target_version: str | None,
            strict: bool, probe: bool, probe_threshold: float | None, format_option: tuple[str, ...],
            as_json: bool) -> None:
    """Check an adapter: manifest schema, method config, expected tensors and
    shapes, dtypes, checksums, NaN/Inf, whether each module's update is zero,
    and with --base that every target resolves to a module of the base with
    the recorded shape, as apply resolves it (read from headers).

    With --probe (and --base), also apply the adapter to the loaded base and
    measure how far the logits move. With --target, the runtime's load plan:
    vllm, sglang, llama.cpp, mlx or onnxruntime.

    Exit status: 0 valid, 1 invalid, 2 usage error.
    """
    if target_version is not None and target is None:
        raise click.UsageError("--target-version needs --target")
    if probe and base is None:
        raise click.UsageError("--probe needs --base (the model to run)")
    if probe_threshold is not None and not probe:
        raise click.UsageError("--probe-threshold needs --probe")
    from adapterkit.core.api import validate

    report = validate(path, base=base, format=format_, target=target, target_version=target_version, strict=strict,
                      probe=probe, probe_threshold=probe_threshold, **parse_format_options(format_option))
    if as_json:
        echo_json(report.to_dict())
    else:
        status = click.style("valid", fg="green") if report.valid else click.style("invalid", fg="red")
        what = ", ".join(x for x in (report.format, report.method) if x)
        click.echo(f"{status}: {path}" + (f" ({what})" if what else ""))
        for error in report.errors:
            click.echo(f"  error: {error}")
        for warning in report.warnings:
            click.echo(f"  warning: {warning}")
        if report.probe is not None:
            _echo_probe(report.probe)
        if report.plan is not None:
            _echo_plan(report.plan)
        if report.checks:
            click.echo("  checked: " + "; ".join(report.checks))
        if report.not_checked:
            click.echo("  not checked: " + "; ".join(report.not_checked))
    raise SystemExit(0 if report.valid else 1)


def _echo_probe(probe: dict[str, Any]) -> None:
    batch, tokens = probe["inputs"]
    click.echo(f"  probe: max |change| of {probe['output']} {probe['max_abs_change']:.3g} "
               f"({probe['relative_change']:.3g} of max |base value| {probe['max_abs_base']:.3g}) "
               f"on {batch}x{tokens} tokens")


def _echo_plan(plan: dict[str, Any]) -> None:
    params = plan["parameters"]
    counts = ", ".join(f"{n} {status}" for status, n in plan["counts"].items())
    if plan["loads"]:
        unknown = " known to be applied" if plan["counts"].get("unknown") else ""
        verdict = (f"loads; coverage {100 * plan['coverage']:.1f}% ({params['applied']:,} of {params['total']:,} "
                   f"parameters{unknown})")
    else:
        verdict = f"refuses the adapter; coverage 0% (of {params['total']:,} parameters)"
    click.echo(f"  plan ({plan['label']}, reads {plan['reads']}): {verdict}; "
               f"modules: {counts or 'none'}")
    for step in plan["steps"]:
        click.echo(f"    step:  {step}")
    if plan["flags"]:
        click.echo(f"    flags: {' '.join(plan['flags'])}")
    if plan["usage"]:
        click.echo(f"    usage: {plan['usage']}")
    rows = plan["modules"]
    width = max((len(m["module"]) for m in rows[:PLAN_ROWS]), default=0)
    for item in rows[:PLAN_ROWS]:
        runtime = item["runtime_module"] or "-"
        click.echo(f"    {item['module']:<{width}}  ->  {runtime}  {item['status']}")
    if len(rows) > PLAN_ROWS:
        click.echo(f"    ... and {len(rows) - PLAN_ROWS} more modules (--json lists every one)")
