"""Plots of probe results: per-channel R² bars, the layers × channels fingerprint, stack R² side by side.

Read results with :func:`posvit_cli.core.measure.probe.read_probe_result`. Each plot is written as PNG and SVG,
atomically, with its numbers in the titles.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from posvit_cli.core.errors import PosvitError, PosvitWarning
from posvit_cli.core.viz.index import FigureEntry
from posvit_cli.core.viz.layout import DPI, save_figure
from posvit_cli.core.viz.pictures import slug
from posvit_cli.core.viz.scores import fmt

__all__ = ["channel_bars_plot", "fingerprint_plot", "report_plot", "result_label", "stack_comparison_plot"]

RAMPS = ("lr", "ud", "diag", "radial", "xy")
TARGET_ORDER = ("lr", "ud", "diag", "radial", "xy", "random", "raster")
#: Per-channel R² below this are drawn at it (a single channel's held-out R² can be far below 0).
BAR_FLOOR = -0.5


def result_label(result: dict, fallback: str = "") -> str:
    """A short name for a probe result: model, random-weights marker and debiasing."""
    st = result.get("store") or {}
    name = st.get("model") or fallback or "features"
    if st.get("weights") == "random":
        name += " (random weights)"
    for d in st.get("debias") or []:
        if isinstance(d, dict):
            name += f" + {d.get('method', '?')}"
    for m in (st.get("provenance") or {}).get("modifications") or []:
        if isinstance(m, dict):
            name += f" + {m.get('name', '?')}"
    return name


def _figure(w_px: int, h_px: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w_px / DPI, h_px / DPI), dpi=DPI, facecolor="white", layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _suptitle(fig, w_px: int, *lines: str) -> None:
    """A figure title wrapped to the figure's width (11 pt DejaVu Sans: about 8.6 px a character)."""
    import textwrap

    chars = max(40, int(w_px / 8.6))
    fig.suptitle("\n".join(w for ln in lines for w in textwrap.wrap(ln, chars)), fontsize=11)


def _settings_text(result: dict) -> str:
    s = result.get("settings") or {}
    st = result.get("store") or {}
    bits = [f"{s.get('protocol', '?')} protocol", f"{s.get('sampling', '?')} sampling"]
    if s.get("sampling") == "random" and s.get("fraction") is not None:
        bits[-1] += f" {s['fraction']:.3g}"
    bits.append(f"{s.get('regressor', '?')}" + (f" α={s['alpha']:g}" if s.get("regressor") == "ridge" else ""))
    bits.append(f"{s.get('repeats', '?')} repeats")
    bits.append(f"{st.get('n_images', '?')} images")
    return ", ".join(bits)


def _means(block: dict, target: str) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in block["channel_r2"][target]["mean"]], dtype=np.float64)


def _layer_block(result: dict, layer: str | None, name: str) -> tuple[str, dict]:
    results = result.get("results") or {}
    ly = layer or result.get("primary_layer") or (result.get("layers") or [None])[-1]
    if ly not in results:
        raise PosvitError(f"{name} has no layer '{ly}' (probed: {', '.join(results) or 'none'})")
    return ly, results[ly]


