"""Every registered target and runtime passes one contract battery. The tests loop over the registries
(:data:`edgeface.export.TARGETS`, :data:`edgeface.runtimes.RUNTIMES`), never over a hand-kept list, so a new
target or runtime is checked by adding its registry line. Also: option validation, derived from the specs, in the
API and on the command line."""

from __future__ import annotations

import importlib
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from edgeface.benchmarks.matrix import all_artifacts
from edgeface.boards.profiles import list_boards
from edgeface.export import (
    TARGETS,
    TargetOption,
    TargetSpec,
    aliases,
    check_options,
    get_spec,
    list_targets,
    specs,
    targets_taking,
)
from edgeface.runtimes import (
    RUNTIMES,
    default_runtimes,
    get_runtime_class,
    list_runtimes,
    open_runtime,
    runtimes_for,
    runtimes_taking,
)

from edgeface import EdgefaceError
from edgeface.cli import build_parser, main
from edgeface.core.manifest import MODEL_SUFFIX
from edgeface.core.processing import ResizePolicy

REPO = Path(__file__).resolve().parents[1]
EXTRAS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
SCHEMA = json.loads((REPO / "edgeface" / "core" / "schemas" / "manifest-v1.schema.json").read_text())
FLAG = re.compile(r"--[a-z0-9]+(-[a-z0-9]+)*")


def _module_of(target: str):
    return next(importlib.import_module(m) for m in TARGETS if importlib.import_module(m).SPEC.name == target)


