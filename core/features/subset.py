"""Keep or drop some images of a feature store: a new store with the same settings and fewer images.

A store cannot be edited in place (its readers may hold it open, and a failed edit would damage it), so
``posvit store subset`` writes a new store through :class:`~posvit_cli.core.features.writer.StoreWriter`, with the
source's provenance plus a record of what was kept.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from pathlib import Path

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.features.store import FeatureStore
from posvit_cli.core.features.writer import StoreWriter
from posvit_cli.core.progress import ProgressCallback, report

__all__ = ["copy_image", "read_selection", "select_images", "subset_store"]


def read_selection(items: Sequence[str]) -> list[str]:
    """Image selectors from the command line: names, paths or glob patterns, and ``@FILE`` lists (one per line;
    blank lines and ``#`` comments ignored)."""
    out: list[str] = []
    for item in items:
        if item.startswith("@"):
            path = Path(item[1:])
            if not path.is_file():
                raise PosvitError(f"selection list '{path}' does not exist (an @FILE holds one image name per line)")
            out += [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()
                    if ln.strip() and not ln.strip().startswith("#")]
        else:
            out.append(item)
    return out


def _matches(record, selector: str) -> bool:
    names = (record.name, record.path, Path(record.path).name)
    if any(ch in selector for ch in "*?["):
        return any(fnmatch.fnmatchcase(n, selector) for n in names)
    return selector in names


def select_images(store: FeatureStore, *, keep: Sequence[str] = (), drop: Sequence[str] = ()) -> list[int]:
    """Indices of the images of ``store`` that a subset keeps, in store order.

    Parameters
    ----------
    store : FeatureStore
    keep, drop : sequence of str
        Selectors: an image name (file stem), its recorded path or file name, or a glob pattern (``*``, ``?``,
        ``[...]``) over them. With ``keep``, only matching images are kept; ``drop`` then removes its matches.

    Raises
    ------
    PosvitError
        If a selector without wildcards matches no image (a typo would otherwise pass unnoticed), or no image is
        left.
    """
    records = store.records
    for sel in (*keep, *drop):
        if not any(ch in sel for ch in "*?[") and not any(_matches(r, sel) for r in records):
            raise PosvitError(f"no image '{sel}' in '{store.source}' (images are named by file stem, e.g. "
                              f"'{records[0].name}'; `posvit store info` lists them)")
    chosen = [r.index for r in records
              if (not keep or any(_matches(r, s) for s in keep)) and not any(_matches(r, s) for s in drop)]
    if not chosen:
        raise PosvitError(f"the selection leaves no image of the {len(records)} in '{store.source}'")
    return chosen


def copy_image(store: FeatureStore, index: int, writer: StoreWriter) -> None:
    """Append image ``index`` of ``store`` to ``writer`` as stored: every layer (in the writer's dtype), prefix
    tokens, per-token maps and metadata."""
    rec = store.record(index)
    feats = {layer: store.features(index, layer, dtype=writer.dtype) for layer in store.layers}
    prefix = ({layer: store.prefix_tokens(index, layer) for layer in store.layers}
              if store.n_prefix_tokens > 0 else None)
    maps = {name: store.token_map(index, name) for name in store.map_names()} or None
    writer.add(rec.path, feats, orig_size=rec.orig_size, proc_size=rec.proc_size, prefix=prefix, maps=maps,
               meta=rec.meta)


def subset_store(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    keep: Sequence[str] = (),
    drop: Sequence[str] = (),
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
) -> tuple[int, int]:
    """Write the images of ``source`` chosen by :func:`select_images` to a new store ``output``.

    Returns
    -------
    (kept, dropped) : (int, int)
        Image counts.

    Raises
    ------
    PosvitError
        For a selection that matches nothing or leaves nothing, or an output that exists without ``overwrite``
        (nothing is written then).
    """
    prog = report(progress)
    with FeatureStore(source) as store:
        chosen = select_images(store, keep=keep, drop=drop)
        prov = dict(store.provenance)
        prov["subset_of"] = {"store": store.source, "images": len(store), "kept": len(chosen),
                             "keep": list(keep), "drop": list(drop)}
        with StoreWriter(output, provenance=prov, layers=store.layers, dtype=store.dtype,
                         overwrite=overwrite) as writer:
            for n, i in enumerate(chosen):
                copy_image(store, i, writer)
                prog("subset", n + 1, len(chosen))
            writer.commit()
        return len(chosen), len(store) - len(chosen)