def channel_bars_plot(result: dict, outdir: str | os.PathLike, *, label: str, layer: str | None = None,
                      top_k: int | None = None, name: str = "the probe result", command: str = "") -> list[FigureEntry]:
    """Per-channel R² bars, one panel per ramp, the top channels coloured and named.

    Returns
    -------
    list of FigureEntry
        Empty (with a warning) when the result has no per-channel scores.
    """
    ly, block = _layer_block(result, layer, name)
    if "channel_r2" not in block:
        warnings.warn(f"{name} has no per-channel scores (probed with --no-per-channel): no channel bars",
                      PosvitWarning, stacklevel=2)
        return []
    ramps = [t for t in RAMPS if t in block["channel_r2"]]
    k = int(top_k or (result.get("settings") or {}).get("top_k") or 2)
    C = len(block["channel_r2"][ramps[0]]["mean"])
    fig = _figure(1100, 60 + 170 * len(ramps))
    axes = fig.subplots(len(ramps), 1, sharex=True, squeeze=False)[:, 0]
    numbers = {}
    for ax, t in zip(axes, ramps):
        r2 = _means(block, t)
        shown = np.clip(np.nan_to_num(r2, nan=BAR_FLOOR), BAR_FLOOR, 1.0)
        order = np.argsort(-np.where(np.isfinite(r2), r2, -np.inf), kind="stable")[:k]
        colours = np.full(C, "#9a9a9a", dtype=object)
        colours[order] = "#d62728"
        ax.bar(np.arange(C), shown, width=1.0, color=list(colours), linewidth=0)
        for c in order:
            ax.annotate(f"{c}: {fmt(r2[c])}", (c, shown[c]), xytext=(0, 3), textcoords="offset points",
                        ha="center", va="bottom", fontsize=8, color="#d62728")
        st = block["stack_r2"].get(t, {})
        ax.set_title(f"{t} · stack R² {fmt(st.get('mean'))} ± {fmt(st.get('std'))} · best channel {order[0]} "
                     f"({fmt(r2[order[0]])})", fontsize=10, loc="left")
        ax.set_ylim(BAR_FLOOR if np.nanmin(shown) < 0 else 0.0, 1.12)
        ax.axhline(0, color="0.3", lw=0.6)
        ax.set_ylabel("channel R²", fontsize=9)
        ax.tick_params(labelsize=8)
        numbers[t] = {"stack_r2": st.get("mean"), "top": [int(c) for c in order],
                      "top_r2": [float(r2[c]) for c in order]}
    axes[-1].set_xlabel("channel", fontsize=9)
    axes[-1].set_xlim(-0.5, C - 0.5)
    title = f"Per-channel positional R² ({ly}) · {label}"
    _suptitle(fig, 1100, title, f"{_settings_text(result)}; each channel alone (bars below {BAR_FLOOR} drawn at "
              f"it); top {k} per ramp in red")
    suffix = "" if ly == result.get("primary_layer") else f"_{slug(ly)}"
    stem = Path(outdir) / f"probe-channels_{slug(label)}{suffix}"
    files = save_figure(fig, stem, ("png", "svg"), title=title)
    rel = [f.relative_to(outdir).as_posix() for f in files]
    caption = "; ".join(f"{t}: stack R² {fmt(v['stack_r2'])}, top {v['top']}" for t, v in numbers.items())
    return [FigureEntry(rel[0], "probe", title, caption, rel[1:], {"layer": ly, "ramps": numbers}, command)]


def fingerprint_plot(result: dict, outdir: str | os.PathLike, *, label: str, name: str = "the probe result",
                     command: str = "") -> list[FigureEntry]:
    """The layers × channels fingerprint: dataset-mean per-channel R² for each ramp, one heatmap per ramp.

    Returns
    -------
    list of FigureEntry
        Empty when the result has no per-channel scores.
    """
    from posvit_cli.core.measure.probe import fingerprint

    layers = list(result.get("layers") or [])
    blocks = [result["results"][ly] for ly in layers]
    if not layers or any("channel_r2" not in b for b in blocks):
        warnings.warn(f"{name} has no per-channel scores for every layer: no fingerprint", PosvitWarning,
                      stacklevel=2)
        return []
    ramps = [t for t in RAMPS if all(t in b["channel_r2"] for b in blocks)]
    fig = _figure(1100, 80 + len(ramps) * max(110, 16 * len(layers) + 60))
    axes = fig.subplots(len(ramps), 1, squeeze=False)[:, 0]
    im = None
    numbers = {}
    for ax, t in zip(axes, ramps):
        _, mat = fingerprint(result, t)
        im = ax.imshow(np.nan_to_num(mat, nan=0.0), aspect="auto", cmap="magma", vmin=0.0, vmax=1.0,
                       interpolation="nearest")
        ax.set_yticks(range(len(layers)), layers, fontsize=8)
        best = np.nanmax(mat, axis=1)
        arg = np.nanargmax(np.where(np.isfinite(mat), mat, -np.inf), axis=1)
        ax.set_title(f"{t} · best channel per layer: " + ", ".join(
            f"{ly} {a} ({fmt(b)})" for ly, a, b in list(zip(layers, arg, best))[-4:]), fontsize=9, loc="left")
        ax.tick_params(labelsize=8)
        numbers[t] = {ly: {"best_channel": int(a), "r2": float(b)} for ly, a, b in zip(layers, arg, best)}
    axes[-1].set_xlabel("channel", fontsize=9)
    if im is not None:
        cb = fig.colorbar(im, ax=list(axes), shrink=0.9, pad=0.01)
        cb.set_label("per-channel R² (below 0 drawn as 0)", fontsize=9)
    title = f"Positional fingerprint, layers × channels · {label}"
    _suptitle(fig, 1100, title, _settings_text(result))
    files = save_figure(fig, Path(outdir) / f"probe-fingerprint_{slug(label)}", ("png", "svg"), title=title)
    rel = [f.relative_to(outdir).as_posix() for f in files]
    caption = f"{len(layers)} layers × {len(blocks[0]['channel_r2'][ramps[0]]['mean'])} channels, ramps {', '.join(ramps)}."
    return [FigureEntry(rel[0], "probe", title, caption, rel[1:], {"ramps": numbers}, command)]


