"""Join stores made with the same settings (``extract --shard i/n``) into one store."""

from __future__ import annotations

import os
from collections.abc import Sequence

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.features.store import FeatureStore, check_same_way
from posvit_cli.core.features.subset import copy_image
from posvit_cli.core.features.writer import StoreWriter

__all__ = ["merge_stores"]


def merge_stores(
    sources: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress=None,
    order: Sequence[str | os.PathLike] | None = None,
) -> int:
    """Join stores made with the same settings (``extract --shard i/n``) into one.

    Images keep the order of ``sources``, or with ``order`` (image paths, e.g. the image list the shards were
    cut from) that order, images it does not name last; an image path present in several sources is written
    once. Returns the number of images written.

    Raises
    ------
    PosvitError
        If the sources were made with different settings (model, weights, layers, preprocessing, ...).
    """
    from posvit_cli.core.progress import report

    progress = report(progress)
    if not sources:
        raise PosvitError("nothing to merge: name at least one store")
    stores = [FeatureStore(s) for s in sources]
    try:
        first = stores[0]
        for other in stores[1:]:
            check_same_way(first, other, "merge")
        prov = dict(first.provenance)
        prov["merged_from"] = [str(s) for s in sources]
        shards = [s.provenance.get("shard") for s in stores]
        prov.pop("shard", None)
        if any(shards):
            prov["merged_shards"] = shards
        total = sum(len(s) for s in stores)
        seen: set[str] = set()
        with StoreWriter(
            output, provenance=prov, layers=first.layers, dtype=first.dtype,
            overwrite=overwrite,
        ) as writer:
            done = 0
            for store, index, path in _in_order(stores, order):
                done += 1
                if path in seen:
                    continue
                seen.add(path)
                copy_image(store, index, writer)
                progress("merge", done, total)
            writer.commit()
        return len(seen)
    finally:
        for s in stores:
            s.close()


def _in_order(stores: Sequence[FeatureStore], order: Sequence[str | os.PathLike] | None) -> list[tuple]:
    """(store, record index, image path) of every image: source by source, or by each path's place in ``order``."""
    items = [(store, rec.index, rec.path) for store in stores for rec in store.records]
    if order is None:
        return items
    rank = {}
    for k, p in enumerate(order):
        rank.setdefault(str(p), k)
        rank.setdefault(os.path.abspath(p), k)

    def key(item):
        return rank.get(item[2], rank.get(os.path.abspath(item[2]), len(rank)))

    return sorted(items, key=key)  # stable: unnamed images keep their source order
