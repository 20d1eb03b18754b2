"""End-to-end ONNX: RetinaFace's decode, score threshold, top-k and NMS appended to the network graph, so that an
app reads final faces by name and ports no priors, decoding or NMS.

The appended graph computes what :func:`edgeface.core.processing.postprocess` computes on the host, for batch 1 at
a static input size (the priors of that size are a constant):

- priors (cx, cy, w, h) of the input size, boxes and landmarks decoded with the anchors' variances (RetinaFace
  paper, arXiv 1905.00641, and the reference ``box_utils.decode`` / ``decode_landm``), scaled to input pixels;
- the face score is the softmax ``conf[:, 1]``; priors scoring above ``score_threshold`` are kept, the
  ``pre_nms_top_k`` best of them decoded, then ONNX ``NonMaxSuppression`` (IoU > ``iou_threshold`` suppressed, at
  most ``keep_top_k`` faces, highest score first);
- the reference's IoU is pixel-inclusive (areas (x2 - x1 + 1) (y2 - y1 + 1) in original-image pixels). The boxes
  given to NMS are therefore extended by ``pixel`` (one original-image pixel in input pixels, the letterbox scale;
  1 when the image is not resized), which makes ONNX's plain IoU the reference's.

Inputs besides ``input``, each a float32 scalar (0-d) the caller feeds with every image (the manifest records the
defaults, :data:`DEFAULT_INPUTS`; initializers as defaults would cost onnxruntime's constant folding and print its
warning at every session): ``score_threshold`` (0.5), ``iou_threshold`` (0.4), ``pixel`` (1.0). Outputs:
``boxes`` (K, 4) float32 x1, y1, x2, y2 in input pixels; ``scores`` (K,) float32; ``landmarks`` (K, 10) float32
(x, y) x 5 in input pixels, in :data:`~edgeface.core.face.LANDMARK_NAMES` order; ``num_detections`` (1,) int64 = K.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeface.core.errors import EdgefaceError
from edgeface.core.manifest import OUTPUTS
from edgeface.core.processing import AnchorSpec, ResizePolicy, postprocess, preprocess, prior_boxes

if TYPE_CHECKING:
    import onnx

END2END_OUTPUTS = ("boxes", "scores", "landmarks", "num_detections")
# The scalar inputs' defaults (the Detector's) and the fixed candidate counts (the reference's).
DEFAULT_INPUTS = {"score_threshold": 0.5, "iou_threshold": 0.4, "pixel": 1.0}
PRE_NMS_TOP_K, KEEP_TOP_K = 5000, 750
RAW_PREFIX = "raw_"
# Largest difference (image pixels) allowed between the end-to-end model's faces and the host pipeline's.
TOLERANCE_PX = 0.01


def append_postprocess(proto: onnx.ModelProto, input_hw: tuple[int, int], anchors: AnchorSpec) -> onnx.ModelProto:
    """``proto`` (batch 1, static ``input_hw``, outputs :data:`~edgeface.core.manifest.OUTPUTS`) with the
    post-processing appended: the model described in the module docstring. ``proto`` is not modified."""
    import onnx  # deferred: the converters (export extra)
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    # the raw outputs become internal tensors (their names go to the final outputs)
    renamed = {name: RAW_PREFIX + name for name in OUTPUTS}
    for node in graph.node:
        node.output[:] = [renamed.get(name, name) for name in node.output]
        node.input[:] = [renamed.get(name, name) for name in node.input]
    del graph.output[:]

    h, w = input_hw
    priors = prior_boxes((h, w), anchors)
    top_k = min(PRE_NMS_TOP_K, len(priors))
    v0, v1 = anchors.variance
    constants = {
        "pp_priors_xy": priors[:, :2], "pp_priors_wh": priors[:, 2:],
        "pp_variance0": np.float32(v0), "pp_variance1": np.float32(v1), "pp_half": np.float32(0.5),
        "pp_size_xy": np.array([w, h], np.float32), "pp_size_xyxy": np.array([w, h, w, h], np.float32),
        "pp_zero_zero_one_one": np.array([0, 0, 1, 1], np.float32),
        "pp_axis0": np.array([0], np.int64), "pp_axes01": np.array([0, 1], np.int64),
        "pp_top_k": np.array([top_k], np.int64), "pp_keep_top_k": np.array([KEEP_TOP_K], np.int64),
        "pp_points_shape": np.array([-1, 5, 2], np.int64), "pp_flat_shape": np.array([-1, 10], np.int64),
        "pp_one": np.array([1], np.int64), "pp_two": np.array([2], np.int64), "pp_four": np.array([4], np.int64),
    }
    graph.initializer.extend(numpy_helper.from_array(np.asarray(v), name) for name, v in constants.items())
    for name in DEFAULT_INPUTS:
        graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, []))

    def node(op: str, inputs: list[str], output: str, **attributes) -> str:
        graph.node.append(helper.make_node(op, inputs, [output], name=f"postprocess/{output}", **attributes))
        return output

    loc = node("Squeeze", [renamed["loc"], "pp_axis0"], "pp_loc")  # (A, 4)
    points = node("Squeeze", [renamed["landmarks"], "pp_axis0"], "pp_points_raw")  # (A, 10)
    face_scores = node("Gather", [node("Squeeze", [renamed["conf"], "pp_axis0"], "pp_conf"), "pp_one"],
                       "pp_face_scores", axis=1)  # (A, 1)
    face_scores = node("Squeeze", [face_scores, "pp_one"], "pp_scores_all")  # (A,)
    # the threshold first (as the host does): the top-k, decode and NMS then see the few hundred candidates only
    candidates = node("Squeeze", [node("NonZero", [node("Greater", [face_scores, "score_threshold"], "pp_above")],
                                       "pp_above_index"), "pp_axis0"], "pp_candidates")  # (M,)
    candidate_scores = node("Gather", [face_scores, candidates], "pp_candidate_scores", axis=0)
    k = node("Min", [node("Shape", [candidates], "pp_candidate_count"), "pp_top_k"], "pp_k")
    graph.node.append(helper.make_node("TopK", [candidate_scores, k], ["pp_top_scores", "pp_top_position"],
                                       name="postprocess/top_k", axis=0, largest=1, sorted=1))
    node("Gather", [candidates, "pp_top_position"], "pp_top_index", axis=0)
    loc = node("Gather", [loc, "pp_top_index"], "pp_top_loc", axis=0)
    points = node("Gather", [points, "pp_top_index"], "pp_top_points", axis=0)
    xy = node("Gather", ["pp_priors_xy", "pp_top_index"], "pp_top_priors_xy", axis=0)
    wh = node("Gather", ["pp_priors_wh", "pp_top_index"], "pp_top_priors_wh", axis=0)
    # boxes: centre = xy + d_xy * v0 * wh; size = wh * exp(d_wh * v1); corners = centre -/+ size / 2
    d_xy = node("Slice", [loc, "pp_axis0", "pp_two", "pp_one"], "pp_d_xy")
    d_wh = node("Slice", [loc, "pp_two", "pp_four", "pp_one"], "pp_d_wh")
    centre = node("Add", [xy, node("Mul", [node("Mul", [d_xy, "pp_variance0"], "pp_d_xy_v"), wh], "pp_shift")],
                  "pp_centre")
    half = node("Mul", [node("Mul", [wh, node("Exp", [node("Mul", [d_wh, "pp_variance1"], "pp_d_wh_v")],
                                               "pp_scale")], "pp_size"), "pp_half"], "pp_half_size")
    corners = node("Concat", [node("Sub", [centre, half], "pp_x1y1"), node("Add", [centre, half], "pp_x2y2")],
                   "pp_corners", axis=1)
    boxes = node("Mul", [corners, "pp_size_xyxy"], "pp_boxes")  # (T, 4) input pixels
    # landmarks: xy + d * v0 * wh for each of the 5 points, in input pixels
    offsets = node("Reshape", [points, "pp_points_shape"], "pp_point_offsets")  # (T, 5, 2)
    xy3 = node("Unsqueeze", [xy, "pp_one"], "pp_xy3")
    wh3 = node("Unsqueeze", [wh, "pp_one"], "pp_wh3")
    decoded = node("Add", [xy3, node("Mul", [node("Mul", [offsets, "pp_variance0"], "pp_points_v"), wh3],
                                     "pp_points_shift")], "pp_points")
    marks = node("Reshape", [node("Mul", [decoded, "pp_size_xy"], "pp_points_px"), "pp_flat_shape"],
                 "pp_landmarks")  # (T, 10)
    # NMS on the pixel-inclusive boxes (see the module docstring)
    inclusive = node("Add", [boxes, node("Mul", ["pp_zero_zero_one_one", "pixel"], "pp_pixel_extent")],
                     "pp_inclusive_boxes")
    nms_boxes = node("Unsqueeze", [inclusive, "pp_axis0"], "pp_nms_boxes")  # (1, T, 4)
    nms_scores = node("Unsqueeze", ["pp_top_scores", "pp_axes01"], "pp_nms_scores")  # (1, 1, T)
    selected = node("NonMaxSuppression", [nms_boxes, nms_scores, "pp_keep_top_k", "iou_threshold",
                                          "score_threshold"], "pp_selected")  # (K, 3): batch, class, index
    kept = node("Squeeze", [node("Gather", [selected, "pp_two"], "pp_selected_index", axis=1), "pp_one"],
                "pp_kept")  # (K,)
    # highest score first: onnxruntime's NMS returns them so, the ONNX specification does not promise it
    graph.node.append(helper.make_node(
        "TopK", [node("Gather", ["pp_top_scores", kept], "pp_kept_scores", axis=0),
                 node("Shape", [kept], "pp_kept_count")], ["pp_sorted_scores", "pp_order"],
        name="postprocess/order", axis=0, largest=1, sorted=1))
    index = node("Gather", [kept, "pp_order"], "pp_index", axis=0)
    node("Gather", [boxes, index], "boxes", axis=0)
    node("Gather", ["pp_top_scores", index], "scores", axis=0)
    node("Gather", [marks, index], "landmarks", axis=0)
    node("Shape", [index], "num_detections")
    graph.output.extend([
        helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["faces", 4]),
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["faces"]),
        helper.make_tensor_value_info("landmarks", TensorProto.FLOAT, ["faces", 10]),
        helper.make_tensor_value_info("num_detections", TensorProto.INT64, [1]),
    ])
    del graph.value_info[:]  # shapes of the renamed tensors are inferred again
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


def describe(input_hw: tuple[int, int]) -> dict[str, Any]:
    """The manifest's ``target_info.end2end``: what an app feeds the end-to-end model and what it reads back."""
    return {
        "file": "files.end2end",
        "input_hw": list(input_hw),
        "inputs": {
            "input": "as the manifest's input (pre-processed image, batch 1)",
            **{name: {"dtype": "float32", "shape": [], "default": value} for name, value in DEFAULT_INPUTS.items()},
        },
        "outputs": {
            "boxes": {"dtype": "float32", "shape": ["faces", 4], "meaning": "x1, y1, x2, y2 in input pixels"},
            "scores": {"dtype": "float32", "shape": ["faces"], "meaning": "face probability, highest first"},
            "landmarks": {"dtype": "float32", "shape": ["faces", 10],
                          "meaning": "(x, y) x 5 in input pixels, decode.landmark_order"},
            "num_detections": {"dtype": "int64", "shape": [1], "meaning": "faces"},
        },
        "pre_nms_top_k": PRE_NMS_TOP_K,
        "keep_top_k": KEEP_TOP_K,
        "to_image_pixels": "divide boxes and landmarks by the letterbox scale (the image is padded bottom/right)",
        "pixel": "one image pixel in input pixels (the letterbox scale): NMS then uses the reference's "
                 "pixel-inclusive IoU",
    }