def _subcommand_help(name: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices[name].format_help()


def _heavy_modules() -> list[str]:
    """Import names of every library a target or runtime declares, and PyTorch: reading the registries must load
    none of them."""
    names = {"torch"}
    names |= {lib for spec in specs() for lib in spec.libraries}
    names |= {lib for name in list_runtimes() for lib in get_runtime_class(name).libraries}
    return sorted(n.replace("-", "_") for n in names)


# --- targets ------------------------------------------------------------------------------------------------------


def test_the_registry_has_one_line_per_target():
    assert len(TARGETS) == len(set(TARGETS)) == len(list_targets()) >= 1
    assert list_targets() == [spec.name for spec in specs()]


@pytest.mark.parametrize("target", list_targets())
def test_target_spec_is_complete_and_consistent(target):
    spec = get_spec(target)
    module = _module_of(target)
    assert isinstance(spec, TargetSpec) and spec.name == target and spec.title
    assert callable(module.convert) and list(inspect.signature(module.convert).parameters)[:3] == [
        "model", "out_dir", "request"]
    # precisions: the default first, each one the bundle format can state
    assert spec.precisions and set(spec.precisions) <= set(SCHEMA["properties"]["precision"]["enum"])
    assert set(spec.calibrated) <= set(spec.precisions)
    # the bundle format knows the target (a new file format is a schema change, see README "Adding a target")
    assert target in SCHEMA["properties"]["target"]["enum"] and target in MODEL_SUFFIX
    assert spec.static_only is None or spec.static_only.strip()
    assert spec.libraries and all(re.fullmatch(r"[a-z0-9][a-z0-9-]*", lib) for lib in spec.libraries)
    # bench --all measures it, at sizes it takes
    assert spec.bench, f"{target} has no `bench --all` entry"
    for precision, size in spec.bench:
        assert precision in spec.precisions
        assert size is not None or spec.dynamic
        if size is not None:
            ResizePolicy.parse(f"fixed:{size[0]}x{size[1]}")
    # serialisable (edgeface's own listings, reports)
    assert json.loads(json.dumps(spec.to_dict()))["name"] == target


@pytest.mark.parametrize("target", list_targets())
def test_target_aliases_are_its_own(target):
    spec = get_spec(target)
    others = [s for s in specs() if s.name != target]
    taken = {s.name for s in others} | {a for s in others for a in s.aliases}
    assert not ({target, *spec.aliases} & taken)
    assert all(get_spec(alias) is spec for alias in spec.aliases)
    assert {a: t for a, t in aliases().items() if t == target} == dict.fromkeys(spec.aliases, target)


@pytest.mark.parametrize("target", list_targets())
def test_target_runtime_is_registered_and_runs_it(target):
    spec = get_spec(target)
    for runtime in {spec.runtime, spec.runtime_here}:
        assert runtime in list_runtimes() and target in get_runtime_class(runtime).targets
        assert runtime in runtimes_for(target)
    assert default_runtimes()[target] == spec.runtime  # what Detector opens its bundles with


@pytest.mark.parametrize("target", list_targets())
def test_target_extra_is_in_pyproject(target):
    assert get_spec(target).extra in EXTRAS


@pytest.mark.parametrize("target", list_targets())
def test_target_options_are_documented_in_the_cli_help(target):
    text = _subcommand_help("export")
    flat = " ".join(text.split())
    spec = get_spec(target)
    assert target in flat and all(alias in flat for alias in spec.aliases)
    lines = text[text.index("targets ("):].splitlines()  # the epilog: two lines per target
    first = next(i for i, line in enumerate(lines) if re.match(rf"  {re.escape(target)}[ :]", line))
    block = " ".join(lines[first:first + 2])
    for option in spec.options:
        assert option.help and (option.flag or option.name) in block, (target, option.name)
        if option.flag:
            assert FLAG.fullmatch(option.flag), option.flag
            assert option.flag in flat
    assert " | ".join(spec.precisions) in block and f"edgeface[{spec.extra}]" in block


def test_reading_the_registries_imports_no_backend_or_converter_library():
    """Target specs, runtime declarations, the command's help and the board profiles load with every declared
    library (and PyTorch) made unimportable, as on a device install without them."""
    heavy = _heavy_modules()
    script = f"""
import importlib, sys
for name in {heavy!r}:
    sys.modules[name] = None  # importing it raises ImportError
import edgeface.export as export, edgeface.runtimes as runtimes
for module in export.TARGETS:
    assert importlib.import_module(module).SPEC
for line in runtimes.RUNTIMES:
    module, _, cls = line.partition(":")
    getattr(importlib.import_module(module), cls)
runtimes.default_runtimes()
import edgeface.boards.profiles as boards
boards.list_boards()
import edgeface.cli
edgeface.cli.build_parser()
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    assert {"torch", "onnx", "onnxruntime", "coremltools", "litert_torch"} <= set(heavy)


def test_bench_all_matrix_is_every_target_bench_entry():
    assert all_artifacts() == [(s.name, p, size) for s in specs() for p, size in s.bench]
    assert {t for t, _, _ in all_artifacts()} == set(list_targets())


def test_a_spec_that_contradicts_itself_is_refused():
    base = dict(name="x", title="X", extra="onnx", runtime="onnxruntime", precisions=("fp32",), libraries=("x",))
    TargetSpec(**base)
    for bad in ({"calibrated": ("int8",)}, {"bench": (("fp16", None),)}, {"precisions": ()},
                {"static_only": "fixed sizes", "bench": (("fp32", None),)},
                {"options": (TargetOption("a", "h"), TargetOption("a", "h"))}, {"bench_limit": 0},
                {"bench_limit": True}):
        with pytest.raises(ValueError, match="target spec 'x'"):
            TargetSpec(**{**base, **bad})


# --- runtimes -----------------------------------------------------------------------------------------------------


def test_the_registry_has_one_line_per_runtime():
    assert len(RUNTIMES) == len(set(RUNTIMES)) == len(list_runtimes())
    # every bundle target has exactly one default runtime, and no runtime is the default of an unknown target
    assert set(default_runtimes()) == set(list_targets())


@pytest.mark.parametrize("line", RUNTIMES)
def test_runtime_declares_itself(line):
    module, _, cls_name = line.partition(":")
    cls = getattr(importlib.import_module(module), cls_name)
    assert get_runtime_class(cls.name) is cls  # importable by name
    assert set(cls.targets) <= set(list_targets()), cls.targets
    assert set(cls.default_for) <= set(cls.targets)
    assert "cpu" in cls.devices  # every command's default --device
    assert isinstance(cls.concurrent, bool)
    assert cls.extra is None or cls.extra in EXTRAS
    assert cls.libraries
    # each declared option is a keyword of open(); anything else is refused before a bundle is read
    parameters = inspect.signature(cls.open).parameters
    assert all(option in parameters for option in cls.options), (cls.name, cls.options)
    foreign = sorted({o for r in list_runtimes() for o in get_runtime_class(r).options} - set(cls.options)
                     - {"threads"})
    for option in foreign:
        with pytest.raises(EdgefaceError) as info:
            open_runtime(cls.name, model="/nonexistent-bundle", **{option: "x"})
        assert str(info.value) == (f"{option} is not an option of the {cls.name} runtime (runtimes that take it: "
                                   f"{', '.join(runtimes_taking(option))})")


def test_boards_name_a_runtime_that_runs_their_target():
    for board in list_boards():
        assert board.runtime in runtimes_for(get_spec(board.target).name), board.name


def test_runtime_help_lists_every_runtime():
    flat = " ".join(_subcommand_help("run").split())
    assert " | ".join(list_runtimes()) in flat
    assert ", ".join(runtimes_taking("threads")) in flat


# --- option validation, derived from the specs -------------------------------------------------------------------


def _value(option: TargetOption) -> object:
    if isinstance(option.default, bool):
        return True
    if option.choices is not None:
        return next(iter(option.choices))
    return option.default if option.default is not None else "x"


def _foreign_options() -> list[tuple[str, TargetOption]]:
    """(target, option of another target it does not take), one per option name."""
    cases, seen = [], set()
    for spec in specs():
        for option in spec.options:
            for target in list_targets():
                if not get_spec(target).option(option.name) and (target, option.name) not in seen:
                    seen.add((target, option.name))
                    cases.append((target, option))
    return cases


@pytest.mark.parametrize("target, option", _foreign_options(), ids=lambda v: getattr(v, "name", v))
def test_an_option_the_target_does_not_take_names_the_targets_that_do(target, option, tmp_path):
    takers = ", ".join(targets_taking(option.name))
    with pytest.raises(EdgefaceError, match=r"is not an option of the " + target + r" target \(targets that take "
                       r"it: " + re.escape(takers) + r"\)"):
        check_options(target, {option.name: _value(option)})
    from edgeface.export.pipeline import export_bundle  # deferred: PyTorch (the export extra)

    opset = {"opset": _value(option)} if option.name == "opset" else {"options": {option.name: _value(option)}}
    with pytest.raises(EdgefaceError, match=f"targets that take it: {re.escape(takers)}"):
        export_bundle(target, out=tmp_path / "b", progress=False, **opset)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("target, option", [(t, o) for t, o in _foreign_options() if o.flag],
                         ids=lambda v: getattr(v, "name", v))
def test_a_flag_the_target_does_not_take_is_an_error_on_the_command_line(target, option, tmp_path, capsys):
    value = [] if isinstance(option.default, bool) else [str(_value(option))]
    assert main(["export", "--target", target, option.flag, *value, "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err == (f"edgeface: error: {option.flag} is not an option of the {target} target (targets that take "
                   f"it: {', '.join(targets_taking(option.name))})\n")
    assert not (tmp_path / "b").exists()


def test_the_examples_of_the_issue(capsys):
    assert main(["export", "--target", "onnx", "--int8-io"]) == 2
    assert capsys.readouterr().err == ("edgeface: error: --int8-io is not an option of the onnx target (targets that "
                                       "take it: tflite)\n")
    for target in ("tflite", "coreml", "android", "ios"):
        assert main(["export", "--target", target, "--opset", "17"]) == 2
        assert "--opset is not an option of the" in capsys.readouterr().err


def test_unknown_option_and_bad_values(tmp_path):
    with pytest.raises(EdgefaceError, match=r"unknown TFLite options \['int8io'\]; did you mean 'int8_io'\?"):
        check_options("tflite", {"int8io": True})
    with pytest.raises(EdgefaceError, match=r"--opset 99 is not supported: give 13-20 \(default 17\)"):
        check_options("onnx", {"opset": 99})
    # TensorRT 8.5/8.6 parse up to opset 17: refused before the export runs, not after
    with pytest.raises(EdgefaceError, match=r"--opset 19 is not supported: give 13-17 \(default 17\)"):
        check_options("jetson", {"opset": 19})
    with pytest.raises(EdgefaceError, match=r"option 'method' 'bogus' is not supported: give minmax, entropy"):
        check_options("onnx", {"method": "bogus"})
    check_options("onnx", {"opset": None, "int8_io": None})  # None: not given
    check_options("tflite", {"int8_io": True, "keep_float": []})


def test_the_cli_gives_only_the_options_the_user_gave(monkeypatch, tmp_path):
    """Defaults stay the spec's: no --opset reaches a target without one, no int8_io False reaches tflite."""
    import edgeface.export.pipeline as pipeline

    seen = []

    def record(target, **kwargs):
        seen.append((target, kwargs["opset"], kwargs["options"]))
        raise EdgefaceError("recorded")

    monkeypatch.setattr(pipeline, "export_bundle", record)
    for target in list_targets():
        assert main(["export", "--target", target, "--out", str(tmp_path / target)]) == 2
    assert seen == [(t, None, {}) for t in list_targets()]
    # a board's opset applies only to a target that takes one
    seen.clear()
    jetson = next(b for b in list_boards() if "opset" in b.options)
    main(["export", "--board", jetson.name, "--target", "tflite", "--out", str(tmp_path / "b")])
    main(["export", "--board", jetson.name, "--out", str(tmp_path / "c")])
    assert [(t, o) for t, o, _ in seen] == [("tflite", None), (jetson.target, jetson.options["opset"])]


def test_bench_all_caps_emulated_targets(monkeypatch, tmp_path):
    """A target whose runtime here is an emulator (bench_limit: QNN's HTP) gets AP on at most that many images and
    few timed runs, said in the row's reason; other targets keep the run's --limit and runs."""
    import edgeface.benchmarks.matrix as matrix

    class Exported:
        path = tmp_path

        def model_bytes(self):
            return 1

    seen = {}
    monkeypatch.setattr(matrix, "export_bundle", lambda target, **kwargs: Exported())

    def fake_bench(make, *, data=None, warmup=5, iters=50, progress=True, **_):
        seen.setdefault("calls", []).append({"limit": data and data["limit"], "warmup": warmup, "iters": iters})
        return [{"name": "x", "status": "ok"}]

    monkeypatch.setattr(matrix, "bench", fake_bench)
    rows = matrix.bench_all(lambda path: None, out=tmp_path, progress=False, sizes={"vga": (480, 640)},
                            data={"images": tmp_path, "gt": tmp_path, "limit": 0}, warmup=5, iters=50)
    calls = dict(zip(["torch"] + [f"{t}-{p}" for t, p, _ in matrix.all_artifacts()], seen["calls"]))
    cap = get_spec("qnn").bench_limit
    assert cap and calls["qnn-int8"] == {"limit": cap, "warmup": 1, "iters": matrix.EMULATED_ITERS}
    assert calls["onnx-int8"] == {"limit": 0, "warmup": 5, "iters": 50}
    qnn_row = next(r for r in rows if r.get("target") == "qnn")
    assert f"at most {cap} images" in qnn_row["reason"]
