"""Figures of bench reports: latency against WIDER FACE hard AP, precision-recall curves and latency against image
size for one device, and p50 latency of every artifact across devices for merged reports."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgeface.core.errors import EdgefaceError, require
from edgeface.core.files import atomic_write

SUBSETS = ("easy", "medium", "hard")


def _matplotlib() -> tuple[Any, Any]:
    """``(Figure, ticker)``, imported only when a plot is drawn: matplotlib is an optional extra."""
    require("matplotlib", "bench", "drawing bench plots")
    from matplotlib import ticker
    from matplotlib.figure import Figure  # object API: no pyplot global state, no display needed

    return Figure, ticker


def _measured(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Results with latency; failed or export-only results carry none."""
    return [r for r in record.get("results") or [] if r.get("status") == "ok" and r.get("latency")]


def _style(result: dict[str, Any], index: int) -> dict[str, Any]:
    """Same colour for an artifact in every figure; the outside reference stands apart in black and dashed."""
    if result.get("reference"):
        return {"color": "black", "linestyle": "--", "marker": "s", "label": f"{result['name']} (reference)"}
    return {"color": f"C{index % 10}", "linestyle": "-", "marker": "o", "label": result["name"]}


def _device_label(device: dict[str, Any]) -> str:
    name = device.get("board") or device.get("hostname") or "unknown device"
    return f"{name} ({device['cpu']})" if device.get("cpu") else name


def _first_size_label(results: Sequence[dict[str, Any]]) -> str:
    """Which size the latency was measured at, e.g. ``vga 480x640``; artifacts may differ."""
    sizes = dict.fromkeys(_size_label(r["latency"][0]) for r in results)
    return ", ".join(sizes)


def _size_label(record: dict[str, Any]) -> str:
    hw = record.get("image") or record.get("input")
    return f"{record['size']} {hw[1]}x{hw[0]}" if hw else record["size"]