def check_static(input_hw: tuple[int, int] | None, dynamic_batch: bool) -> None:
    """Refuse, before any work, an export the end-to-end model cannot be made for: the priors are constants of one
    input size, at batch 1."""
    if input_hw is None or dynamic_batch:
        raise EdgefaceError("--end2end needs a static input size and batch 1 (the priors are constants of the size): "
                            "give --imgsz HxW, without --dynamic")


def onnxruntime_runners(raw: onnx.ModelProto, end2end: onnx.ModelProto) -> tuple[Callable, Callable]:
    """:func:`verify`'s two sides for ONNX models, in onnxruntime's CPU provider."""
    import onnxruntime as ort

    host = ort.InferenceSession(raw.SerializeToString(), providers=["CPUExecutionProvider"])
    graph = ort.InferenceSession(end2end.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in host.get_outputs()]
    return (lambda batch: dict(zip(names, host.run(None, {"input": batch}))),
            lambda feed: graph.run(list(END2END_OUTPUTS), feed))


def verify(run_raw: Callable[[np.ndarray], dict[str, np.ndarray]],
           run_end2end: Callable[[dict[str, np.ndarray]], Sequence[np.ndarray]], input_hw: tuple[int, int],
           anchors: AnchorSpec, mean_bgr: tuple[float, float, float], images: list[np.ndarray], *, against: str,
           thresholds: tuple[float, ...] = (0.02, 0.5)) -> dict[str, Any]:
    """The end-to-end model against the host pipeline on ``images`` at each score threshold: ``run_raw`` (a
    pre-processed batch -> the network's ``loc`` / ``conf`` / ``landmarks``) then
    :func:`~edgeface.core.processing.postprocess`, against ``run_end2end`` (the feed of ``input`` and the scalar
    inputs -> :data:`END2END_OUTPUTS` in order). The same faces in the same order, boxes and landmarks within
    :data:`TOLERANCE_PX` image pixels, scores within 1e-5. Returns the record (``against`` names the runtime);
    raises EdgefaceError where they differ."""
    policy = ResizePolicy("fixed", tuple(input_hw))
    faces, worst, iou = 0, 0.0, DEFAULT_INPUTS["iou_threshold"]
    for image in images:
        batch, (letterbox,) = preprocess([image], policy=policy, mean_bgr=mean_bgr)
        raw_out = run_raw(batch)
        for threshold in thresholds:
            want = postprocess(raw_out["loc"][0], raw_out["conf"][0], raw_out["landmarks"][0], letterbox,
                               anchors=anchors, score_threshold=threshold, nms_threshold=iou, top_k=PRE_NMS_TOP_K,
                               keep_top_k=KEEP_TOP_K)
            scalars = {"score_threshold": threshold, "iou_threshold": iou, "pixel": letterbox.scale}
            boxes, scores, points, count = run_end2end({"input": batch, **{k: np.array(v, np.float32)
                                                                           for k, v in scalars.items()}})
            if int(count[0]) != len(want) or len(scores) != len(want):
                raise EdgefaceError(f"the end-to-end model found {int(count[0])} faces where the host pipeline finds "
                                    f"{len(want)} (score threshold {threshold}): not exported")
            if len(want):
                worst = max(worst, float(np.abs(boxes / letterbox.scale - want.boxes).max()),
                            float(np.abs(points.reshape(-1, 5, 2) / letterbox.scale - want.landmarks).max()))
                if worst > TOLERANCE_PX or np.abs(scores - want.scores).max() > 1e-5:
                    raise EdgefaceError(f"the end-to-end model's faces differ from the host pipeline's by {worst:.3g} "
                                        f"pixels (score threshold {threshold}): not exported")
            faces += len(want)
    return {"status": "passed", "images": len(images), "score_thresholds": list(thresholds), "faces": faces,
            "max_abs_diff_px": round(worst, 6), "against": against}
