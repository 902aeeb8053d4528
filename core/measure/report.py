"""One table across feature stores: positional R², semantic mIoU, robustness and overclustering per store.

A *row* is one untransformed store: an encoder (raw, RASA-cleaned, ALiBi, NoPE, a baseline) at one input size.
Stores made with ``posvit extract --transform T`` are not rows: each joins the row of the untransformed store of
the same model, weights, debiasing, preprocessing and images (read from the provenance, never from file names),
and gives that row's robustness scores. So a resolution sweep (``extract --size 224,448,672,896`` → one store per
size) and an encoder comparison are the same call:

``compare_stores([raw.224, raw.448, ...], masks=...)`` or ``compare_stores([raw, rasa, alibi, nope], masks=...)``.

Per row, all measured on the same images with the same settings:

positional
    :func:`posvit_cli.core.measure.probe.probe_store` (``holdout`` protocol): mean held-out stack R² per target
    (``xy`` is the joint score; ``random`` the null).
semantic (with masks)
    :func:`posvit_cli.core.measure.semantic.semantic_probe` on a seeded split of the images by name (the same split for
    every row of the same images): mIoU of the held-out images from one confusion matrix.
token-norm outliers
    :func:`posvit_cli.core.measure.norms.image_norms` on every image (the rule of ``probe``'s ``token_norms``): the
    mean over images of the share of tokens whose norm is an outlier (the register artefact), read band by band
    and one image at a time.
robustness (with masks and transformed stores)
    The same head scored on each transformed store: mIoU per transform.
overclustering (with masks)
    :func:`posvit_cli.core.cluster.overclustering.overcluster_eval` (standard protocol): mIoU mean ± std over seeds per k and
    the position dependence of the first seed's clusters
    (:func:`~posvit_cli.core.cluster.position_dependence.position_dependence`; the old ``spatial_entropy`` keys
    stay in the JSON).
position dependence of clusters (without masks)
    :func:`posvit_cli.core.cluster.overclustering.cluster_dataset` (the dataset k-means of ``posvit cluster``, first
    seed) per k: how much its clusters follow position, a label-free column (``matching`` and ``miou_*`` None).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from posvit_cli.core.fileio import tagged_header
from posvit_cli.core.errors import PosvitError
from posvit_cli.core.progress import ProgressCallback, report

__all__ = ["REPORT_SCHEMA", "compare_stores", "group_stores", "read_report", "report_json", "report_markdown", "report_table",
           "store_label", "write_report"]

REPORT_SCHEMA = "posvit-report"
REPORT_SCHEMA_VERSION = 1
#: Positional targets of a report (``xy``: the joint x, y score; ``random``: the null).
REPORT_TARGETS = ("xy", "lr", "ud", "radial", "random")


def store_label(source: str) -> str:
    """A row name from a store path: the file name without its store suffix (``runs/raw.448.h5`` → ``raw.448``)."""
    from posvit_cli.core.features.backends import split_store_suffix

    return split_store_suffix(Path(str(source).rstrip("/")).name)[0]


def group_stores(stores: Sequence) -> list[tuple[Any, list]]:
    """Rows: each untransformed store with the transformed stores (``provenance.transform``) of its images.

    A transformed store joins the first untransformed store of the same model, weights, debiasing and
    preprocessing whose image names it holds.

    Raises
    ------
    PosvitError
        If a transformed store matches no untransformed store, or no store is untransformed.
    """
    from posvit_cli.core.measure.semantic import check_same_features

    rows: list[tuple[Any, list]] = [(s, []) for s in stores if not s.transform]
    if not rows:
        raise PosvitError("every store given is a transformed copy (extract --transform): add the untransformed store")
    for s in stores:
        if not s.transform:
            continue
        names = {r.name for r in s.records}
        for base, extra in rows:
            try:
                check_same_features(base, s, "transformed store", same_preprocessing=True)
            except PosvitError:
                continue
            if {r.name for r in base.records} <= names:
                extra.append(s)
                break
        else:
            raise PosvitError(
                f"transformed store '{s.source}' ({s.transform}) matches no untransformed store given "
                "(same model, weights, debiasing, --size and images): add the store it is a copy of"
            )
    return rows


def _describe(store) -> dict:
    debias = store.debias_methods
    mods = [m.get("name", "?") if isinstance(m, dict) else str(m) for m in store.modifications]
    groups = store.groups
    grid = groups[0].grid if groups else None
    return {
        "store": store.source,
        "model": store.model,
        "weights": store.weights,
        "weights_sha256": store.weights_sha256,
        "modifications": mods,
        "debias": debias,
        "size": store.preprocessing.get("size"),
        "grid": list(grid) if grid else None,
        "grids": {g.name: int(len(g.indices)) for g in groups},
        "n_images": len(store),
        "channels": store.channels,
    }


def compare_stores(
    stores: Sequence,
    *,
    names: Sequence[str] | None = None,
    masks: str | None = None,
    num_classes: int | None = None,
    ignore_index: int | None = 255,
    class_names: Sequence[str] | None = None,
    positional=None,
    semantic=None,
    ks: Sequence[int] = (100,),
    cluster_seeds: Sequence[int] | None = None,
    cluster: bool = True,
    shift: bool = True,
    layer: str | None = None,
    device: str = "cpu",
    threads: int | None = 1,
    cluster_threads: int | None = None,
    progress: ProgressCallback | None = None,
) -> dict:
    """Measure every row (see the module docstring) and return the report document.

    Parameters
    ----------
    stores : sequence of FeatureStore
        Untransformed stores (rows, in order) and transformed copies (robustness).
    names : sequence of str, optional
        Row names, one per untransformed store (default: file names without suffix).
    masks : str, optional
        Mask folder (matched by stem) for the semantic probe, robustness and overclustering.
    num_classes, ignore_index, class_names
        As for ``posvit probe semantic``; without ``num_classes`` the first row's masks decide it for all rows.
    positional : ProbeSettings, optional
        Default: the ``holdout`` protocol on :data:`REPORT_TARGETS`, no per-channel scores or extras.
    semantic : SemanticSettings, optional
        Default: :class:`~posvit_cli.core.measure.semantic.SemanticSettings` defaults.
    ks : sequence of int
        Cluster counts of the overclustering (k above a row's token count is skipped with a note).
    cluster_seeds : sequence of int, optional
        Default: the standard protocol's seeds 0–4.
    cluster : bool
        Run the overclustering evaluation (with masks), or the clusters' position dependence (without).
    shift : bool
        Measure the crop-shift correspondence of the raw encoder where it can be rebuilt and the images are found.
    layer : str, optional
    device : str
    threads : int or None
        Torch threads of the positional and semantic probes (small products: one thread by default).
    cluster_threads : int or None
        Torch threads of k-means (None: torch's setting).
    progress : callable, optional

    Returns
    -------
    dict
        Schema ``posvit-report`` (``docs/report.md``).
    """
    from posvit_cli.core.measure.probe import make_settings, probe_store
    from posvit_cli.core.measure.semantic import SemanticSettings, semantic_probe

    prog = report(progress)
    t0 = time.perf_counter()
    if not stores:
        raise PosvitError("no stores to report on")
    for s in stores:
        if len(s) == 0:
            raise PosvitError(f"'{s.source}' holds no images")
        if not s.layers:
            raise PosvitError(f"'{s.source}' holds no feature layers (a maps-only store)")
    rows = group_stores(stores)
    if names is not None and len(names) != len(rows):
        raise PosvitError(f"{len(names)} names given for {len(rows)} untransformed stores")
    if positional is None:
        positional, _ = make_settings("holdout", targets=REPORT_TARGETS, per_channel=False, extras=False)
    semantic = (semantic or SemanticSettings()).validated() if masks else None
    ks = sorted({int(k) for k in ks}) if cluster else []
    if any(k < 1 for k in ks):
        raise PosvitError("every k must be at least 1")
    out_rows = []
    notes: list[str] = []
    for n, (store, transformed) in enumerate(rows):
        name = names[n] if names is not None else store_label(store.source)
        t_row = time.perf_counter()
        row: dict[str, Any] = {"name": name, **_describe(store),
                               "transformed_stores": [t.source for t in transformed]}
        task = f"[{n + 1}/{len(rows)}] {name}"
        steps = 3 if masks else (2 if ks else 1)
        prog(task, 0, steps)
        ly = store.check_layer(layer)
        pos = probe_store(store, positional, layers=[ly], device=device, threads=threads)
        block = pos["results"][ly]["stack_r2"]
        row["positional"] = {
            "stack_r2": {t: block[t]["mean"] for t in positional.targets},
            "stack_r2_std": {t: block[t]["std"] for t in positional.targets},
        }
        row["token_norms"] = _token_norm_outliers(store, ly)
        row["shift"] = _content_match(store, ly, notes, name) if shift else None
        prog(task, 1, steps)
        row["semantic"], row["robustness"], row["cluster"] = None, [], None
        if masks:
            sem = semantic_probe(store, masks, semantic, robustness=transformed, num_classes=num_classes,
                                 ignore_index=ignore_index, class_names=class_names, layer=ly, device=device,
                                 threads=threads)
            if num_classes is None:
                num_classes = sem["masks"]["num_classes"]
            if class_names is None:
                class_names = sem["masks"]["class_names"]
            row["semantic"], row["robustness"] = _semantic_columns(sem)
            prog(task, 2, 3)
            if ks:
                row["cluster"] = _overcluster(store, masks, ks, num_classes, ignore_index, class_names, cluster_seeds,
                                              ly, device, cluster_threads, notes, name)
            prog(task, 3, 3)
        elif ks:
            row["cluster"] = _position_clusters(store, ks, cluster_seeds, ly, device, cluster_threads, notes, name)
            prog(task, 2, 2)
        row["seconds"] = round(time.perf_counter() - t_row, 3)
        out_rows.append(row)
    return {
        **tagged_header(REPORT_SCHEMA, REPORT_SCHEMA_VERSION),
        "settings": {
            "layer": layer or "final (each store's default)",
            "positional": positional.as_dict(),
            "semantic": semantic.as_dict() if semantic else None,
            "masks": str(masks) if masks else None,
            "num_classes": num_classes,
            "class_names": list(class_names) if class_names else None,
            "ignore_index": ignore_index,
            "cluster": {"ks": ks, "seeds": list(cluster_seeds) if cluster_seeds is not None else [0, 1, 2, 3, 4],
                        "protocol": "standard"} if ks else None,
        },
        "rows": out_rows,
        "notes": notes,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _token_norm_outliers(store, layer) -> dict:
    """Outlier-token shares of every image (``probe``'s ``token_norms`` rule), one norm map in memory at a time."""
    from posvit_cli.core.measure.norms import DEFAULT_K, image_norms

    shares = []
    outliers = 0
    for i in range(len(store)):
        norms = image_norms(store, i, layer)
        shares.append(norms.share)
        outliers += norms.count
    return {"k": DEFAULT_K, "mean_share": float(sum(shares) / len(shares)), "max_share": float(max(shares)),
            "n_outliers": int(outliers), "images_with_outliers": sum(1 for v in shares if v > 0)}


def _semantic_columns(sem: dict) -> tuple[dict, list[dict]]:
    """A row's semantic and robustness entries from a semantic-probe result."""
    res = sem["results"]
    semantic = {
        "miou": res["miou"], "pixel_accuracy": res["pixel_accuracy"],
        "iou_per_class": res["iou_per_class"], "scored_images": len(sem["split"]["scored_images"]),
        "fit_images": len(sem["split"]["fit_images"]), "epochs_run": sem["training"]["epochs_run"],
        "samples": sem["training"]["samples"],
    }
    robustness = [{k: r[k] for k in ("transform", "store", "miou", "delta_miou", "pixel_accuracy")}
                  for r in sem["robustness"] if r["transform"] != "identity"]
    return semantic, robustness


def _content_match(store, layer, notes, name) -> dict | None:
    """Crop-shift correspondence (``probe shift``'s default settings) of the store's encoder, and of the head its
    features went through when the head file is found, on up to 4 of its images; or None with a note saying why
    not (encoder not rebuildable, images or head moved, tiled store)."""
    from posvit_cli.core.debias.auto import rebuild_encoder
    from posvit_cli.core.debias.auto_shift import recorded_heads, shift_pairs, shift_scores, shift_unavailable

    heads, why_heads = recorded_heads(store) if store.debias else ([], None)
    if why_heads:
        notes.append(f"{name}: no content/grid match: the store holds debiased features and {why_heads}")
        return None
    encoder, why = rebuild_encoder(store)
    reason = shift_unavailable(store, encoder, why, heads_at_hand=bool(heads))
    if reason:
        notes.append(f"{name}: no content/grid match: {reason}")
        return None
    pairs, shift_notes = shift_pairs(store, range(len(store)), encoder, layer=layer)
    notes.extend(f"{name}: {n}" for n in shift_notes)
    if pairs is None:
        return None
    if len(heads) > 1:
        notes.append(f"{name}: no content/grid match: {len(heads)} heads in a row are not replayed")
        return None
    return shift_scores(heads[0] if heads else None, pairs)


def _usable_ks(store, ks, notes, name) -> list[int]:
    """The ks a store has enough tokens for; a note names the others."""
    n_tokens = sum(r.grid[0] * r.grid[1] for r in store.records)
    if any(k > n_tokens for k in ks):
        notes.append(f"{name}: k={', '.join(str(k) for k in ks if k > n_tokens)} skipped (only {n_tokens} tokens)")
    return [k for k in ks if k <= n_tokens]


def _position_clusters(store, ks, seeds, layer, device, threads, notes, name) -> list[dict]:
    """Without masks: the dataset k-means of ``posvit cluster`` (first seed) per k and its position dependence."""
    from posvit_cli.core.cluster.overclustering import cluster_dataset
    from posvit_cli.core.device import torch_threads

    usable = _usable_ks(store, ks, notes, name)
    if not usable:
        return []
    with torch_threads(threads):
        res = cluster_dataset(store, usable, seeds=list(seeds or [0])[:1], layer=layer, device=device)
    return [{"k": r["k"], "matching": None, "miou_mean": None, "miou_std": None,
             "position_dependence": r["position_dependence"]} for r in res["results"]]


def _overcluster(store, masks, ks, num_classes, ignore_index, class_names, seeds, layer, device, threads, notes,
                 name) -> list[dict]:
    from posvit_cli.core.cluster.masks import load_masks
    from posvit_cli.core.cluster.overclustering import overcluster_eval
    from posvit_cli.core.device import torch_threads

    usable = _usable_ks(store, ks, notes, name)
    if not usable:
        return []
    mask_set = load_masks(store, masks, ignore_index=ignore_index, num_classes=num_classes, class_names=class_names)
    with torch_threads(threads):
        res = overcluster_eval(store, mask_set, usable, protocol="standard", seeds=seeds, layer=layer, device=device)
    keep = ("k", "matching", "miou_mean", "miou_std", "position_dependence", "spatial_entropy",
            "spatial_entropy_shuffled")
    return [{k: r[k] for k in keep} for r in res["results"]]


# --------------------------------------------------------------------------------------------------------------
# Rendering


def _num(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return f"{v:.{digits}f}"


def _share(token_norms: dict | None) -> str:
    return f"{100 * token_norms['mean_share']:.2f} %" if token_norms else ""


def report_table(doc: dict) -> tuple[list[str], list[list[str]]]:
    """The report as a header and rows of strings (what the Markdown and the terminal table show)."""
    from posvit_cli.core.cluster.position_dependence import dependence_cell

    rows = doc["rows"]
    transforms: list[str] = []
    cluster_cols: list[tuple[int, str]] = []
    for r in rows:
        for t in r["robustness"]:
            if t["transform"] not in transforms:
                transforms.append(t["transform"])
        for c in r["cluster"] or []:
            if (c["k"], c["matching"]) not in cluster_cols:
                cluster_cols.append((c["k"], c["matching"]))
    has_sem = any(r["semantic"] for r in rows)
    header = ["store", "model", "debias", "size", "grid", "R² xy", "R² lr", "R² ud", "R² random", "outlier tokens"]
    has_shift = any(r.get("shift") for r in rows)
    if has_shift:
        header += ["content match", "grid match"]
    if has_sem:
        header.append("semantic mIoU")
    header += [f"mIoU {t}" for t in transforms]
    for k, m in cluster_cols:
        if m is not None:
            header.append(f"cluster mIoU k={k}" + (f" ({m})" if m != "precision" else ""))
        header.append(f"position dep. k={k}")
    body = []
    for r in rows:
        pos = r["positional"]["stack_r2"]
        dbs = "+".join(r["debias"] + r["modifications"]) or "none"
        line = [r["name"], r["model"] or "", dbs, str(r["size"] or ""),
                "×".join(str(v) for v in r["grid"]) + ("" if len(r["grids"]) <= 1 else f" (+{len(r['grids']) - 1})")
                if r["grid"] else "",
                _num(pos.get("xy")), _num(pos.get("lr")), _num(pos.get("ud")), _num(pos.get("random")),
                _share(r.get("token_norms"))]
        if has_shift:
            sh = r.get("shift") or {}
            line += [_num(sh.get("shift_content")), _num(sh.get("shift_absolute"))]
        if has_sem:
            line.append(_num(r["semantic"]["miou"]) if r["semantic"] else "")
        rob = {t["transform"]: t for t in r["robustness"]}
        line += [_num(rob[t]["miou"]) + (f" ({rob[t]['delta_miou']:+.3f})" if rob[t]["delta_miou"] is not None else "")
                 if t in rob else "" for t in transforms]
        cl = {(c["k"], c["matching"]): c for c in r["cluster"] or []}
        for key in cluster_cols:
            c = cl.get(key)
            if key[1] is not None:
                line.append(f"{_num(c['miou_mean'])} ± {_num(c['miou_std'])}" if c else "")
            line.append(dependence_cell(c.get("position_dependence")) if c else "")
        body.append(line)
    return header, body


def report_markdown(doc: dict) -> str:
    """The report as Markdown: a title, the table and how each column was measured."""
    from posvit_cli.core.cluster import position_dependence as PD
    from posvit_cli.core.measure.norms import DEFAULT_K as NORM_K

    header, body = report_table(doc)
    s = doc["settings"]
    lines = ["# posvit report", "",
             f"{len(doc['rows'])} stores, posvit {doc['posvit_version']}, {doc['created']}.", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" if i < 5 else "---:" for i in range(len(header))) + "|"]
    for row in body:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    p = s["positional"]
    lines += ["", "- **R²**: held-out stack R² of a ridge probe of the positional ramp (mean over images × "
              f"{p['repeats']} repeats, training fraction {p['fraction']:.4g}, α {p['alpha']:g}); `xy` is the joint "
              "x, y score, `random` the null: ramps at the null's level carry no position.",
              f"- **outlier tokens**: mean over images of the share of tokens whose norm lies more than {NORM_K:g} robust "
              "standard deviations above the image's median log norm (the register artefact; `probe`'s "
              "`token_norms` rule)."]
    if s["semantic"]:
        sem = s["semantic"]
        lines.append(f"- **semantic mIoU**: {sem['head']} head ({sem['head_form']}) trained on each store's features, "
                     f"scored on the held-out {sem['test_fraction']:.0%} of the images (split by name, the same for "
                     f"every store of the same images); masks {sem['masks']}; {sem['metric']}.")
        if any(r["robustness"] for r in doc["rows"]):
            lines.append("- **mIoU T**: the same head on features of images transformed by T (extract --transform), "
                         "mapped back to the original frame; in brackets the change from the untransformed mIoU.")
    if s["cluster"]:
        seeds = s["cluster"]["seeds"]
        lines.append(f"- **cluster mIoU**: overclustering, standard protocol (z-score, PCA 50, k-means, seeds "
                     f"{seeds[0]}–{seeds[-1]}, Hungarian matching at the class count, precision many-to-one at "
                     "any other k), "
                     "mean ± std over seeds. **position dep.**: mutual information of the first seed's cluster "
                     f"labels with the {PD.DEFAULT_BINS} × {PD.DEFAULT_BINS} grid block, above its mean over "
                     f"{PD.DEFAULT_DRAWS} copies of the label maps rolled to random offsets, as a share of the most "
                     "the cluster sizes allow (1 = clusters that follow position, about 0 = no more than by "
                     "chance); p: the share of rolled copies at least as high; * = position-driven "
                     f"(p < {PD.P_THRESHOLD:g} and dependence ≥ {PD.DEPENDENCE_THRESHOLD:g}).")
    for note in doc.get("notes", []):
        lines.append(f"- note: {note}")
    return "\n".join(lines) + "\n"


def report_json(doc: dict) -> str:
    """The report document as strict JSON text (NaN written as null), as :func:`write_report` writes it."""
    from posvit_cli.core.measure.probe import probe_result_json

    return probe_result_json(doc)


def write_report(path, doc: dict) -> Path:
    """Write the report atomically: Markdown for ``.md``, JSON for ``.json`` (by suffix)."""
    from posvit_cli.core.fileio import write_text_atomic

    p = Path(path)
    if p.suffix.lower() == ".md":
        return write_text_atomic(p, report_markdown(doc))
    if p.suffix.lower() == ".json":
        return write_text_atomic(p, report_json(doc) + "\n")
    raise PosvitError(f"report output '{path}': name a .md (Markdown) or .json file")


def read_report(path) -> dict:
    """Read a JSON report written by :func:`write_report` (``posvit report -o report.json``)."""
    from posvit_cli.core.fileio import read_tagged_json

    return read_tagged_json(path, REPORT_SCHEMA, REPORT_SCHEMA_VERSION, "report",
                            hint="write one with `posvit report STORES -o report.json`")