def _save(fig: Any, path: Path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


def _log_ms_axis(axis: Any, set_scale: Any, ticker: Any) -> None:
    """Latency on a log axis: one slow artifact (FP32 PyTorch, an outside baseline) would flatten every other
    point against zero on a linear one. Ticks at 1, 2, 5 x 10^n in plain ms (log axes label only powers of ten)."""
    set_scale("log")
    axis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
    axis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    axis.set_minor_formatter(ticker.NullFormatter())


def plot_report(record: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """Write latency_vs_ap.png, pr_curves.png and latency_vs_size.png into ``out_dir``; a figure with nothing to
    draw (no accuracy, no latency) is skipped. Returns the paths written."""
    Figure, ticker = _matplotlib()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    measured = _measured(record)
    styles = {r["name"]: _style(r, i) for i, r in enumerate(measured)}
    device = _device_label(record.get("device") or {})
    written = []

    with_ap = [r for r in measured if ((r.get("accuracy") or {}).get("ap") or {}).get("hard") is not None]
    if with_ap:
        fig = Figure(figsize=(7.5, 5.5), layout="constrained")
        ax = fig.add_subplot()
        for r in with_ap:
            style = styles[r["name"]]
            x, y = r["latency"][0]["total_ms"]["p50"], r["accuracy"]["ap"]["hard"]
            # A legend, not labels at the points: artifacts of one model often sit on top of each other.
            ax.plot([x], [y], linestyle="none", marker=style["marker"], color=style["color"], markersize=8,
                    label=f"{style['label']}: {x:.1f} ms, AP {y:.3f}")
        ax.set_xlabel(f"p50 end-to-end latency at {_first_size_label(with_ap)} (ms, log scale)")
        _log_ms_axis(ax.xaxis, ax.set_xscale, ticker)
        ax.set_ylabel("WIDER FACE hard AP")
        ax.set_title(f"Accuracy vs latency on {device}")
        ax.margins(0.15)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
        written.append(_save(fig, out_dir / "latency_vs_ap.png"))

    with_curves = [r for r in measured if (r.get("accuracy") or {}).get("pr_curves")]
    if with_curves:
        fig = Figure(figsize=(15, 5), layout="constrained")
        for ax, subset in zip(fig.subplots(1, len(SUBSETS), sharey=True), SUBSETS):
            for r in with_curves:
                curve = r["accuracy"]["pr_curves"].get(subset)
                if not curve:
                    continue
                style = styles[r["name"]]
                label = f"{style['label']} (AP {r['accuracy']['ap'][subset]:.3f})"
                ax.plot([p[1] for p in curve], [p[0] for p in curve], **dict(style, marker=None, label=label))
            ax.set(title=f"WIDER FACE {subset}", xlabel="recall", xlim=(0, 1), ylim=(0, 1.02))
            ax.grid(alpha=0.3)
            ax.legend(loc="lower left", fontsize=8)
        fig.axes[0].set_ylabel("precision")
        fig.suptitle(f"Precision-recall on {device}")
        written.append(_save(fig, out_dir / "pr_curves.png"))

    if measured:
        fig = Figure(figsize=(7.5, 5.5), layout="constrained")
        ax = fig.add_subplot()
        sizes: dict[float, str] = {}
        for r in measured:
            # The camera frame's size: a fixed-input model resizes every frame to the same input.
            megapixels = [m["image"][0] * m["image"][1] / 1e6 for m in r["latency"]]
            sizes.update(zip(megapixels, (m["size"] for m in r["latency"])))
            ax.plot(megapixels, [m["total_ms"]["p50"] for m in r["latency"]], **styles[r["name"]])
        ax.set(xscale="log", xlabel="image size (megapixels)", ylabel="p50 end-to-end latency (ms, log scale)",
               title=f"Latency vs image size on {device}")
        # Log axes label only powers of ten by default; name the measured sizes and plain ms values instead.
        ax.set_xticks(list(sizes), [f"{name}\n{mp:.2f} MP" for mp, name in sizes.items()])
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        _log_ms_axis(ax.yaxis, ax.set_yscale, ticker)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=9)
        written.append(_save(fig, out_dir / "latency_vs_size.png"))
    return written


def plot_merged(records: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """One horizontal grouped bar chart: p50 latency at the first measured size of every artifact, per device."""
    Figure, ticker = _matplotlib()
    devices = [(_device_label(rec.get("device") or {}), _measured(rec)) for rec in records]
    devices = [(label, measured) for label, measured in devices if measured]
    if len({label for label, _ in devices}) < len(devices):  # several reports of one device: number them
        devices = [(f"{label} #{i + 1}", measured) for i, (label, measured) in enumerate(devices)]
    if not devices:
        raise EdgefaceError("no bench report has a measured latency to plot (every result failed or was only "
                            "exported); run `edgeface bench` on a device first")
    artifacts = {r["name"]: r for _, measured in devices for r in measured}  # union, in order of appearance
    styles = {name: _style(r, i) for i, (name, r) in enumerate(artifacts.items())}
    bars_total = sum(len(measured) for _, measured in devices)
    fig = Figure(figsize=(9, 1.5 + 0.3 * (bars_total + len(devices))), layout="constrained")
    ax = fig.add_subplot()
    # Top to bottom in reading order: each device's own artifacts, one bar each, a blank row between devices.
    y, ticks, labels, seen = 0.0, [], [], set()
    for label, measured in devices:
        group = [y - i for i in range(len(measured))]
        for row, r in zip(group, measured):
            style, reference = styles[r["name"]], bool(r.get("reference"))  # hatched: black alone reads as shadow
            bars = ax.barh([row], [r["latency"][0]["total_ms"]["p50"]], height=0.85, color=style["color"],
                           hatch="//" if reference else None, edgecolor="white" if reference else None,
                           label=None if r["name"] in seen else style["label"])
            ax.bar_label(bars, fmt="%.1f", padding=3, fontsize=8)
            seen.add(r["name"])
        ticks.append(sum(group) / len(group))
        labels.append(label)
        y -= len(measured) + 1
    ax.set_yticks(ticks, labels)
    ax.set_xlabel(f"p50 end-to-end latency at {_first_size_label([r for _, m in devices for r in m])} "
                  "(ms, log scale)")
    _log_ms_axis(ax.xaxis, ax.set_xscale, ticker)
    ax.set_title("Latency per artifact across devices")
    ax.margins(x=0.12)  # room for the value labels
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: never covers a bar
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save(fig, path)