def stack_comparison_plot(results: Sequence[dict], labels: Sequence[str], outdir: str | os.PathLike, *,
                          layers: Sequence[str | None] | None = None, names: Sequence[str] | None = None,
                          command: str = "", floor: float | None = None) -> list[FigureEntry]:
    """Stack R² per target, one bar per result side by side (e.g. before and after debiasing), with ± std.

    ``floor``: the lowest R² on the axis (bars and error bars below it are cut there, their numbers written at
    it), so that one image's far negative R² does not flatten every other bar.

    Raises
    ------
    PosvitError
        If the results share no target.
    """
    if len(results) != len(labels):
        raise PosvitError(f"{len(labels)} labels for {len(results)} results")
    layers = list(layers) if layers else [None] * len(results)
    names = list(names) if names else [f"result {i + 1}" for i in range(len(results))]
    blocks = [_layer_block(r, ly, n) for r, ly, n in zip(results, layers, names)]
    targets = [t for t in TARGET_ORDER if all(t in b["stack_r2"] for _, b in blocks)]
    if not targets:
        raise PosvitError("the probe results share no target: probe them with the same --targets")
    settings = {_settings_text(r).rsplit(",", 1)[0] for r in results}
    if len(settings) > 1:
        warnings.warn("the results were probed with different settings: " + " | ".join(sorted(settings)),
                      PosvitWarning, stacklevel=2)
    n = len(results)
    width_px = int(min(1600, max(700, 160 + len(targets) * (40 + 45 * n))))
    fig = _figure(width_px, 480)
    ax = fig.subplots()
    width = 0.8 / n
    from matplotlib import colormaps

    cols = colormaps["tab10"](np.arange(n) % 10)
    x = np.arange(len(targets))
    low = 0.0
    numbers = []
    for k, ((ly, b), lab) in enumerate(zip(blocks, labels)):
        means = np.array([np.nan if b["stack_r2"][t]["mean"] is None else b["stack_r2"][t]["mean"] for t in targets])
        stds = np.array([0.0 if b["stack_r2"][t]["std"] is None else b["stack_r2"][t]["std"] for t in targets])
        pos = x - 0.4 + width * (k + 0.5)
        ax.bar(pos, np.nan_to_num(means), width * 0.92, yerr=stds, color=cols[k], label=f"{lab} ({ly})",
               capsize=2, error_kw={"lw": 0.8})
        for px, m, s in zip(pos, means, stds):
            if math.isfinite(m):
                at = m + s if m >= 0 else m - s if floor is None else max(m - s, floor)
                ax.annotate(fmt(m), (px, at), xytext=(0, 2 if m >= 0 else -2),
                            textcoords="offset points", ha="center", va="bottom" if m >= 0 else "top", fontsize=8)
        finite = means[np.isfinite(means)]
        if finite.size:
            low = min(low, float((finite - stds[np.isfinite(means)]).min()))
        numbers.append({"label": lab, "layer": ly, "stack_r2": {t: (None if not math.isfinite(m) else float(m))
                                                                  for t, m in zip(targets, means)}})
    ax.axhline(0, color="0.3", lw=0.6)
    ax.set_xticks(x, [t + (" (control)" if t in ("random", "raster") else "") for t in targets], fontsize=9)
    if floor is not None:
        low = max(low, floor)
    ax.set_ylim(low - 0.12 if low < 0 else 0.0, 1.12)
    ax.set_ylabel("stack R² (mean ± std over images × repeats)", fontsize=9)
    ax.legend(fontsize=8, loc="upper right", framealpha=0.9)
    ax.tick_params(labelsize=8)
    title = "Stack R² of positional probes: " + " vs ".join(labels)
    _suptitle(fig, width_px, title, " | ".join(sorted(settings)))
    stem = "probe-stack-r2_" + slug("_vs_".join(slug(lb, 40) for lb in labels), 120)
    files = save_figure(fig, Path(outdir) / stem, ("png", "svg"), title=title)
    rel = [f.relative_to(outdir).as_posix() for f in files]
    key = "xy" if "xy" in targets else targets[0]
    caption = "; ".join(f"{v['label']}: {key} R² {fmt(v['stack_r2'][key])}" for v in numbers)
    return [FigureEntry(rel[0], "probe", title, caption, rel[1:], {"results": numbers}, command)]


