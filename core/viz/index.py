"""The output folder's ``index.html``: one offline page that lays out every figure ``posvit viz`` wrote there.

Each run adds its figures to a manifest, ``viz-index.json``, in the folder (a figure written again under the same
name replaces its entry; entries whose files were deleted are dropped) and rewrites ``index.html`` from it. The
page holds no scripts and no external resources: inline CSS and relative links only, so the folder can be
zipped, mailed or opened from a USB stick.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import html
import json
import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.fileio import json_clean, json_text, write_text_atomic

__all__ = ["INDEX_NAME", "MANIFEST_NAME", "FigureEntry", "read_manifest", "render_html", "update_index"]

INDEX_NAME = "index.html"
MANIFEST_NAME = "viz-index.json"
MANIFEST_SCHEMA = "posvit-viz-index"
#: Sections of the page, in this order.
SECTIONS = {
    "report": "Reports",
    "compare": "Models compared",
    "probe": "Probe results",
    "pca": "PCA of patch features",
    "similarity": "Cosine-similarity maps",
    "channels": "Most positional channels",
    "norms": "Token norms (high-norm artefacts)",
    "shift": "Crop-shift correspondence",
    "controls": "Position-embedding controls",
    "clusters": "Cluster maps",
    "segmentation": "Segmentations",
}


@dataclasses.dataclass
class FigureEntry:
    """One figure on the index page.

    Attributes
    ----------
    file : str
        The PNG, relative to the output folder (POSIX separators).
    kind : str
        Section: one of :data:`SECTIONS`.
    title : str
    caption : str
        What is shown and its numbers.
    extra : list of str
        Other files of the figure (SVG, per-image raw maps), relative to the folder.
    numbers : dict
        The figure's scores, machine-readable (also printed by ``--json``).
    command : str
    created : str
        ISO 8601 UTC time.
    """

    file: str
    kind: str
    title: str
    caption: str = ""
    extra: list[str] = dataclasses.field(default_factory=list)
    numbers: dict = dataclasses.field(default_factory=dict)
    command: str = ""
    created: str = ""

    def files(self) -> list[str]:
        return [self.file, *self.extra]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def _locked(folder: Path):
    """Serialise manifest updates of concurrent runs writing into the same folder (POSIX advisory lock)."""
    lock = folder / f".{MANIFEST_NAME}.lock"
    with open(lock, "a+") as fh:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        except (ImportError, OSError):  # pragma: no cover - Windows or a filesystem without locks
            pass
        yield


def read_manifest(folder: str | os.PathLike) -> list[FigureEntry]:
    """The figures recorded in a folder's manifest (empty when there is none).

    Raises
    ------
    PosvitError
        If the manifest exists but is not a posvit viz manifest.
    """
    path = Path(folder) / MANIFEST_NAME
    if not path.exists():
        return []
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise PosvitError(f"cannot read '{path}' ({exc}); delete it to start a fresh index") from None
    if not isinstance(doc, dict) or doc.get("schema") != MANIFEST_SCHEMA:
        raise PosvitError(f"'{path}' is not a posvit viz index; write into another folder or delete it")
    fields = {f.name for f in dataclasses.fields(FigureEntry)}
    return [FigureEntry(**{k: v for k, v in e.items() if k in fields}) for e in doc.get("entries", [])]


def update_index(folder: str | os.PathLike, entries: Sequence[FigureEntry], title: str = "posvit figures") -> Path:
    """Merge ``entries`` into the folder's manifest and rewrite ``index.html``. Returns the page's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder):
        old = read_manifest(folder)
        new_files = {e.file for e in entries}
        merged = [e for e in old if e.file not in new_files]
        for e in entries:
            if not e.created:
                e.created = _now()
            merged.append(e)
        merged = [e for e in merged if (folder / e.file).exists()]
        for e in merged:
            e.extra = [f for f in e.extra if (folder / f).exists()]
        for e in merged:
            e.numbers = json_clean(e.numbers)
        doc = {"schema": MANIFEST_SCHEMA, "schema_version": 1, "entries": [dataclasses.asdict(e) for e in merged]}
        write_text_atomic(folder / MANIFEST_NAME, json_text(doc, indent=1, ensure_ascii=False) + "\n")
        page = folder / INDEX_NAME
        write_text_atomic(page, render_html(merged, title))
    return page


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:1.5rem auto;max-width:1500px;padding:0 1rem;
color:#222;background:#fafafa}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.2rem;border-bottom:1px solid #ccc;padding-bottom:.2rem;
margin-top:2rem}nav a{margin-right:1rem}figure{background:#fff;border:1px solid #ddd;border-radius:4px;
margin:1rem 0;padding:.8rem}figure img{max-width:100%;height:auto;display:block;margin:0 auto}
figcaption{margin-top:.5rem;font-size:.9rem;line-height:1.4}figcaption .files{color:#555;font-size:.8rem}
.numbers{font-family:ui-monospace,monospace;font-size:.8rem;color:#333}details{margin-top:.3rem}
.meta{color:#777;font-size:.8rem}
"""


def _href(rel: str) -> str:
    return html.escape(quote(rel, safe="/-_.~"), quote=True)


def render_html(entries: Sequence[FigureEntry], title: str = "posvit figures") -> str:
    """The index page for ``entries`` (self-contained HTML; images and files by relative links)."""
    from posvit_cli import __version__

    by_kind: dict[str, list[FigureEntry]] = {}
    for e in entries:
        by_kind.setdefault(e.kind if e.kind in SECTIONS else "other", []).append(e)
    order = [k for k in SECTIONS if k in by_kind] + (["other"] if "other" in by_kind else [])
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">{len(entries)} figure{"s" if len(entries) != 1 else ""} · written by posvit '
        f"{html.escape(__version__)} · updated {html.escape(_now())}</p>",
    ]
    if len(order) > 1:
        out.append("<nav>" + "".join(f'<a href="#{k}">{html.escape(SECTIONS.get(k, "Other"))}</a>' for k in order)
                   + "</nav>")
    for k in order:
        out.append(f'<h2 id="{k}">{html.escape(SECTIONS.get(k, "Other"))}</h2>')
        for e in by_kind[k]:
            src = _href(e.file)
            links = [f'<a href="{src}">{html.escape(Path(e.file).name)}</a>']
            links += [f'<a href="{_href(f)}">{html.escape(f)}</a>' for f in e.extra]
            out.append("<figure>")
            out.append(f'<a href="{src}"><img src="{src}" alt="{html.escape(e.title, quote=True)}" loading="lazy"></a>')
            out.append("<figcaption>")
            out.append(f"<strong>{html.escape(e.title)}</strong>")
            if e.caption:
                out.append("<br>" + html.escape(e.caption).replace("\n", "<br>"))
            out.append(f'<div class="files">files: {" · ".join(links)}</div>')
            if e.numbers:
                out.append('<details><summary>numbers</summary><pre class="numbers">'
                           + html.escape(json.dumps(e.numbers, indent=1, ensure_ascii=False, default=str))
                           + "</pre></details>")
            if e.command:
                out.append(f'<div class="meta">{html.escape(e.command)} · {html.escape(e.created)}</div>')
            out.append("</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
