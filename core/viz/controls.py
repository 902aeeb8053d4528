"""The figure of ``posvit probe controls``: stack R² per target under each position-embedding control.

One bar group per target, one bar per probed control (``none``, ``zero``, ``shuffle``, ``shift``), drawn by the
same plot that compares probe results (:func:`~posvit_cli.core.viz.plots.stack_comparison_plot`), so the bars,
error bars and the ``random`` null read as they do there. Controls reported as not applicable (a model without
a position embedding) are left out and named in the caption.
"""

from __future__ import annotations

import os

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.viz.index import FigureEntry

__all__ = ["AXIS_FLOOR", "controls_figure", "read_controls_result"]

#: Lowest R² drawn: a control that removes the position code can send the R² of a small image far below the null.
AXIS_FLOOR = -2.0


def read_controls_result(path: str | os.PathLike) -> dict:
    """A ``posvit probe controls -o`` document (schema ``posvit-pe-controls``), checked."""
    from posvit_cli.core.fileio import read_tagged_json
    from posvit_cli.core.measure.pe_controls import PE_CONTROLS_SCHEMA, PE_CONTROLS_SCHEMA_VERSION

    return read_tagged_json(path, PE_CONTROLS_SCHEMA, PE_CONTROLS_SCHEMA_VERSION, "position-embedding controls",
                            "posvit probe controls IMAGES -m MODEL -o controls.json")


def controls_figure(doc: dict, outdir: str | os.PathLike, *, command: str = "") -> list[FigureEntry]:
    """Stack R² per target (mean ± std over images) under every probed control, as PNG and SVG in ``outdir``.

    Raises
    ------
    PosvitError
        When no control was probed.
    """
    from posvit_cli.core.viz.plots import stack_comparison_plot

    probed = {name: c for name, c in doc["controls"].items() if c.get("status") == "probed"}
    if not probed:
        raise PosvitError("the controls result holds no probed control")
    layer = doc.get("layer") or "final"
    model = (doc.get("model") or {}).get("model") or "encoder"
    results = [{"results": {layer: {"stack_r2": c["stack_r2"]}}, "primary_layer": layer, "settings": doc.get("settings") or {},
                "store": {"n_images": len(doc.get("images") or [])}} for c in probed.values()]
    shift = doc.get("shift") or []
    labels = [f"{model}: {name}" + (f" {shift[0]},{shift[1]}" if name == "shift" and len(shift) == 2 else "")
              for name in probed]
    entries = stack_comparison_plot(results, labels, outdir, names=list(probed), command=command, floor=AXIS_FLOOR)
    skipped = [f"{name} ({c.get('status')})" for name, c in doc["controls"].items() if name not in probed]
    for e in entries:
        e.kind = "controls"
        e.caption = "position embedding " + "; ".join(
            f"{name}: xy R² {c['stack_r2']['xy']['mean']:.3f}" for name, c in probed.items() if "xy" in c["stack_r2"])
        if skipped:
            e.caption += "; not probed: " + ", ".join(skipped)
    return entries
