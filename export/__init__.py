"""Export targets. A target is one converter module that carries its :class:`~edgeface.export.base.TargetSpec`
(``SPEC``) and ``convert(model, out_dir, request) -> Conversion``, plus one line in :data:`TARGETS`. Names,
aliases, precisions, calibration, static sizes, option checks, the runtime that verifies a bundle, ``edgeface
export``'s help and ``bench --all``'s matrix are all read from the specs (README, "Adding a target")."""

from __future__ import annotations

import difflib
import functools
import importlib
from collections.abc import Callable
from typing import Any

from edgeface.export.base import TargetOption, TargetSpec, quiet

from edgeface.core.errors import EdgefaceError

# The registry: one converter module per target, in the order help, listings and `bench --all` show them. A module
# is imported to read its SPEC without importing its converters' libraries (they load in convert()).
TARGETS = (
    "edgeface.export.onnx",
    "edgeface.export.tflite",
    "edgeface.export.coreml",
    "edgeface.export.tensorrt",
    "edgeface.export.ncnn",
    "edgeface.export.openvino",
    "edgeface.export.executorch",
    "edgeface.export.qnn",
    "edgeface.export.rknn",
)


@functools.cache
def _registry() -> dict[str, tuple[TargetSpec, str]]:
    """target name -> (spec, module), read from :data:`TARGETS` on first use."""
    found: dict[str, tuple[TargetSpec, str]] = {}
    owner: dict[str, str] = {}
    for module_name in TARGETS:
        spec = getattr(importlib.import_module(module_name), "SPEC", None)
        if not isinstance(spec, TargetSpec):
            raise TypeError(f"{module_name} declares no SPEC (an edgeface.export.base.TargetSpec)")
        for name in (spec.name, *spec.aliases):
            if name in owner:
                raise ValueError(f"target name {name!r} of {module_name} is already {owner[name]}'s")
            owner[name] = module_name
        found[spec.name] = (spec, module_name)
    return found


def specs() -> tuple[TargetSpec, ...]:
    """Every registered target's spec, in registry order."""
    return tuple(spec for spec, _ in _registry().values())


def list_targets() -> list[str]:
    return list(_registry())


def aliases() -> dict[str, str]:
    """Platform name -> the target that serves it (``jetson`` -> ``tensorrt``)."""
    return {alias: spec.name for spec in specs() for alias in spec.aliases}


def _suggest(name: str, known: list[str], what: str) -> EdgefaceError:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return EdgefaceError(f"unknown {what} {name!r}{hint} (choose from: {', '.join(known)})")


def resolve_target(name: str) -> str:
    name = name.lower()
    if name in _registry():
        return name
    platforms = aliases()
    if name in platforms:
        return platforms[name]
    raise _suggest(name, list_targets() + list(platforms), "target")


def get_spec(target: str) -> TargetSpec:
    """The spec of a target or platform alias."""
    return _registry()[resolve_target(target)][0]


def resolve_precision(target: str, precision: str | None) -> str:
    choices = get_spec(target).precisions
    if precision is None:
        return choices[0]
    precision = precision.lower()
    if precision not in choices:
        raise _suggest(precision, list(choices), f"precision for {target}")
    return precision


def targets_taking(option: str) -> list[str]:
    """The targets that declare ``option``."""
    return [spec.name for spec in specs() if spec.option(option)]


def option_label(option: str) -> str:
    """How messages name an option: the flag of the first target that declares one, else ``option 'name'``."""
    declared = [spec.option(option) for spec in specs() if spec.option(option)]
    flags = [o.flag for o in declared if o.flag]
    return flags[0] if flags else TargetOption(option, "").label


def check_options(target: str, options: dict[str, Any]) -> None:
    """Refuse, in one line, an option ``target`` does not declare (naming the targets that take it) or a value
    its declaration does not take. Options set to None count as not given."""
    spec = get_spec(target)
    unknown = []
    for name, value in options.items():
        if value is None:
            continue
        option = spec.option(name)
        if option is not None:
            option.check(value)
            continue
        takers = targets_taking(name)
        if takers:
            raise EdgefaceError(f"{option_label(name)} is not an option of the {spec.name} target (targets that "
                                f"take it: {', '.join(takers)})")
        unknown.append(name)
    if unknown:
        own = [o.name for o in spec.options]
        close = difflib.get_close_matches(unknown[0], own, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise EdgefaceError(f"unknown {spec.title} options {sorted(unknown)}{hint} (known: "
                            f"{', '.join(own) or 'none'})")


def get_converter(target: str) -> Callable:
    """The target's ``convert(model, out_dir, request)``, run without its libraries' console output
    (:func:`edgeface.export.base.quiet`); the export pipeline reports progress itself."""
    module = _registry()[resolve_target(target)][1]

    def convert(model, out_dir, request):
        with quiet(f"{request.target} {request.precision} conversion"):
            return importlib.import_module(module).convert(model, out_dir, request)

    return convert


__all__ = ["TARGETS", "TargetOption", "TargetSpec", "aliases", "check_options", "get_converter", "get_spec",
           "list_targets", "option_label", "resolve_precision", "resolve_target", "specs", "targets_taking"]
