"""Training and fine-tuning RetinaFace: the reference implementation's recipe (biubug6/Pytorch_Retinaface
``train.py``, ``data/config.py``): SGD with momentum 0.9 and weight decay 5e-4, learning rate 1e-3 with a linear
warm-up over the first epochs and x0.1 steps, 640 x 640 crops, batch 32.

A run writes, in its output folder, after every epoch (each file whole or not at all):

- ``weights.pth``: the model's state_dict in the reference layout, loadable by every edgeface command
  (``--weights``) and by the reference code;
- ``resume.pth``: the same weights with the optimizer and scheduler state (``edgeface train --resume OUT``);
- ``run.json``: the record of the run: data, hyper-parameters, start weights, library versions, device, per-epoch
  losses and validation AP, timing;
- ``loss.png``: the loss terms per iteration, and validation AP where measured;
- with ``qat``, ``quantization.json``: the learned quantisation of each tensor and the run's summary, which
  ``edgeface export --target onnx --precision int8 --qat OUT`` reads.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from edgeface.core.errors import EdgefaceError
from edgeface.core.files import atomic_write, sha256_file
from edgeface.core.images import load_image
from edgeface.core.processing import prior_boxes
from edgeface.core.versions import library_versions
from edgeface.evaluation.accuracy import WIDER_SETTINGS, evaluate_detector, select_images
from edgeface.evaluation.widerface import image_key, load_ground_truth
from edgeface.export.onnx import OPSET
from edgeface.export.qat_run import QAT_FILE, QAT_FORMAT, read_qat_run
from edgeface.inference.detector import Detector
from edgeface.models import get_model
from edgeface.training.augment import TrainAugmentation
from edgeface.training.batchnorm import unfold_batchnorm
from edgeface.training.data import FaceAnnotations, read_annotations
from edgeface.training.equalize import STRENGTH as EQUALIZE_STRENGTH
from edgeface.training.equalize import equalize_activations
from edgeface.training.loss import LossWeights, distillation_loss, multibox_loss
from edgeface.training.qat import QuantizationAwareRetinaFace, QuantizationScheme, onnxruntime_parameters
from edgeface.training.targets import match_priors

RUN_FORMAT = 1
# The schedules `edgeface train` uses unless told otherwise: the reference implementation's for training, and for
# QAT a short fine-tune (Adam; every learning rate x0.1 after the first epoch).
TRAIN_RECIPE = {"epochs": 250, "batch_size": 32, "lr": 1e-3, "warmup_epochs": 5.0, "decay_epochs": (190, 220)}
QAT_RECIPE = {"epochs": 2, "batch_size": 8, "lr": 1e-4, "warmup_epochs": 0.0, "decay_epochs": (1,)}
WEIGHTS_FILE, RESUME_FILE, RECORD_FILE, PLOT_FILE = "weights.pth", "resume.pth", "run.json", "loss.png"
RUN_FILES = (WEIGHTS_FILE, RESUME_FILE, RECORD_FILE, PLOT_FILE, QAT_FILE)
LOSS_TERMS = ("total", "box", "classification", "landmarks")
# QAT: Adam's peak learning rates of the activation quantisers (log-scales, zero points in integer steps), whatever
# the weights' --lr (the schedule scales all three alike); and the training images whose min-max calibration starts
# them.
QAT_SCALE_LR, QAT_ZERO_POINT_LR = 1e-3, 1e-2
QAT_CALIBRATION_IMAGES = 32
# Training images whose BatchNorm inputs re-estimate the statistics of folded start weights (unfold_batchnorm).
UNFOLD_IMAGES = 64


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (recorded in ``run.json``; a resumed run must match it)."""

    images: str  # folder the annotation paths are relative to
    annotations: str  # WIDER FACE *_bbx_gt.txt or RetinaFace label.txt
    model: str = "retinaface_mnet025"
    weights: str | None = "default"  # start weights (fine-tuning); None trains from scratch
    negative_slope: float | None = None  # activation override, as get_model takes it
    image_size: int = 640
    epochs: int = 250
    batch_size: int = 32
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 5.0  # linear from lr x 1e-3 to lr
    decay_epochs: tuple[int, ...] = (190, 220)  # lr x ``gamma`` at each
    gamma: float = 0.1
    loss: LossWeights = field(default_factory=LossWeights)
    limit: int | None = None  # train on the first N annotated images only
    seed: int = 0
    # validation AP on WIDER FACE images after these epochs (never the training images)
    val_images: str | None = None
    val_gt: str | None = None
    val_epochs: tuple[int, ...] = ()
    val_limit: int | None = None
    val_resize: str = "original"
    # quantisation-aware training for full-integer onnxruntime INT8 (edgeface.training.qat), distilled from the
    # start weights (this weight on the distillation loss, added to the ground-truth loss)
    qat: bool = False
    distillation: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["loss"] = LossWeights(**values.get("loss", {}))
        for name in ("decay_epochs", "val_epochs"):
            values[name] = tuple(values.get(name, ()))
        return cls(**values)

    def check(self) -> None:
        """Raise :class:`EdgefaceError` (one line) for a value no run can use."""
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            problems.append(f"batch size must be at least 1, got {self.batch_size}")
        if self.image_size < 64 or self.image_size % 32:  # at 32 the last level is 1 x 1: BatchNorm cannot train
            problems.append(f"image size must be a multiple of 32 from 64, got {self.image_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"learning rate must be a positive number, got {self.lr}")
        if not (self.warmup_epochs >= 0 and math.isfinite(self.warmup_epochs)):
            problems.append(f"warm-up epochs must be a number from 0, got {self.warmup_epochs}")
        if self.qat and self.model != "retinaface_mnet025":
            problems.append(f"QAT is made for retinaface_mnet025 (its MobileNet stage is equalised), not {self.model}")
        if bool(self.val_images) != bool(self.val_gt):
            problems.append("validation needs both the images and the ground truth (--val-images, --val-gt)")
        if self.qat and self.weights is None:
            problems.append("QAT fine-tunes trained weights for INT8: give --weights (default, a name or a file)")
        if self.val_epochs and not (self.val_images and self.val_gt):
            problems.append("validation epochs need the validation images and ground truth (--val-images, --val-gt)")
        if problems:
            raise EdgefaceError("; ".join(problems))


class TrainingSet(Dataset):
    """Annotated images -> augmented (3, S, S) float32 tensors (BGR minus the model's mean) and their faces. The
    augmentation of image ``i`` in epoch ``e`` depends only on (seed, e, i), whatever the worker."""

    def __init__(self, annotations: Sequence[FaceAnnotations], augment: TrainAugmentation,
                 mean_bgr: Sequence[float], seed: int) -> None:
        self.annotations = list(annotations)
        self.augment = augment
        self.mean = np.asarray(mean_bgr, np.float32)
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.annotations)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        faces = self.annotations[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        sample = self.augment(load_image(faces.path), faces.boxes, faces.landmarks, faces.has_landmarks, rng)
        image = torch.from_numpy((sample.image.astype(np.float32) - self.mean).transpose(2, 0, 1).copy())
        return image, {"boxes": torch.from_numpy(sample.boxes), "landmarks": torch.from_numpy(sample.landmarks),
                       "has_landmarks": torch.from_numpy(sample.has_landmarks)}


def collate(batch: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> tuple[torch.Tensor, list[dict]]:
    return torch.stack([image for image, _ in batch]), [faces for _, faces in batch]


def learning_rate_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, iterations_per_epoch: int,
                           ) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-iteration schedule: linear warm-up from lr x 1e-3 over ``warmup_epochs``, then x ``gamma`` at each of
    ``decay_epochs`` (torch's LinearLR and MultiStepLR in sequence)."""
    schedulers = torch.optim.lr_scheduler
    warmup = round(config.warmup_epochs * iterations_per_epoch)
    steps = sorted(max(1, e * iterations_per_epoch - warmup) for e in config.decay_epochs)
    decay = schedulers.MultiStepLR(optimizer, milestones=steps, gamma=config.gamma)
    if warmup == 0:
        return decay
    ramp = schedulers.LinearLR(optimizer, start_factor=1e-3, end_factor=1.0, total_iters=warmup)
    return schedulers.SequentialLR(optimizer, [ramp, decay], milestones=[warmup])


def _device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EdgefaceError(f"--device {name}: no CUDA device is visible to PyTorch here (torch "
                            f"{torch.__version__}); train with --device cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise EdgefaceError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise EdgefaceError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                            f"numbered from 0")
    return device


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


@dataclass
class TrainResult:
    out: Path
    weights: Path
    record: dict[str, Any]


class Trainer:
    """One training run into ``out`` (see the module docstring for the files). ``log`` receives one line per epoch;
    ``progress`` shows a bar per epoch (on a terminal)."""

    def __init__(self, config: TrainConfig, out: str | Path, *, device: str = "cpu", workers: int = 0,
                 log: Callable[[str], None] = print, progress: bool = False) -> None:
        config.check()
        self.config, self.out = config, Path(out)
        self.device = _device(device)
        self.workers, self.log, self.progress = workers, log, progress
        self.equalized: str | None = None  # QAT: what equalize_activations did (recorded)

    # -- set-up ---------------------------------------------------------------------------------------------------
    def _data(self) -> list[FaceAnnotations]:
        c = self.config
        annotations = read_annotations(c.annotations, c.images)
        if c.limit is not None:
            annotations = annotations[: c.limit]
        if c.val_images:
            val_gt = load_ground_truth(c.val_gt)
            val = {image_key(p) for p in select_images(c.val_images, val_gt, c.val_limit)}
            overlap = sorted(val & {a.key for a in annotations})
            if overlap:
                raise EdgefaceError(f"{len(overlap)} training images are also validation images (e.g. "
                                    f"{'/'.join(overlap[0])}): validation AP would be meaningless; train on "
                                    "other images")
        return annotations

    def _data_record(self, annotations: list[FaceAnnotations]) -> dict[str, Any]:
        c = self.config
        faces = sum(len(a.boxes) for a in annotations)
        labelled = sum(int(a.has_landmarks.sum()) for a in annotations)
        return {
            "images_dir": str(Path(c.images).resolve()),
            "annotations": str(Path(c.annotations).resolve()),
            "annotations_sha256": sha256_file(c.annotations),
            "images": len(annotations),
            "faces": faces,
            "faces_with_landmarks": labelled,
            "landmarks": ("landmark loss masked for the faces without landmark labels "
                          f"({faces - labelled} of {faces})" if labelled < faces else "labels for every face"),
        }

    # -- the run --------------------------------------------------------------------------------------------------
    def run(self, *, resume: bool = False) -> TrainResult:
        c = self.config
        torch.manual_seed(c.seed)
        annotations = self._data()
        resume_state = self._resume_state() if resume else None
        present = [name for name in RUN_FILES if (self.out / name).exists()]
        if not resume and present:
            raise EdgefaceError(f"{self.out} already holds {', '.join(present)}: resume the run there with --resume, "
                                "or give another output folder (nothing was overwritten)")
        model = get_model(c.model, weights=None if resume_state else c.weights, negative_slope=c.negative_slope)
        start_weights = getattr(model, "weights_info", None)
        model.to(self.device)
        dataset = TrainingSet(annotations, TrainAugmentation(c.image_size, model.config.mean_bgr),
                              model.config.mean_bgr, c.seed)
        batchnorm = "trained (batch statistics)"
        if c.weights is not None:
            unfolded = 0
            if resume_state is None:
                count = min(len(dataset), UNFOLD_IMAGES)
                self.log(f"checking the start weights' BatchNorm statistics on {count} training images")
                batches = (collate([dataset[i] for i in range(start, min(count, start + c.batch_size))])[0]
                           .to(self.device) for start in range(0, count, c.batch_size))
                unfolded = unfold_batchnorm(model, batches)
            batchnorm = "statistics of the start weights, frozen (fine-tuning)"
            if unfolded:
                batchnorm = (f"statistics frozen after re-estimating them on {count} training images: the start "
                             f"weights had {unfolded} BatchNorm layers folded into their convolutions")
        teacher = None
        if c.qat:
            # the start weights (unfolding BatchNorm did not change their function), also when resuming
            teacher = get_model(c.model, weights=c.weights, negative_slope=c.negative_slope)
            teacher = teacher.to(self.device).eval().requires_grad_(False)
            model = self._quantisation_aware(model, dataset, resume_state is not None)
            optimizer = torch.optim.Adam([
                {"params": [p for p in model.net.parameters() if p.requires_grad], "lr": c.lr},
                {"params": [p.log_scale for p in model.points.values()], "lr": QAT_SCALE_LR},
                {"params": [p.zero_point for p in model.points.values()], "lr": QAT_ZERO_POINT_LR}])
        else:
            optimizer = torch.optim.SGD(model.parameters(), lr=c.lr, momentum=c.momentum,
                                        weight_decay=c.weight_decay)
        self._set_mode(model)
        per_epoch = math.ceil(len(dataset) / c.batch_size)
        scheduler = learning_rate_schedule(optimizer, c, per_epoch)
        record = {
            "format": RUN_FORMAT, "config": c.to_dict(), "model_config": model.config.to_dict(),
            "start_weights": start_weights, "data": self._data_record(annotations),
            "teacher": {"weights": start_weights, "loss": "distillation_loss (edgeface.training.loss): KL of the "
                        "class scores, smooth-L1 of box and landmark offsets, weighted by the teacher's face "
                        f"probability; x{c.distillation:g}, added to the ground-truth loss"} if c.qat else None,
            "quantization": {**QuantizationScheme().to_dict(), "equalization": self.equalized} if c.qat else None,
            "iteration_columns": ["iteration", "epoch", "lr", *LOSS_TERMS, *(["distillation"] if c.qat else [])],
            "batchnorm": batchnorm,
            "versions": library_versions("edgeface", "torch", "numpy", "albumentations", "opencv-python-headless"),
            "device": _device_name(self.device), "command": sys.argv, "epochs": [], "iterations": [],
            "seconds": 0.0, "finished": False,
        }
        first_epoch = 0
        if resume_state is not None:
            model.load_state_dict(resume_state["model"])
            optimizer.load_state_dict(resume_state["optimizer"])
            scheduler.load_state_dict(resume_state["scheduler"])
            previous = json.loads((self.out / RECORD_FILE).read_text())
            if previous["data"]["annotations_sha256"] != record["data"]["annotations_sha256"]:
                raise EdgefaceError(f"{c.annotations} changed since the run in {self.out} started; resume with the "
                                    "same annotations, or start a new run")
            record.update({k: previous[k] for k in ("start_weights", "teacher", "batchnorm", "epochs",
                                                    "iterations", "seconds", "quantization") if k in previous})
            first_epoch = int(resume_state["epoch"])
            self.log(f"resuming {self.out} after epoch {first_epoch}")
        priors = torch.from_numpy(prior_boxes((c.image_size, c.image_size), model.config.anchors).copy())
        priors = priors.to(self.device)
        variance = model.config.anchors.variance
        self.out.mkdir(parents=True, exist_ok=True)
        for epoch in range(first_epoch, c.epochs):
            started = time.perf_counter()
            dataset.epoch = epoch
            loader = DataLoader(dataset, batch_size=c.batch_size, shuffle=True, num_workers=self.workers,
                                collate_fn=collate, generator=torch.Generator().manual_seed(c.seed * 100003 + epoch))
            sums: dict[str, float] = {}
            bar = _bar(_loaded(loader), f"epoch {epoch + 1}/{c.epochs}", self.progress, total=len(loader))
            for images, faces in bar:
                targets = [match_priors(f["boxes"].to(self.device), f["landmarks"].to(self.device),
                                        f["has_landmarks"].to(self.device), priors, variance=variance) for f in faces]
                loc, logits, landmarks = model.forward_logits(images.to(self.device))
                losses = multibox_loss(loc, logits, landmarks, targets, c.loss)
                if teacher is not None:
                    with torch.no_grad():
                        soft_targets = teacher(images.to(self.device))
                    losses["distillation"] = distillation_loss(loc, logits, landmarks, soft_targets)
                    losses["total"] = losses["total"] + c.distillation * losses["distillation"]
                if not torch.isfinite(losses["total"]):
                    raise EdgefaceError(f"the loss became {losses['total'].item()} in epoch {epoch + 1}: training "
                                        f"diverged; lower the learning rate (--lr, now {c.lr:g}) or lengthen the "
                                        f"warm-up (--warmup-epochs, now {c.warmup_epochs:g})")
                optimizer.zero_grad(set_to_none=True)
                losses["total"].backward()
                optimizer.step()
                lr = optimizer.param_groups[0]["lr"]
                scheduler.step()
                values = {k: float(v.detach()) for k, v in losses.items()}
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v
                record["iterations"].append([len(record["iterations"]) + 1, epoch + 1, lr,
                                             *(round(values[k], 5) for k in record["iteration_columns"][3:])])
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix({k: f"{v:.3f}" for k, v in values.items()})
            count = max(1, len(loader))
            summary = {"epoch": epoch + 1, "iterations": len(loader), "lr": lr,
                       "loss": {k: round(v / count, 5) for k, v in sums.items()},
                       "seconds": round(time.perf_counter() - started, 1)}
            if epoch + 1 in c.val_epochs:
                summary["val_ap"] = self._validate(model)
            record["epochs"].append(summary)
            record["seconds"] = round(record["seconds"] + time.perf_counter() - started, 1)
            record["finished"] = epoch + 1 == c.epochs
            self._save(model, optimizer, scheduler, epoch + 1, record)
            ap = summary.get("val_ap")
            self.log(f"epoch {epoch + 1}/{c.epochs}: loss {summary['loss']['total']:.4f} (box "
                     f"{summary['loss']['box']:.4f}, class {summary['loss']['classification']:.4f}, landmarks "
                     f"{summary['loss']['landmarks']:.4f}"
                     + (f", distillation {summary['loss']['distillation']:.4f}" if c.qat else "")
                     + f"), lr {lr:.2e}, {summary['seconds']:.0f} s"
                     + (f"; val AP {ap['easy']:.4f} / {ap['medium']:.4f} / {ap['hard']:.4f}" if ap else ""))
        return TrainResult(self.out, self.out / WEIGHTS_FILE, record)

    def _set_mode(self, model: torch.nn.Module) -> None:
        """Training mode; fine-tuning keeps the BatchNorm statistics (batches of a few images estimate them badly),
        while their scale and shift still train."""
        model.train()
        if self.config.weights is not None and not self.config.qat:  # (QAT freezes them itself)
            for module in model.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def _quantisation_aware(self, model: torch.nn.Module, dataset: TrainingSet, resuming: bool
                            ) -> QuantizationAwareRetinaFace:
        """``model`` with onnxruntime's quantisation simulated, started from its min-max calibration on training
        images (or, when resuming, from the run's own record: the resumed state then overwrites it)."""
        size = self.config.image_size
        if resuming:
            initial = read_qat_run(self.out)["tensors"]
        else:
            count = min(len(dataset), QAT_CALIBRATION_IMAGES)
            calibration = [dataset[i][0][None].numpy() for i in range(count)]
            chains = equalize_activations(model.body.stage1, model,
                                          [torch.from_numpy(b).to(self.device) for b in calibration])
            self.equalized = f"body.stage1: {chains} chains, strength {EQUALIZE_STRENGTH} ({count} training images)"
            self.log(f"QAT: activations of {self.equalized} equalised; onnxruntime min-max calibration of the "
                     "full-integer graph")
            initial = onnxruntime_parameters(copy.deepcopy(model).cpu(), calibration, (size, size),
                                             opset=OPSET.default)
        return QuantizationAwareRetinaFace(model, {k: tuple(v) for k, v in initial.items()}).to(self.device)

    def _resume_state(self) -> dict[str, Any]:
        path = self.out / RESUME_FILE
        if not path.is_file() or not (self.out / RECORD_FILE).is_file():
            raise EdgefaceError(f"nothing to resume in {self.out}: no {RESUME_FILE} and {RECORD_FILE} there")
        return torch.load(path, map_location=self.device, weights_only=True)

    def _validate(self, model: torch.nn.Module) -> dict[str, float]:
        """WIDER AP of a copy of ``model`` on the CPU (the protocol's original-scale images do not batch), by
        :func:`~edgeface.evaluation.accuracy.evaluate_detector`."""
        c = self.config
        evaluated = copy.deepcopy(model).cpu().eval()
        detector = Detector.for_model(evaluated, **{**WIDER_SETTINGS, "resize": c.val_resize})
        result = evaluate_detector(detector.detect_arrays, c.val_images, load_ground_truth(c.val_gt),
                                   limit=c.val_limit, progress=self.progress)
        return {**{k: round(v, 4) for k, v in result.ap.items()}, "images": result.num_images}

    def _save(self, model, optimizer, scheduler, epoch: int, record: dict[str, Any]) -> None:
        qat = isinstance(model, QuantizationAwareRetinaFace)
        weights = model.float_state_dict() if qat else {k: v.detach().cpu() for k, v in model.state_dict().items()}
        atomic_write(self.out / WEIGHTS_FILE, lambda p: torch.save(weights, p))
        if qat:
            quantization = {
                "format": QAT_FORMAT, "scheme": record["quantization"], "opset": OPSET.default,
                "input_hw": [self.config.image_size] * 2, "weights_sha256": sha256_file(self.out / WEIGHTS_FILE),
                "start_weights": record["start_weights"], "teacher": record["teacher"], "data": record["data"],
                "epochs": epoch, "iterations": len(record["iterations"]), "lr": self.config.lr,
                "tensors": {k: list(v) for k, v in model.learned_parameters().items()}}
            atomic_write(self.out / QAT_FILE, lambda p: p.write_text(json.dumps(quantization, indent=1)))
        state = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch}
        atomic_write(self.out / RESUME_FILE, lambda p: torch.save(state, p))
        atomic_write(self.out / RECORD_FILE, lambda p: p.write_text(json.dumps(record)))
        plot_losses(record, self.out / PLOT_FILE)


def _bar(items, description: str, progress: bool, total: int):
    return tqdm(items, desc=description, unit="batch", file=sys.stderr, leave=False, total=total,
                disable=not progress or not sys.stderr.isatty())


def _loaded(loader: DataLoader):
    """The loader's batches; an EdgefaceError raised in a worker process (a damaged image) comes out as its one
    line, not with the worker's traceback that PyTorch puts into the message."""
    try:
        yield from loader
    except EdgefaceError as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        raise EdgefaceError(lines[-1].split("Error: ", 1)[-1] if len(lines) > 1 else str(exc)) from None


def plot_losses(record: dict[str, Any], path: Path) -> Path | None:
    """The loss terms per iteration (a moving average over an epoch's worth) and validation AP per epoch, as a PNG;
    None where matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure  # object API: no display, no global state
    except ImportError:
        return None
    columns = record.get("iteration_columns", ["iteration", "epoch", "lr", *LOSS_TERMS])
    rows = np.asarray(record["iterations"], np.float64).reshape(-1, len(columns))
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    axes = figure.add_subplot()
    window = max(1, min(len(rows), record["epochs"][0]["iterations"] if record["epochs"] else 1))
    kernel = np.ones(window) / window
    for column, name in enumerate(columns[3:], 3):
        if not rows[:, column].any():  # e.g. landmarks without landmark labels: nothing to draw on a log scale
            continue
        smoothed = np.convolve(rows[:, column], kernel, mode="valid") if len(rows) >= window else rows[:, column]
        axes.plot(rows[window - 1:, 0] if len(rows) >= window else rows[:, 0], smoothed, label=name)
    axes.set_xlabel("iteration")
    axes.set_ylabel("loss" + (f" (moving average over {window} iterations)" if window > 1 else ""))
    axes.set_yscale("log")
    axes.grid(True, alpha=0.3)
    if any("val_ap" in e for e in record["epochs"]):
        ap_axes = axes.twinx()
        last = np.cumsum([e["iterations"] for e in record["epochs"]])
        points = [(last[i], e["val_ap"]) for i, e in enumerate(record["epochs"]) if "val_ap" in e]
        for subset, marker in (("easy", "o"), ("medium", "s"), ("hard", "^")):
            ap_axes.plot([x for x, _ in points], [ap[subset] for _, ap in points], marker=marker, linestyle=":",
                         color="black", label=f"val AP {subset}")
        ap_axes.set_ylabel("validation AP")
        ap_axes.set_ylim(0, 1)
        ap_axes.legend(loc="lower right", fontsize="small")
    axes.legend(loc="upper right", fontsize="small")
    axes.set_title(f"{record['config']['model']}: {record['data']['images']} images, {record['device']}")
    atomic_write(path, lambda p: figure.savefig(p, format="png", dpi=100))
    return path


def train(config: TrainConfig, out: str | Path, *, resume: bool = False, device: str = "cpu", workers: int = 0,
          log: Callable[[str], None] = print, progress: bool = False) -> TrainResult:
    """Run (or ``resume``) training as ``config`` says into ``out``. Raises
    :class:`~edgeface.core.errors.EdgefaceError` for bad data, a diverging loss, or an output folder that already
    holds another run."""
    return Trainer(config, out, device=device, workers=workers, log=log, progress=progress).run(resume=resume)


__all__ = ["TrainConfig", "Trainer", "TrainResult", "train", "learning_rate_schedule", "plot_losses"]

