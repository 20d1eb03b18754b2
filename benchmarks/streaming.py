"""Streaming throughput of ``edgeface run``: frames per second and per-stage times, the stages one after the other
in one thread against the pipeline of :mod:`edgeface.inference.pipeline` (a thread per stage).

``python -m edgeface.benchmarks.streaming --model BUNDLE [--model ...] --out DIR`` makes the WIDER video of
:mod:`edgeface.benchmarks.tracking` (or takes ``--video``), streams it through each bundle both ways with the
runtime on ``--threads`` threads, and writes ``streaming.json`` and ``streaming.md``. FPS counts from the first
frame out to the last (the steady stream); stage times are means over the frames that went through the stage. The
ideal FPS is 1 / (the sum of the stage times) single-threaded, 1 / (the slowest stage) pipelined, the latter
reached only with a core free for each busy stage.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from edgeface.inference import stream
from edgeface.inference.detector import Detector
from edgeface.inference.pipeline import STAGES, stream_faces

MODES = (("single thread", False), ("pipelined", True))


def measure(video: Path, model: str | None, *, pipelined: bool, threads: int, tracker=None) -> dict:
    detector = Detector(model=model, threads=threads)
    times, seconds = [], {}
    try:
        for result in stream_faces(detector, stream.frames(str(video)), pipelined=pipelined, tracker=tracker):
            times.append(time.perf_counter())
            for stage, value in result.seconds.items():
                seconds.setdefault(stage, []).append(value)
        name = detector.name
    finally:
        detector.close()
    if len(times) < 2:
        raise ValueError(f"{video}: fewer than 2 frames, no rate to measure")
    stages = {k: 1e3 * sum(seconds[k]) / len(seconds[k]) for k in STAGES if k in seconds}
    # the limit: 1 / (the sum of the stages) one after the other, 1 / (the slowest stage) overlapped
    ideal = 1e3 / (max(stages.values()) if pipelined else sum(stages.values()))
    return {"model": name, "fps": (len(times) - 1) / (times[-1] - times[0]), "frames": len(times),
            "ideal_fps": ideal, "ms": stages}


def to_markdown(rows: list[dict]) -> str:
    lines = ["| model | mode | FPS | ideal FPS | " + " | ".join(f"{k} ms" for k in STAGES[:-1]) + " |",
             "|---|---|---|---|" + "---|" * (len(STAGES) - 1)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['mode']} | {r['fps']:.1f} | {r['ideal_fps']:.1f} | "
                     + " | ".join(f"{r['ms'].get(k, 0.0):.1f}" for k in STAGES[:-1]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m edgeface.benchmarks.streaming", description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", help="bundle (repeatable; default: the default model)")
    parser.add_argument("--video", type=Path, help="default: the WIDER video of edgeface.benchmarks.tracking")
    parser.add_argument("--widerface", type=Path, default=Path("../shared/data/widerface"))
    parser.add_argument("--threads", type=int, default=1, help="the runtime's threads (default 1)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    video = args.video
    if video is None:
        from edgeface.benchmarks.tracking import load_clips, make_video

        video = args.out / "video.mp4"
        make_video(*load_clips(args.widerface), video)
    rows = []
    for model in args.model or [None]:
        measure(video, model, pipelined=False, threads=args.threads)  # warm-up: the first stream runs slower
        for mode, pipelined in MODES:
            row = {"mode": mode, **measure(video, model, pipelined=pipelined, threads=args.threads)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    info = {"cpus": os.cpu_count(), "threads": args.threads, "video": str(video), "rows": rows}
    (args.out / "streaming.json").write_text(json.dumps(info, indent=2))
    (args.out / "streaming.md").write_text(to_markdown(rows))
    print(to_markdown(rows))


if __name__ == "__main__":
    main()