def _number(v) -> float:
    """A report value as a float, NaN where the report has none."""
    return np.nan if v is None else float(v)


def _label_bars(ax, pos, vals, errs=None) -> None:
    """Write each finite bar's value above it (below for negative bars), clear of its error bar."""
    errs = np.zeros_like(vals) if errs is None else errs
    for px, m, s in zip(pos, vals, errs):
        if math.isfinite(m):
            ax.annotate(fmt(m), (px, m + s if m >= 0 else m - s), xytext=(0, 2 if m >= 0 else -2),
                        textcoords="offset points", ha="center", va="bottom" if m >= 0 else "top", fontsize=8)


def _positional_panel(ax, rows, labels, x, cols) -> list[dict]:
    """Held-out xy stack R² per row (± std) with the random-target null as a tick; returns the numbers per row."""
    xy = np.array([_number(r["positional"]["stack_r2"].get("xy")) for r in rows])
    xy_std = np.array([_number((r["positional"].get("stack_r2_std") or {}).get("xy")) for r in rows])
    null = np.array([_number(r["positional"]["stack_r2"].get("random")) for r in rows])
    ax.bar(x, np.nan_to_num(xy), 0.7, yerr=np.nan_to_num(xy_std), color=cols, capsize=2, error_kw={"lw": 0.8})
    ax.scatter(x, null, marker="_", s=900, color="black", zorder=3, label="null (random target)")
    _label_bars(ax, x, xy, np.nan_to_num(xy_std))
    finite = np.concatenate([(xy - np.nan_to_num(xy_std))[np.isfinite(xy)], null[np.isfinite(null)]])
    low = min(0.0, float(finite.min())) if finite.size else 0.0
    high = float(np.nanmax(xy + np.nan_to_num(xy_std))) if np.isfinite(xy).any() else 1.0
    ax.set_ylim(low - 0.2 if low < 0 else 0.0, max(1.12, high + 0.15))
    ax.axhline(0, color="0.3", lw=0.6)
    ax.set_title("position: held-out xy stack R²\n(black tick: the random-target null)", fontsize=9)
    return [{"name": lab, "xy_r2": None if not math.isfinite(a) else float(a),
             "random_r2": None if not math.isfinite(b) else float(b)} for lab, a, b in zip(labels, xy, null)]


def _semantic_panel(ax, rows, x, cols, numbers: list[dict]) -> None:
    """Linear-probe mIoU per row, each transformed store's mIoU as a marker; adds ``semantic_miou`` to numbers."""
    sem = np.array([_number((r.get("semantic") or {}).get("miou")) for r in rows])
    ax.bar(x, np.nan_to_num(sem), 0.7, color=cols)
    _label_bars(ax, x, sem)
    transforms = []
    for r in rows:
        transforms += [t["transform"] for t in r.get("robustness") or [] if t["transform"] not in transforms]
    markers = "v^<>sDpo*"
    for j, t in enumerate(transforms):
        vals = np.array([_number(next((q["miou"] for q in r.get("robustness") or [] if q["transform"] == t), None))
                         for r in rows])
        ax.scatter(x + 0.25, vals, marker=markers[j % len(markers)], s=28, color="black", zorder=3,
                   label=f"on {t} store")
    ax.set_ylim(0, 1.12)
    ax.set_title("semantics: linear-probe mIoU" + ("\n(markers: on transformed images)" if transforms else "\n"),
                 fontsize=9)
    if transforms:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(3, len(transforms)),
                  frameon=False)
    for d, v in zip(numbers, sem):
        d["semantic_miou"] = None if not math.isfinite(v) else float(v)


