"""The export flow every target shares: model -> converter -> manifest -> parity on real images -> (WIDER FACE
evaluation) -> atomic publication of the bundle."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from edgeface.export import check_options, get_converter, get_spec, onnx_end2end, resolve_precision, resolve_target
from edgeface.export.base import DEFAULT_IMGSZ, ExportRequest, parity_images
from edgeface.runtimes import Runtime

from edgeface.core.bundle import Bundle, check_output_folder, load_bundle, staged_bundle, staging_dir, write_manifest
from edgeface.core.errors import EdgefaceError, first_line
from edgeface.core.images import ASTRONAUT, list_images, load_image
from edgeface.core.manifest import manifest_for_model
from edgeface.core.parity import LOOSE_THRESHOLD, SCORE_THRESHOLD, compare
from edgeface.core.processing import ResizePolicy, preprocess
from edgeface.evaluation.accuracy import WIDER_SETTINGS, default_image_dir, evaluate_detector, fp32_baseline, spread
from edgeface.evaluation.widerface import load_ground_truth
from edgeface.inference.detector import Detector
from edgeface.models import canonical_name, get_model

NOT_WRITTEN = "nothing was written. Use --no-verify to keep it anyway"
DYNAMIC_CALIBRATION_HW = (640, 640)  # onnxruntime histogram calibration holds every activation: keep it small
# A calibration set where fewer images than this share hold a face the FP32 model finds is warned about.
CALIBRATION_FACE_SHARE = 0.5



def default_out(model: str, target: str, precision: str, input_hw: tuple[int, int] | None) -> Path:
    size = f"{input_hw[0]}x{input_hw[1]}" if input_hw else "dynamic"
    return Path("bundles") / f"{model}-{target}-{precision}-{size}"


def export_bundle(
    target: str,
    *,
    precision: str | None = None,
    out: str | os.PathLike | None = None,
    backbone: str = "retinaface_mnet025",
    weights: Any = "default",
    negative_slope: float | None = None,
    imgsz: tuple[int, int] | None = None,
    dynamic: bool = False,
    calib: str | os.PathLike | None = None,
    calib_n: int = 100,
    opset: int | None = None,
    verify: bool = True,
    evaluate: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
    progress: bool = True,
) -> Bundle:
    """Export one bundle; returns it loaded. ``opset`` and ``options`` are the target's options (its spec's
    ``options``; one it does not declare is refused, naming the targets that take it; None: its default).
    ``evaluate``: {"images": DIR, "gt": DIR, "limit": N} adds the WIDER FACE AP of the artifact and its delta to FP32
    PyTorch to the manifest."""
    started = time.perf_counter()
    target = resolve_target(target)
    target_spec = get_spec(target)
    precision = resolve_precision(target, precision)
    options = {k: v for k, v in (options or {}).items() if v is not None}
    opset = options.pop("opset", None) if opset is None else opset  # a request field, not a converter option
    options.pop("opset", None)
    check_options(target, {"opset": opset, **options})
    if target_spec.preflight:  # a converter that cannot run here says so before any calibration
        target_spec.preflight(precision, options)
    if opset is None:
        opset = target_spec.option("opset").default if target_spec.option("opset") else ExportRequest.opset
    if dynamic and target_spec.static_reason(precision):
        what = target if target_spec.static_only else f"{target} {precision}"
        reason = target_spec.static_reason(precision)
        raise EdgefaceError(f"--dynamic is not available for {what}: {reason}"
                            + ("" if "--imgsz" in reason else "; use --imgsz HxW"))
    if dynamic and imgsz:
        raise EdgefaceError("give either --imgsz HxW or --dynamic, not both")
    input_hw = None if dynamic else tuple(imgsz or DEFAULT_IMGSZ)
    if input_hw:
        ResizePolicy.parse(f"fixed:{input_hw[0]}x{input_hw[1]}")  # validates multiples of 32
    if options.get("end2end"):
        onnx_end2end.check_static(input_hw, dynamic)
    if calib_n < 1:
        raise EdgefaceError(f"--calib-n {calib_n}: give at least 1 calibration image (default 100)")
    log = (lambda msg: print(f"edgeface export: {msg}", file=sys.stderr)) if progress else (lambda msg: None)
    out = check_output_folder(out or default_out(canonical_name(backbone), target, precision, input_hw))

    model = get_model(backbone, weights=weights, negative_slope=negative_slope)
    policy = ResizePolicy("fixed", input_hw) if input_hw else ResizePolicy()
    # Calibration batches must share one shape (onnxruntime stacks its histograms): a dynamic model is
    # calibrated at a fixed size close to the images it will see at original scale.
    calibration_policy = policy if input_hw else ResizePolicy("fixed", DYNAMIC_CALIBRATION_HW)
    image_dir = Path(calib) if calib else default_image_dir()
    sample_paths = list_images(image_dir) if image_dir else []
    if calib and not sample_paths:
        raise EdgefaceError(f"no images found under --calib {calib}")
    calibration: tuple[np.ndarray, ...] = ()
    if target_spec.calibrates(precision):
        if not sample_paths:
            raise EdgefaceError(f"{precision.upper()} needs calibration images: pass --calib DIR (real photographs "
                                "with faces; the shared WIDER FACE images are used when ../shared is present)")
        chosen = spread(sample_paths, calib_n)
        calibration, faces_found = calibration_tensors(model, chosen, calibration_policy, log,
                                                       count_faces=bool(calib))
        if not calibration:
            raise EdgefaceError(f"none of the {len(chosen)} calibration images under {image_dir} could be read; "
                                "pass --calib DIR with real photographs (JPEG/PNG)")
        log(f"calibrating on {len(calibration)} images from {image_dir}")
        if calib:
            _warn_few_faces(faces_found, len(calibration), log)
    request = ExportRequest(target=target, precision=precision, input_hw=input_hw, dynamic_batch=dynamic,
                            opset=opset, calibration=calibration,
                            calibration_source=str(image_dir) if calibration else "", options=options,
                            verify=verify)

    with staging_dir(out) as tmp, contextlib.ExitStack() as cleanup:
        log(f"converting {model.config.name} to {target} {precision} "
            f"({'dynamic' if input_hw is None else f'{input_hw[0]}x{input_hw[1]}'})")
        conversion = get_converter(target)(model, tmp, request)
        if conversion.runtime is not None:  # the converter's own runtime over the artifact, closed at the end
            cleanup.callback(conversion.runtime.close)
        runtime = conversion.runtime or target_spec.runtime_here
        calibration_record = conversion.calibration
        if calib and calibration and calibration_record is not None:
            calibration_record = {**calibration_record, "images_with_faces": faces_found}
        manifest = manifest_for_model(
            model, target=target, precision=precision, files=conversion.files, layout=conversion.layout,
            input_hw=input_hw, dynamic=conversion.dynamic, mean_in_graph=conversion.mean_in_graph,
            input_dtype=conversion.input_dtype, input_quantization=conversion.input_quantization,
            output_dtypes=conversion.output_dtypes, output_quantization=conversion.output_quantization,
            calibration=calibration_record, converter=conversion.converter, target_info=conversion.extra,
            notes=conversion.notes)
        end2end = (conversion.extra or {}).get("end2end")
        if end2end:
            check = end2end["check"]
            log(f"end-to-end model ({conversion.files['end2end']}): the host pipeline's faces on {check['images']} "
                f"images at score thresholds {', '.join(map(str, check['score_thresholds']))}: {check['faces']} "
                f"faces, largest difference {check['max_abs_diff_px']:.2g} px")
        _write_parity_reference(tmp, model, policy)
        staged = staged_bundle(tmp, manifest)  # checked as a load would check it; the manifest is written last
        if verify:
            manifest.parity = _parity(staged, model, precision, runtime, conversion.not_runnable_here, log)
        else:
            manifest.parity = {"status": "skipped", "reason": "--no-verify"}
        manifest.export_seconds = round(time.perf_counter() - started, 1)  # conversion + parity, not --eval
        if evaluate:
            manifest.accuracy = _evaluate(staged, model, runtime, conversion.not_runnable_here, evaluate, progress,
                                          log)
        write_manifest(tmp, manifest)
    log(f"wrote {out} in {manifest.export_seconds} s")
    return load_bundle(out)


def calibration_tensors(model, paths: list[Path], policy: ResizePolicy, log, *, count_faces: bool = False
                        ) -> tuple[tuple[np.ndarray, ...], int]:
    """The INT8 calibration inputs: each image read, pre-processed to the network input and dropped, one at a
    time, so memory holds only input-sized tensors (a folder of 12-megapixel photos is not decoded all at once).
    An image that cannot be read (missing, unreadable, not an image, truncated, over the pixel limit) is skipped
    with one line naming it. With ``count_faces``, also how many of the read images hold a face the FP32 model
    finds (:func:`_warn_few_faces`)."""

    detector = None
    if count_faces:

        detector = Detector.for_model(model, resize=policy, score_threshold=SCORE_THRESHOLD)
    tensors, with_faces = [], 0
    for path in paths:
        try:
            image = load_image(path)
        except (EdgefaceError, OSError, ValueError, cv2.error) as exc:  # EdgefaceError names the file; others may not
            reason = first_line(exc)
            log(f"skipping calibration image {path}: {reason}" if str(path) not in reason
                else f"skipping a calibration image: {reason}")
            continue
        tensors.append(preprocess([image], policy=policy, mean_bgr=model.config.mean_bgr)[0])
        if detector is not None:
            with_faces += bool(detector.detect(image))
        del image
    return tuple(tensors), with_faces



def _write_parity_reference(bundle_dir: Path, model, policy: ResizePolicy) -> None:
    """The bundled public-domain photograph and the FP32 PyTorch detections on it, so a port or a device can check
    the bundle without PyTorch (``edgeface build-engine`` does). Optional: a bundle runs without it. No dataset
    image is stored: WIDER FACE may not be redistributed."""
    folder = bundle_dir / "parity"
    folder.mkdir()

    reference = Detector.for_model(model, resize=policy, score_threshold=LOOSE_THRESHOLD)
    name = "00.jpg"
    cv2.imwrite(str(folder / name), load_image(ASTRONAUT), [cv2.IMWRITE_JPEG_QUALITY, 95])
    image = load_image(folder / name)  # the reference is computed on the stored (re-encoded) pixels
    records = [{"image": name, "faces": [f.to_dict() for f in reference.detect(image)]}]
    (folder / "reference.json").write_text(json.dumps(
        {"resize": str(policy), "score_threshold": LOOSE_THRESHOLD, "nms_iou": 0.4, "images": records}, indent=1))


def _warn_few_faces(with_faces: int, images: int, log) -> None:
    """Warns when few calibration images hold a face the FP32 model finds: INT8 ranges taken on images without
    faces lose them (measured: 8 black images gave an INT8 model that matched 69% of faces)."""

    if with_faces < CALIBRATION_FACE_SHARE * images:
        log(f"warning: only {with_faces} of {images} calibration images hold a face the FP32 model finds "
            f"(score >= {SCORE_THRESHOLD}); INT8 ranges calibrated without faces lose accuracy: calibrate on real "
            "photographs with faces like the ones the model will see")


def _parity(bundle: Bundle, model, precision: str, runtime: str | Runtime, not_runnable: str | None, log
            ) -> dict[str, Any]:

    if not_runnable:
        log(f"parity skipped: {not_runnable}")
        return {"status": "skipped", "reason": not_runnable}
    candidate = Detector(model=bundle, runtime=runtime, default_resize="original",
                         self_check=False)  # the full parity check follows
    try:  # closed on every path: a failed comparison must not keep the artifact's session open
        reference = Detector.for_model(model, resize=candidate.resize)
        report = compare(reference, candidate, parity_images()).check(precision)
    finally:
        if isinstance(runtime, str):  # a converter's runtime (Conversion.runtime) is closed when the export ends
            candidate.close()
    log(f"parity: {report.summary()}")
    if not report.passed:
        raise report.failure(f"the {precision} artifact", "PyTorch", NOT_WRITTEN)
    return report.record(runtime=candidate.runtime.name)


def _evaluate(bundle: Bundle, model, runtime: str | Runtime, not_runnable: str | None, spec: dict[str, Any],
              progress: bool, log):

    if not_runnable:
        return {"status": "skipped", "reason": not_runnable}
    gt = load_ground_truth(spec["gt"])
    candidate = Detector(model=bundle, runtime=runtime, self_check=False, **WIDER_SETTINGS)
    log(f"WIDER FACE evaluation of the artifact ({candidate.resize})")
    try:
        ours = evaluate_detector(candidate.detect_arrays, spec["images"], gt, limit=spec.get("limit"),
                                 progress=progress)
    finally:
        if isinstance(runtime, str):
            candidate.close()
    base_ap = fp32_baseline(model, candidate.resize, spec, gt, progress, log)
    delta = {k: round(ours.ap[k] - base_ap[k], 5) for k in ours.ap}
    log("AP " + ", ".join(f"{k} {ours.ap[k]:.4f} ({delta[k]:+.4f} vs fp32)" for k in ours.ap))
    return {"widerface": {**ours.to_dict(), "resize": str(candidate.resize), "fp32_torch_ap": base_ap,
                          "delta_ap": delta, "images_dir": str(spec["images"])}}
