"""The reliability battery (benchmarks/fuzz.py), its quick subset: a few cases of each kind (hostile images, API
inputs, mutated bundles, bad weights, command-line misuse, user files around an export) must end correct or with a
clear error; no traceback, hang, memory blow-up, silently wrong answer or lost data. The full battery:
``python -m edgeface.benchmarks.fuzz`` (results in the README)."""

from edgeface.benchmarks import fuzz


def test_quick_battery_has_no_failures(tmp_path):
    report = fuzz.run_battery(tmp_path, seconds=300, quick=True, log=lambda message: None)
    kinds = {r["kind"] for r in report["results"]}
    assert kinds == set(fuzz.KINDS)
    assert report["counts"].get("not run", 0) == 0
    failures = [f"{r['outcome']}: {r['name']}: {r['detail']}" for r in report["results"]
                if r["outcome"] in fuzz.FAILURES]
    assert not failures, "\n".join(failures)


def test_outcomes_are_classified_by_the_rules(tmp_path):
    """The classifier itself, on made-up results (no edgeface process involved)."""
    (tmp_path / "stdout").write_text('{"image": "a.jpg", "faces": [{"box": [1, 2, 3, 4]}]}\n')
    (tmp_path / "stderr").write_text("")
    case = fuzz.Case("x", "cli", argv=["detect"], expect={"faces": 1})
    assert fuzz.classify(case, {"rc": 0}, tmp_path, {})[0] == "correct"
    assert fuzz.classify(fuzz.Case("x", "cli", argv=[], expect={"faces": 2}), {"rc": 0}, tmp_path, {})[0] == "wrong"
    assert fuzz.classify(fuzz.Case("x", "cli", argv=[], expect={"error": True}), {"rc": 0}, tmp_path, {})[0] == "wrong"
    assert fuzz.classify(case, {"hang": True}, tmp_path, {})[0] == "hang"
    assert fuzz.classify(case, {"rc": -9}, tmp_path, {})[0] == "memory"
    assert fuzz.classify(case, {"rc": 0, "lost": ["notes.txt"]}, tmp_path, {})[0] == "data lost"
    assert fuzz.classify(case, None, tmp_path, {})[0] == "not run"
    (tmp_path / "stderr").write_text("edgeface: error: x.jpg could not be decoded\n")
    assert fuzz.classify(case, {"rc": 2}, tmp_path, {})[0] == "clear error"
    assert fuzz.classify(case, {"rc": 1}, tmp_path, {})[0] == "unclear error"
    (tmp_path / "stderr").write_text("Traceback (most recent call last):\n  File x\nValueError: boom\n")
    assert fuzz.classify(case, {"rc": 1}, tmp_path, {}) == ("traceback", "ValueError: boom")
    api = fuzz.Case("y", "bundle", call="...", expect={"same_as": "ref"})
    ref = {"ref": {"api": "ok", "faces": [[1.0, 2.0, 3.0, 4.0]]}}
    assert fuzz.classify(api, {"api": "ok", "faces": [[1.5, 2.0, 3.0, 4.0]]}, tmp_path, ref)[0] == "correct"
    assert fuzz.classify(api, {"api": "ok", "faces": []}, tmp_path, ref)[0] == "wrong"
    assert fuzz.classify(api, {"api": "exception", "message": "KeyError: 'x'"}, tmp_path, ref)[0] == "traceback"
    assert fuzz.classify(api, {"api": "edgeface_error", "message": "bad"}, tmp_path, ref)[0] == "clear error"