def _cluster_panel(ax, rows, ks, x, cols, numbers: list[dict]) -> None:
    """Overclustering mIoU ± std per row, one bar per (k, matching); adds ``cluster_miou`` to numbers."""
    w = 0.8 / len(ks)
    for j, (k, matching) in enumerate(ks):
        cl = [next((c for c in r.get("cluster") or [] if (c["k"], c["matching"]) == (k, matching)), None)
              for r in rows]
        m = np.array([_number(c["miou_mean"]) if c else np.nan for c in cl])
        s = np.array([_number(c["miou_std"]) if c else 0.0 for c in cl])
        pos = x - 0.4 + w * (j + 0.5)
        ax.bar(pos, np.nan_to_num(m), w * 0.92, yerr=np.nan_to_num(s), color=cols, capsize=2,
               error_kw={"lw": 0.8}, alpha=1.0 - 0.5 * j / max(1, len(ks) - 1) if len(ks) > 1 else 1.0)
        _label_bars(ax, pos, m, np.nan_to_num(s))
        for px in pos:
            ax.annotate(f"k={k}", (px, 0), xytext=(0, 2), textcoords="offset points", ha="center",
                        va="bottom", fontsize=7, color="white")
        for d, v in zip(numbers, m):
            d.setdefault("cluster_miou", {})[str(k)] = None if not math.isfinite(v) else float(v)
    ax.set_ylim(0, 1.12)
    ax.set_title("overclustering mIoU\n(mean ± std over seeds)", fontsize=9)


def report_plot(doc: dict, outdir: str | os.PathLike, *, name: str = "the report",
                command: str = "") -> list[FigureEntry]:
    """The comparison of a ``posvit report``, one colour per row: positional R², semantic mIoU, overclustering.

    Panels: the held-out xy stack R² of each row with its ``random``-target null as a black tick (position is
    gone when the bar reaches the tick); with masks, the semantic probe's mIoU with each transformed store's
    mIoU as a marker (robustness); with overclustering, mIoU ± std over seeds per k.

    Parameters
    ----------
    doc : dict
        A report document (:func:`posvit_cli.core.measure.report.read_report`).

    Raises
    ------
    PosvitError
        If the report has no rows.
    """
    rows = doc.get("rows") or []
    if not rows:
        raise PosvitError(f"{name} has no rows")
    labels = [str(r["name"]) for r in rows]
    n = len(rows)
    has_sem = any(r.get("semantic") for r in rows)
    ks = sorted({(c["k"], c["matching"]) for r in rows for c in r.get("cluster") or []})
    panels = 1 + int(has_sem) + int(bool(ks))
    from matplotlib import colormaps

    cols = colormaps["tab10"](np.arange(n) % 10)
    per_panel = max(300, 90 + 60 * n * max(1, len(ks)))
    width_px = int(min(2400, panels * per_panel))
    fig = _figure(width_px, 520)
    axes = np.atleast_1d(fig.subplots(1, panels))
    x = np.arange(n)
    numbers = _positional_panel(axes[0], rows, labels, x, cols)
    if has_sem:
        _semantic_panel(axes[1], rows, x, cols, numbers)
    if ks:
        _cluster_panel(axes[-1], rows, ks, x, cols, numbers)

    for ax in axes:
        ax.set_xticks(x, labels, fontsize=8, rotation=20 if n > 4 else 0)
        ax.tick_params(labelsize=8)
    title = "posvit report: " + " vs ".join(labels)
    sub = [f"{rows[0].get('model') or '?'}; {rows[0].get('n_images', '?')} images"]
    if has_sem:
        sem_set = (doc.get("settings") or {}).get("semantic") or {}
        sub.append(f"semantic head {sem_set.get('head', '?')} on {sem_set.get('resolution', '?')}")
    _suptitle(fig, width_px, title, "; ".join(sub))
    stem = "report_" + slug("_vs_".join(slug(lb, 40) for lb in labels), 120)
    files = save_figure(fig, Path(outdir) / stem, ("png", "svg"), title=title)
    rel = [f.relative_to(outdir).as_posix() for f in files]
    bits = []
    for d in numbers:
        b = f"{d['name']}: xy R² {fmt(d['xy_r2'])} (null {fmt(d['random_r2'])})"
        if "semantic_miou" in d:
            b += f", semantic mIoU {fmt(d['semantic_miou'])}"
        for k, v in (d.get("cluster_miou") or {}).items():
            b += f", k={k} {fmt(v)}"
        bits.append(b)
    return [FigureEntry(rel[0], "report", title, "; ".join(bits), rel[1:], {"rows": numbers}, command)]
