"""The public, torch-free API: detect, load, save, validate, convert, inspect.

Every CLI command is a thin layer over one of these functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapterkit.core.errors import AdapterkitError, FormatError, UsageError
from adapterkit.core.format.adapter import Adapter
from adapterkit.core.io import atomic_directory, atomic_file
from adapterkit.core.plugin.registry import Registry, default_registry
from adapterkit.core.store.consistency import require_consistent


def detect_format(path: str | Path, registry: Registry | None = None) -> str:
    """The name of the format whose detector recognises ``path``."""
    registry = registry or default_registry()
    path = Path(path)
    if not path.exists():
        raise FormatError("path not found", file=str(path), code="missing_file")
    matches = []
    for name, fmt in registry.formats.items():
        try:
            if fmt.detect(path):
                matches.append(name)
        except Exception:  # a detector must not break detection of the others
            continue
    if not matches:
        from adapterkit.core.format.composition import is_composition

        if is_composition(path):
            raise FormatError(
                "this is a runtime composition folder (composition.json), not an adapter", file=str(path),
                code="composition_not_adapter",
                hint="validate and inspect take it; adapterkit.apply_composition runs it on a model; to make "
                     "one adapter of its members, run adapterkit compose --strategy on the adapters it lists")
        hint = "pass --from FORMAT, or install the plugin for this format"
        if registry.failures:
            names = ", ".join(info.name for info in registry.failures)
            hint += f"; note that plugin(s) {names} failed to load (adapterkit plugins shows why)"
        raise FormatError(
            "no installed format recognises this path", file=str(path), expected=sorted(registry.formats),
            hint=hint, code="unknown_format",
        )
    if "adapterkit" in matches:
        return "adapterkit"
    if len(matches) > 1:
        raise FormatError("several formats recognise this path", file=str(path), found=matches,
                          hint="pass --from FORMAT to choose", code="ambiguous_format")
    return matches[0]


def load(path: str | Path, format: str | None = None, *, base: str | Path | None = None,
         registry: Registry | None = None, **options: Any) -> Adapter:
    """Read an adapter in any installed format (auto-detected) into the canonical layout.

    ``base`` (a local HF model folder) goes to the reader when it takes one (torchtune, PEFT prompt
    tuning, ... need the base's config or module names) and is ignored otherwise.
    """
    registry = registry or default_registry()
    path = Path(path)
    name = format or detect_format(path, registry)
    fmt = registry.format(name)
    if not fmt.can_read:
        raise FormatError(f"format {name!r} cannot be read", file=str(path), code="unsupported")
    if base is not None and takes_option(fmt.read_options, "base"):
        options.setdefault("base", base)
    adapter = fmt.read(path, registry=registry, **options)
    require_consistent(adapter, registry, str(path), reader=name)  # a safety net under third-party readers too
    adapter.source, adapter.source_format = path, name
    return adapter


def save(
    adapter: Adapter,
    out_dir: str | Path,
    format: str = "adapterkit",
    *,
    overwrite: bool = False,
    registry: Registry | None = None,
    **options: Any,
) -> Path:
    """Write ``adapter`` as a folder in ``format``, atomically (all or nothing)."""
    registry = registry or default_registry()
    fmt = registry.format(format)
    if not fmt.can_write:
        raise FormatError(f"format {format!r} cannot be written", file=str(out_dir), code="unsupported")
    out_dir = Path(out_dir)
    if is_single_file(fmt, out_dir):
        filename = options.get("filename")
        if filename not in (None, out_dir.name):
            raise UsageError(f"the output {out_dir} is a {fmt.file_suffix} file, and the filename option names "
                             "another one", location="filename", expected=out_dir.name, found=filename,
                             hint="drop -O filename=..., or give a folder as the output", code="bad_option")
        if not takes_option(fmt.write_options, "filename"):
            raise FormatError(f"format {fmt.name!r} declares single files ({fmt.file_suffix}) but its writer takes "
                              "no filename option", file=str(out_dir), code="unsupported",
                              hint="write to a folder, or fix the format plugin")
        with atomic_file(out_dir, overwrite=overwrite) as tmp:
            _write(fmt, adapter, tmp, out_dir, registry, {**options, "filename": out_dir.name})
        return out_dir
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        _write(fmt, adapter, tmp, out_dir, registry, options)
    return out_dir


def is_single_file(fmt: Any, out: Path) -> bool:
    """Whether ``out`` names the one file of a single-file format (``a.gguf`` for gguf), not a folder."""
    suffix = getattr(fmt, "file_suffix", None)
    return bool(suffix) and out.name.endswith(suffix) and len(out.name) > len(suffix) and not out.is_dir()


def takes_option(declared: tuple[str, ...] | None, key: str) -> bool:
    """Whether a reader / writer declaring ``declared`` options takes ``key`` (None: undeclared, takes any)."""
    return declared is None or key in declared


def _write(fmt: Any, adapter: Adapter, tmp: Path, out: Path, registry: Registry, options: dict[str, Any]) -> None:
    try:
        fmt.write(adapter, tmp, registry=registry, **options)
    except AdapterkitError as exc:  # name the destination, not the temporary folder
        for temporary, real in ((str(tmp / out.name), str(out)), (str(tmp), str(out))):
            if exc.file and temporary in exc.file:
                exc.file = exc.file.replace(temporary, real)
                break
        raise


def convert(
    src: str | Path,
    dst: str | Path,
    to: str,
    *,
    from_format: str | None = None,
    base: str | Path | None = None,
    overwrite: bool = False,
    registry: Registry | None = None,
    **options: Any,
) -> Path:
    """Read ``src`` (any format) and write it to ``dst`` in format ``to``.

    Each option goes to the reader and / or the writer that declares it
    (``Format.read_options`` / ``write_options``); an option neither takes is an error.
    ``base`` (a local HF model folder) goes to whichever of the two takes a base, and is
    not needed when neither does.
    """
    registry = registry or default_registry()
    source = registry.format(from_format or detect_format(src, registry))
    target = registry.format(to)
    read_opts, write_opts = route_options(options, source, target)
    if base is not None and takes_option(target.write_options, "base"):
        write_opts.setdefault("base", base)
    adapter = load(src, source.name, base=base, registry=registry, **read_opts)
    return save(adapter, dst, to, overwrite=overwrite, registry=registry, **write_opts)


def route_options(options: dict[str, Any], source: Any, target: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split options between a reader and a writer by the names each declares."""

    read_opts = {k: v for k, v in options.items() if takes_option(source.read_options, k)}
    write_opts = {k: v for k, v in options.items() if takes_option(target.write_options, k)}
    unused = sorted(set(options) - set(read_opts) - set(write_opts))
    if unused:
        known = sorted({*(source.read_options or ()), *(target.write_options or ())})
        raise UsageError(
            f"option {unused[0]!r} is taken by neither the {source.name} reader nor the {target.name} writer",
            expected=known, found=unused, hint="check the spelling (docs/cli.md, Conventions, lists each format's options)",
            code="bad_option",
        )
    return read_opts, write_opts
