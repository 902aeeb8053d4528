"""The feature store: one schema for patch features on disk, with an HDF5 and a Zarr backend.

A store holds, for every image, its patch-token grid ``(h, w, C)`` for one or more layers, optional prefix
tokens (CLS, registers), optional per-token maps (cluster labels, ...), and the metadata needed to map tokens
back to pixels. Images with the same grid share one array per layer, so a dataset of same-sized images reads as
one ``(N, h, w, C)`` array; images of other sizes go to other groups. The layout is documented in
``docs/feature-store.md``.

Reading is lazy (one image costs one image's I/O). Writing (:class:`~posvit_cli.core.features.writer.StoreWriter`)
goes to ``<path>.partial`` and is renamed to ``<path>`` only when the
writer finishes, so a store under its final name is always complete. The suffixes and backends live in
:mod:`~posvit_cli.core.features.backends`, the identity check in :mod:`~posvit_cli.core.features.provenance`, joining shards in
:mod:`~posvit_cli.core.features.merge`.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.features.backends import (
    PARTIAL_SUFFIX,
    STORE_SUFFIXES,
    H5Backend,
    ZarrBackend,
    is_store_path,
    open_stream,
    store_format,
)
from posvit_cli.core.features.provenance import feature_identity, identity_differences
from posvit_cli.core.features.records import (
    SCHEMA_NAME,
    SCHEMA_VERSION,
    GridGroup,
    ImageRecord,
    canonical_layer_name,
)

__all__ = [
    "SCHEMA_NAME",
    "SCHEMA_VERSION",
    "STORE_SUFFIXES",
    "FeatureStore",
    "GridGroup",
    "ImageRecord",
    "canonical_layer_name",
    "check_same_way",
    "is_store_path",
    "read_bytes_store",
    "store_format",
]


class FeatureStore:
    """A feature store opened for reading.

    Parameters
    ----------
    source : str or path-like
        A store path (``.h5``, ``.zarr`` directory, ``.zarr.zip``) or ``"-"`` to read a store streamed on
        standard input (HDF5 or zipped Zarr, as ``posvit extract`` writes to a pipe).
    allow_partial : bool
        Open a store whose writer has not finished (``<path>.partial``). Off by default so that an
        interrupted store is never mistaken for a complete one.

    Examples
    --------
    >>> with FeatureStore("feats.h5") as store:                     # doctest: +SKIP
    ...     for record, tokens in store.iter_features():
    ...         print(record.name, tokens.shape)                    # (h, w, C)
    """

    def __init__(self, source: str | os.PathLike, *, allow_partial: bool = False):
        self._tmp: BinaryIO | None = None
        self.source = str(source)
        if self.source == "-":
            self._backend, self.format = open_stream(sys.stdin.buffer)
        else:
            path = Path(source)
            if not path.exists():
                partial = Path(str(path) + PARTIAL_SUFFIX)
                hint = (
                    f"; an interrupted write left '{partial}', finish it with `posvit extract ... --resume`"
                    if partial.exists()
                    else ""
                )
                raise PosvitError(f"feature store '{source}' does not exist{hint}")
            self.format = store_format(path)
            try:
                if self.format == "hdf5":
                    self._backend = H5Backend(str(path), "r")
                else:
                    self._backend = ZarrBackend(str(path), "r", zip_file=self.format == "zarr-zip")
            except PosvitError:
                raise
            except Exception as exc:
                raise PosvitError(f"cannot read '{source}' as a {self.format} feature store ({exc})") from exc
        self._load_header(allow_partial)

    # -- header ------------------------------------------------------------------------------------------------
    def _load_header(self, allow_partial: bool) -> None:
        b = self._backend
        if b.get_attr("schema") != SCHEMA_NAME:
            self.close()
            raise PosvitError(f"'{self.source}' is not a posvit feature store (no '{SCHEMA_NAME}' schema tag)")
        version = int(b.get_attr("schema_version", 0))
        if version > SCHEMA_VERSION:
            self.close()
            raise PosvitError(
                f"'{self.source}' uses feature-store schema {version}; this posvit reads up to {SCHEMA_VERSION}: "
                "upgrade posvit"
            )
        self.complete = bool(b.get_attr("complete", False))
        if not self.complete and not allow_partial:
            self.close()
            raise PosvitError(f"'{self.source}' is an unfinished store; finish it with `posvit extract ... --resume`")
        self.provenance: dict = json.loads(b.get_attr("provenance", "{}"))
        self.layers: list[str] = json.loads(b.get_attr("layers", "[]"))
        n = int(b.get_attr("n_images", 0))
        self._n = n
        if n:
            paths = b.read_strings("images/path")[:n]
            metas = b.read_strings("images/meta")[:n]
            groups = b.read_strings("images/group")[:n]
            rows = np.asarray(b.array("images/row")[:n])
            sizes = np.asarray(b.array("images/sizes")[:n])
        else:
            paths, metas, groups, rows, sizes = [], [], [], np.zeros(0, int), np.zeros((0, 6), int)
        self._records = [
            ImageRecord(
                index=i,
                path=paths[i],
                orig_size=(int(sizes[i, 0]), int(sizes[i, 1])),
                proc_size=(int(sizes[i, 2]), int(sizes[i, 3])),
                grid=(int(sizes[i, 4]), int(sizes[i, 5])),
                group=groups[i],
                row=int(rows[i]),
                meta=json.loads(metas[i]) if metas[i] else {},
            )
            for i in range(n)
        ]

    # -- basic access ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._n

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._backend.close()
        if self._tmp is not None:
            self._tmp.close()
            self._tmp = None

    @property
    def records(self) -> list[ImageRecord]:
        """One :class:`ImageRecord` per image, in store order."""
        return list(self._records)

    def record(self, index: int) -> ImageRecord:
        return self._records[index]

    @property
    def default_layer(self) -> str:
        """The layer commands use when none is named: ``"final"`` if stored, else the last stored layer."""
        if not self.layers:
            raise PosvitError(f"'{self.source}' holds no feature layers (it stores maps only: {', '.join(self.map_names())})")
        return "final" if "final" in self.layers else self.layers[-1]

    @property
    def channels(self) -> int:
        return int(self.provenance.get("channels", 0))

    @property
    def patch_size(self) -> int | None:
        """The encoder's patch size in pixels (None when not recorded)."""
        p = self.provenance.get("patch_size")
        return int(p) if p else None

    # -- provenance, typed: what commands read instead of string keys ------------------------------------------
    @property
    def model(self) -> str | None:
        """The encoder's name as given to ``extract -m`` (None when not recorded)."""
        return self.provenance.get("model") or None

    @property
    def weights(self) -> str | None:
        """The weights as given to ``extract -w`` (``pretrained``, ``random`` or a file; None when not recorded)."""
        return self.provenance.get("weights") or None

    @property
    def weights_sha256(self) -> str | None:
        """SHA-256 of the encoder's weights (None when not recorded)."""
        return self.provenance.get("weights_sha256") or None

    @property
    def modifications(self) -> list:
        """The architecture changes applied to the encoder (ALiBi, NoPE, ...), in order; empty when none."""
        return list(self.provenance.get("modifications") or [])

    @property
    def preprocessing(self) -> dict:
        """How images were resized and normalised before the encoder (a copy; empty when not recorded)."""
        return dict(self.provenance.get("preprocessing") or {})

    @property
    def size_rule(self) -> str:
        """The ``--size`` rule the images were resized with (``native``, ``short:N``, ``crop:N``, ...)."""
        return str(self.preprocessing.get("size") or "native")

    @property
    def resize_mode(self):
        """:attr:`size_rule` parsed, a :class:`~posvit_cli.core.io.preprocess.ResizeMode`."""
        from posvit_cli.core.io.preprocess import parse_size

        return parse_size(self.size_rule)

    @property
    def intensity(self) -> str:
        """The ``--intensity`` rule the images were scaled with (``auto`` when not recorded)."""
        return str(self.preprocessing.get("intensity") or "auto")

    @property
    def debias(self) -> list[dict]:
        """The debiasing steps applied to these features, oldest first (one dict per head); empty when raw."""
        return [d if isinstance(d, dict) else {"method": str(d)} for d in self.provenance.get("debias") or []]

    @property
    def debias_methods(self) -> list[str]:
        """The method name of each :attr:`debias` step (``["rasa"]``)."""
        return [str(d.get("method", "?")) for d in self.debias]

    @property
    def transform(self) -> str | None:
        """The test-time transform applied to the images (``extract --transform``), None for the originals."""
        return self.provenance.get("transform") or None

    @property
    def tiling(self) -> dict | None:
        """``{"tile": px, "overlap": px}`` when images were extracted in tiles, else None."""
        t = self.provenance.get("tiling")
        return dict(t) if t else None

    @property
    def dtype(self) -> str:
        """Storage type of the features, ``"float16"`` or ``"float32"``."""
        return str(self.provenance.get("dtype") or "float16")

    @property
    def n_prefix_tokens(self) -> int:
        """How many prefix tokens (CLS, registers) each image keeps per layer (0 when none were kept)."""
        return int(self.provenance.get("prefix_tokens") or 0)

    @property
    def identity(self) -> dict:
        """What makes these features what they are: the provenance entries of
        :data:`~posvit_cli.core.features.provenance.IDENTITY_KEYS`."""
        return feature_identity(self.provenance)

    def check_layer(self, layer: str | None) -> str:
        """Return ``layer`` (or the default layer) after checking the store holds it."""
        if layer is None:
            return self.default_layer
        layer = canonical_layer_name(layer)
        if layer not in self.layers:
            raise PosvitError(f"layer '{layer}' is not in '{self.source}' (stored: {', '.join(self.layers)})")
        return layer

    @property
    def groups(self) -> list[GridGroup]:
        """Images grouped by token grid, largest group first."""
        by_group: dict[str, list[int]] = {}
        for r in self._records:
            by_group.setdefault(r.group, []).append(r.index)
        out = [
            GridGroup(name=g, grid=self._records[idx[0]].grid, indices=np.asarray(idx, dtype=np.int64))
            for g, idx in by_group.items()
        ]
        return sorted(out, key=lambda g: (-len(g.indices), g.name))

    @property
    def is_uniform(self) -> bool:
        """True when every image has the same token grid (the store reads as one ``(N, h, w, C)`` array)."""
        return len(self.groups) <= 1

    # -- features ----------------------------------------------------------------------------------------------
    def features(self, index: int, layer: str | None = None, dtype=np.float32) -> np.ndarray:
        """Patch tokens of one image.

        Returns
        -------
        ndarray, shape (h, w, C)
            The token grid in row-major order, cast to ``dtype``.
        """
        layer = self.check_layer(layer)
        return np.asarray(self._image_rows(self._records[index], "features", layer), dtype=dtype)

    def _image_rows(self, r: ImageRecord, kind: str, name: str, start: int | None = None, stop: int | None = None):
        """The stored rows of one image in ``groups/<grid>/<kind>/<name>`` (all, or token rows ``start:stop``).

        A Zarr chunk missing from disk would read as the fill value (zeros) without a word; it is an error here.
        """
        key = f"groups/{r.group}/{kind}/{name}"
        absent = self._backend.missing_chunk(key, r.row, start or 0, stop)
        if absent is not None:
            what = {"maps": "map", "prefix": "prefix tokens"}.get(kind, "features")
            of = f"map {name}" if kind == "maps" else f"layer {name}"
            raise PosvitError(
                f"store '{self.source}' is damaged: the {what} of image '{r.path}' ({of}) "
                f"{'is' if kind == 'maps' else 'are'} missing (chunk '{absent}' absent); restore the store or "
                "extract it again"
            )
        arr = self._backend.array(key)
        return arr[r.row] if start is None else arr[r.row, start:stop]

    def feature_rows(self, index: int, layer: str | None, start: int, stop: int, dtype=np.float32) -> np.ndarray:
        """Token rows ``start:stop`` of one image, shape ``(stop - start, w, C)``: bounded reads of huge grids."""
        layer = self.check_layer(layer)
        return np.asarray(self._image_rows(self._records[index], "features", layer, start, stop), dtype=dtype)

    def prefix_tokens(self, index: int, layer: str | None = None, dtype=np.float32) -> np.ndarray | None:
        """The CLS and register tokens of one image, shape ``(P, C)``, or None when they were not kept."""
        layer = self.check_layer(layer)
        r = self._records[index]
        name = f"groups/{r.group}/prefix/{layer}"
        if not self._backend.has(name):
            return None
        return np.asarray(self._image_rows(r, "prefix", layer), dtype=dtype)

    def stack(self, layer: str | None = None, group: str | None = None):
        """The lazy ``(n, h, w, C)`` array of one grid group (an ``h5py.Dataset`` or ``zarr.Array``).

        With one grid size in the store, this is the whole dataset in store order. Slicing it reads only the
        requested images.
        """
        layer = self.check_layer(layer)
        groups = self.groups
        if not groups:
            raise PosvitError(f"'{self.source}' is empty")
        if group is None:
            if len(groups) > 1:
                sizes = ", ".join(g.name for g in groups)
                raise PosvitError(
                    f"'{self.source}' holds several grid sizes ({sizes}); name one group or iterate images"
                )
            group = groups[0].name
        arr = self._backend.array(f"groups/{group}/features/{layer}")
        n = sum(1 for r in self._records if r.group == group)
        return arr if arr.shape[0] == n else arr[:n]

    def iter_features(
        self, layer: str | None = None, indices: Sequence[int] | None = None, dtype=np.float32
    ) -> Iterator[tuple[ImageRecord, np.ndarray]]:
        """Yield ``(record, tokens (h, w, C))`` one image at a time, in bounded memory."""
        layer = self.check_layer(layer)
        for i in range(len(self)) if indices is None else indices:
            yield self._records[i], self.features(i, layer, dtype=dtype)

    def map_names(self) -> list[str]:
        """Names of the per-token maps stored (cluster labels and the like)."""
        names: set[str] = set()
        for g in {r.group for r in self._records}:
            names.update(self._backend.children(f"groups/{g}/maps"))
        return sorted(names)

    def token_map(self, index: int, name: str) -> np.ndarray:
        """A per-token map of one image, shape ``(h, w)``."""
        r = self._records[index]
        key = f"groups/{r.group}/maps/{name}"
        if not self._backend.has(key):
            raise PosvitError(f"map '{name}' is not in '{self.source}' (stored: {', '.join(self.map_names()) or 'none'})")
        return np.asarray(self._image_rows(r, "maps", name))

    def checksum(self, index: int) -> str:
        """SHA-256 over the stored bytes of every layer (and prefix tokens) of one image, in layer order."""
        import hashlib

        r = self._records[index]
        h = hashlib.sha256()
        for layer in self.layers:
            h.update(np.ascontiguousarray(self._image_rows(r, "features", layer)).tobytes())
            if self._backend.has(f"groups/{r.group}/prefix/{layer}"):
                h.update(np.ascontiguousarray(self._image_rows(r, "prefix", layer)).tobytes())
        return h.hexdigest()

    def info(self) -> dict:
        """A JSON-ready summary: format, counts, grids, layers and provenance."""
        return {
            "source": self.source,
            "format": self.format,
            "schema_version": int(self._backend.get_attr("schema_version", 0)),
            "complete": self.complete,
            "n_images": len(self),
            "layers": self.layers,
            "channels": self.channels,
            "groups": {g.name: len(g.indices) for g in self.groups},
            "maps": self.map_names(),
            "provenance": self.provenance,
        }


def check_same_way(reference: FeatureStore, other: FeatureStore, action: str, *, ignore=()) -> None:
    """Refuse to ``action`` two stores whose features were not made the same way.

    Parameters
    ----------
    reference, other : FeatureStore
    action : str
        What is being done, for the message (``"merge"``).
    ignore : collection of str
        Identity keys allowed to differ (see :func:`~posvit_cli.core.features.provenance.identity_differences`).

    Raises
    ------
    PosvitError
        Naming every differing key, e.g. ``cannot merge 'b.h5' with 'a.h5': dtype differ``.
    """
    diff = identity_differences(reference.provenance, other.provenance, ignore=ignore)
    if diff:
        raise PosvitError(f"cannot {action} '{other.source}' with '{reference.source}': {', '.join(diff)} differ")


def read_bytes_store(data: bytes) -> FeatureStore:
    """Open a store from bytes in memory (tests and notebooks)."""
    store = FeatureStore.__new__(FeatureStore)
    store._tmp = None
    store.source = "<bytes>"
    store._backend, store.format = open_stream(io.BytesIO(data))
    store._load_header(allow_partial=False)
    return store
