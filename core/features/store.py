"""The feature store: one schema for patch features on disk, with an HDF5 and a Zarr backend.

A store holds, for every image, its patch-token grid ``(h, w, C)`` for one or more layers, optional prefix
tokens (CLS, registers), optional per-token maps (cluster labels, ...), and the metadata needed to map tokens
back to pixels. Images with the same grid share one array per layer, so a dataset of same-sized images reads as
one ``(N, h, w, C)`` array; images of other sizes go to other groups. The layout is documented in
``docs/feature-store.md``.

Reading is lazy (one image costs one image's I/O). Writing goes to ``<path>.partial`` and is renamed to
``<path>`` only when the writer finishes, so a store under its final name is always complete; an interrupted
write leaves a partial store that :class:`StoreWriter` can resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from posvit_cli import __version__
from posvit_cli.core.errors import PosvitError, PosvitWarning

__all__ = [
    "SCHEMA_NAME",
    "SCHEMA_VERSION",
    "FeatureStore",
    "GridGroup",
    "ImageRecord",
    "StoreWriter",
    "merge_stores",
    "store_format",
]

SCHEMA_NAME = "posvit-feature-store"
SCHEMA_VERSION = 1
PARTIAL_SUFFIX = ".partial"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_ZIP_MAGIC = b"PK\x03\x04"
# Chunks of at most this many bytes: one chunk per image for ordinary grids, row bands for huge tiled grids.
_TARGET_CHUNK_BYTES = 8 * 2**20
# Provenance keys that must agree before two stores (or a store and a resumed run) may be combined.
SIGNATURE_KEYS = (
    "model",
    "weights_sha256",
    "layers",
    "preprocessing",
    "dtype",
    "prefix_tokens",
    "debias",
    "transform",
    "tiling",
)


# --------------------------------------------------------------------------------------------------------------
# Records


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """Where one image's features live and how its tokens map to pixels.

    Attributes
    ----------
    index : int
        Position of the image in the store (0-based, insertion order).
    path : str
        The source path as given to ``extract``.
    orig_size : tuple of int
        ``(height, width)`` of the decoded source image in pixels.
    proc_size : tuple of int
        ``(height, width)`` of the image after resizing, the size the encoder saw (a multiple of the patch size).
    grid : tuple of int
        ``(h, w)`` token grid.
    group : str
        Name of the group whose arrays hold this image (``"{h}x{w}"``).
    row : int
        Row of this image in its group's arrays.
    meta : dict
        Extra per-image metadata (tile layout, transform, ...).
    """

    index: int
    path: str
    orig_size: tuple[int, int]
    proc_size: tuple[int, int]
    grid: tuple[int, int]
    group: str
    row: int
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        """The file stem of the source path, used to match masks and labels to images."""
        return _stem(self.path)


@dataclasses.dataclass(frozen=True)
class GridGroup:
    """All images of one token-grid size: their store indices and grid ``(h, w)``."""

    name: str
    grid: tuple[int, int]
    indices: np.ndarray


def _stem(path: str) -> str:
    name = Path(path).name
    for ext in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def _group_name(grid: tuple[int, int]) -> str:
    return f"{int(grid[0])}x{int(grid[1])}"


def store_format(path: str | os.PathLike) -> str:
    """Return the backend for a store path: ``"hdf5"``, ``"zarr"`` (directory) or ``"zarr-zip"``.

    Raises
    ------
    PosvitError
        If the suffix names no known store format.
    """
    p = str(path).lower().rstrip("/")
    if p.endswith(PARTIAL_SUFFIX):
        p = p[: -len(PARTIAL_SUFFIX)]
    if p.endswith((".h5", ".hdf5", ".hdf")):
        return "hdf5"
    if p.endswith((".zarr.zip", ".zip")):
        return "zarr-zip"
    if p.endswith(".zarr"):
        return "zarr"
    raise PosvitError(
        f"cannot tell the store format of '{path}': use a name ending in .h5, .zarr or .zarr.zip"
    )


# --------------------------------------------------------------------------------------------------------------
# Backends: the few operations the store needs, on h5py and on zarr


class _Backend:
    """Minimal array-and-attribute interface over h5py and zarr groups."""

    def get_attr(self, key: str, default: Any = None) -> Any:
        raise NotImplementedError

    def set_attr(self, key: str, value: Any) -> None:
        raise NotImplementedError

    def has(self, name: str) -> bool:
        raise NotImplementedError

    def array(self, name: str):
        raise NotImplementedError

    def create_array(self, name, shape, dtype, chunks, compression):
        raise NotImplementedError

    def create_string_array(self, name):
        raise NotImplementedError

    def children(self, name: str) -> list[str]:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class _H5Backend(_Backend):
    def __init__(self, target: str | BinaryIO, mode: str):
        import h5py

        self._h5py = h5py
        # A large chunk cache lets row-band writes into huge grids accumulate before they reach the disk.
        self.file = h5py.File(target, mode, rdcc_nbytes=64 * 2**20, locking=False)

    def get_attr(self, key, default=None):
        v = self.file.attrs.get(key, default)
        if isinstance(v, bytes):
            v = v.decode()
        if isinstance(v, np.generic):
            v = v.item()
        return v

    def set_attr(self, key, value):
        self.file.attrs[key] = value

    def has(self, name):
        return name in self.file

    def array(self, name):
        return self.file[name]

    def create_array(self, name, shape, dtype, chunks, compression):
        kwargs: dict[str, Any] = {}
        if compression == "gzip":
            kwargs = dict(compression="gzip", compression_opts=1, shuffle=True)
        elif compression == "lzf":
            kwargs = dict(compression="lzf", shuffle=True)
        elif compression not in (None, "none"):
            raise PosvitError(f"compression '{compression}' is not available for HDF5 stores: use none, gzip or lzf")
        maxshape = (None,) + tuple(shape[1:])
        return self.file.create_dataset(name, shape=shape, maxshape=maxshape, dtype=dtype, chunks=chunks, **kwargs)

    def create_string_array(self, name):
        dt = self._h5py.string_dtype("utf-8")
        return self.file.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dt, chunks=(256,))

    def read_strings(self, name) -> list[str]:
        return [s.decode() if isinstance(s, bytes) else str(s) for s in self.file[name][...]]

    def children(self, name):
        return list(self.file[name].keys()) if name in self.file else []

    def flush(self):
        self.file.flush()

    def close(self):
        with contextlib.suppress(Exception):
            self.file.close()


class _ZarrBackend(_Backend):
    def __init__(self, target: str, mode: str, zip_file: bool = False):
        import zarr

        self._zarr = zarr
        self._store = None
        if zip_file:
            self._store = zarr.storage.ZipStore(target, mode="r")
            self.group = zarr.open_group(self._store, mode="r")
        else:
            self.group = zarr.open_group(target, mode=mode)

    def get_attr(self, key, default=None):
        return self.group.attrs.get(key, default)

    def set_attr(self, key, value):
        self.group.attrs[key] = value

    def has(self, name):
        try:
            self.group[name]
        except KeyError:
            return False
        return True

    def array(self, name):
        return self.group[name]

    def create_array(self, name, shape, dtype, chunks, compression):
        from zarr.codecs import BloscCodec, ZstdCodec

        if compression in (None, "none"):
            compressors = None
        elif compression == "zstd":
            compressors = ZstdCodec(level=1)
        elif compression == "lz4":
            compressors = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
        else:
            raise PosvitError(f"compression '{compression}' is not available for Zarr stores: use none, zstd or lz4")
        return self.group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, compressors=compressors)

    def create_string_array(self, name):
        return self.group.create_array(name, shape=(0,), dtype=str, chunks=(256,))

    def read_strings(self, name) -> list[str]:
        return [str(s) for s in self.group[name][...]]

    def children(self, name):
        try:
            g = self.group[name]
        except KeyError:
            return []
        return sorted(k for k, _ in g.members())

    def close(self):
        if self._store is not None:
            with contextlib.suppress(Exception):
                self._store.close()


def _resize_rows(arr, n: int) -> None:
    shape = tuple(arr.shape)
    if shape[0] != n:
        arr.resize((n,) + shape[1:])


# --------------------------------------------------------------------------------------------------------------
# Reading


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
            self._backend, self.format = _open_stream(sys.stdin.buffer)
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
                    self._backend = _H5Backend(str(path), "r")
                else:
                    self._backend = _ZarrBackend(str(path), "r", zip_file=self.format == "zarr-zip")
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
        p = self.provenance.get("patch_size")
        return int(p) if p else None

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
        r = self._records[index]
        arr = self._backend.array(f"groups/{r.group}/features/{layer}")
        return np.asarray(arr[r.row], dtype=dtype)

    def feature_rows(self, index: int, layer: str | None, start: int, stop: int, dtype=np.float32) -> np.ndarray:
        """Token rows ``start:stop`` of one image, shape ``(stop - start, w, C)``: bounded reads of huge grids."""
        layer = self.check_layer(layer)
        r = self._records[index]
        arr = self._backend.array(f"groups/{r.group}/features/{layer}")
        return np.asarray(arr[r.row, start:stop], dtype=dtype)

    def prefix_tokens(self, index: int, layer: str | None = None, dtype=np.float32) -> np.ndarray | None:
        """The CLS and register tokens of one image, shape ``(P, C)``, or None when they were not kept."""
        layer = self.check_layer(layer)
        r = self._records[index]
        name = f"groups/{r.group}/prefix/{layer}"
        if not self._backend.has(name):
            return None
        return np.asarray(self._backend.array(name)[r.row], dtype=dtype)

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
        return np.asarray(self._backend.array(key)[r.row])

    def checksum(self, index: int) -> str:
        """SHA-256 over the stored bytes of every layer (and prefix tokens) of one image, in layer order."""
        import hashlib

        r = self._records[index]
        h = hashlib.sha256()
        for layer in self.layers:
            h.update(np.ascontiguousarray(self._backend.array(f"groups/{r.group}/features/{layer}")[r.row]).tobytes())
            name = f"groups/{r.group}/prefix/{layer}"
            if self._backend.has(name):
                h.update(np.ascontiguousarray(self._backend.array(name)[r.row]).tobytes())
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


def _open_stream(stream: BinaryIO) -> tuple[_Backend, str]:
    """Spool a store from a byte stream into an anonymous temporary file and open it.

    The temporary file has no name on disk (or is unlinked once open), so nothing is left behind however the
    process ends.
    """
    head = stream.read(8)
    if not head:
        raise PosvitError("no feature store on standard input (is the upstream command writing to the pipe?)")
    if head.startswith(_HDF5_MAGIC):
        tmp = tempfile.TemporaryFile()
        tmp.write(head)
        shutil.copyfileobj(stream, tmp, 4 * 2**20)
        tmp.flush()
        tmp.seek(0)
        try:
            backend = _H5Backend(tmp, "r")
        except Exception as exc:
            raise PosvitError(f"the HDF5 store on standard input is truncated or corrupt ({exc})") from exc
        backend._keepalive = tmp  # type: ignore[attr-defined]
        return backend, "hdf5"
    if head.startswith(_ZIP_MAGIC):
        fd, name = tempfile.mkstemp(suffix=".zarr.zip")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(head)
                shutil.copyfileobj(stream, f, 4 * 2**20)
            backend = _ZarrBackend(name, "r", zip_file=True)
        finally:
            # The open zip keeps its file descriptor; removing the name now leaves nothing behind.
            with contextlib.suppress(OSError):
                os.unlink(name)
        return backend, "zarr-zip"
    raise PosvitError("standard input does not hold a feature store (expected HDF5 or zipped Zarr bytes)")


def canonical_layer_name(layer: str | int) -> str:
    """Return the stored name of a layer: ``"final"`` or ``"block{i}"``."""
    s = str(layer).strip()
    if s in ("final", "-1", "last"):
        return "final"
    if s.startswith("block") and s[5:].isdigit():
        return s
    if s.isdigit():
        return f"block{int(s)}"
    raise PosvitError(f"unknown layer '{layer}': use 'final' or a block index such as 'block6' or 6")


# --------------------------------------------------------------------------------------------------------------
# Writing


class StoreWriter:
    """Create (or resume) a feature store and append images to it.

    The writer writes to ``<path>.partial`` and renames it to ``<path>`` in :meth:`close` when ``complete``
    is true (the default when used as a context manager that exits without an exception). ``path`` may be
    ``"-"``: the finished store is then written as HDF5 to standard output (through an anonymous temporary
    file), or to any binary stream passed as ``stream``.

    Parameters
    ----------
    path : str or path-like
        Output path (``.h5``, ``.zarr``, ``.zarr.zip``) or ``"-"``.
    provenance : dict
        JSON-serialisable description of how the features were made (see ``docs/feature-store.md``). Must
        contain ``channels``; the keys in :data:`SIGNATURE_KEYS` decide whether a resume is compatible.
    layers : sequence of str
        Layer names every image will provide (``"final"``, ``"block3"``, ...).
    dtype : {"float16", "float32"}
        Storage type of the features.
    overwrite : bool
        Replace an existing store at ``path``.
    resume : bool
        Continue a partial store at ``<path>.partial`` (or append to a complete store at ``path``), keeping
        the images already written; :attr:`done` then lists their source paths.
    compression : str or None
        ``None`` picks the measured default (none for HDF5, zstd for Zarr); see :meth:`_Backend.create_array`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        provenance: Mapping[str, Any],
        layers: Sequence[str],
        dtype: str = "float16",
        overwrite: bool = False,
        resume: bool = False,
        compression: str | None = None,
        stream: BinaryIO | None = None,
    ):
        if dtype not in ("float16", "float32"):
            raise PosvitError(f"store dtype must be float16 or float32, not '{dtype}'")
        if "channels" not in provenance:
            raise ValueError("provenance must record 'channels' (0 for a store of maps only)")
        self.dtype = np.dtype(dtype)
        self.layers = [canonical_layer_name(x) for x in layers]
        self.provenance = _jsonable(dict(provenance))
        self.provenance.setdefault("posvit_version", __version__)
        self.provenance["dtype"] = dtype
        self.provenance["layers"] = self.layers
        self._stream_out: BinaryIO | None = None
        self._tmpfile: BinaryIO | None = None
        self._closed = False
        self.done: set[str] = set()

        if str(path) == "-" or stream is not None:
            self.path = None
            self.format = "hdf5"
            self._stream_out = stream if stream is not None else sys.stdout.buffer
            self._tmpfile = tempfile.TemporaryFile()
            self.work_path = None
            self._backend = _H5Backend(self._tmpfile, "w")
            self.compression = compression
            self._init_new()
            return

        self.path = Path(path)
        self.format = store_format(self.path)
        self.compression = compression if compression is not None else ("zstd" if self.format != "hdf5" else None)
        self.work_path = Path(str(self.path) + PARTIAL_SUFFIX)
        if not self.path.parent.exists():
            raise PosvitError(f"output folder '{self.path.parent}' does not exist")

        if resume and (self.work_path.exists() or self.path.exists()):
            self._open_for_resume()
            return
        if self.path.exists() and not overwrite:
            raise PosvitError(f"'{self.path}' already exists: pass --overwrite to replace it or --resume to add to it")
        if self.work_path.exists():
            if not overwrite:
                raise PosvitError(
                    f"an unfinished store '{self.work_path}' exists: pass --resume to continue it or --overwrite "
                    "to start again"
                )
            _remove(self.work_path)
        self._backend = self._open_work("w")
        self._init_new()

    # -- setup -------------------------------------------------------------------------------------------------
    def _open_work(self, mode: str) -> _Backend:
        assert self.work_path is not None
        if self.format == "hdf5":
            return _H5Backend(str(self.work_path), mode)
        # Zipped Zarr is assembled as a directory and zipped once at the end: zip archives cannot be updated
        # in place, and a directory keeps partial work resumable.
        return _ZarrBackend(str(self.work_path), mode)

    def _init_new(self) -> None:
        b = self._backend
        b.set_attr("schema", SCHEMA_NAME)
        b.set_attr("schema_version", SCHEMA_VERSION)
        b.set_attr("complete", False)
        b.set_attr("n_images", 0)
        b.set_attr("provenance", json.dumps(self.provenance))
        b.set_attr("layers", json.dumps(self.layers))
        for name in ("images/path", "images/meta", "images/group"):
            b.create_string_array(name)
        b.create_array("images/row", (0,), "int64", (1024,), None)
        b.create_array("images/sizes", (0, 6), "int64", (1024, 6), None)
        self._n = 0
        self._group_rows: dict[str, int] = {}
        b.flush()

    def _open_for_resume(self) -> None:
        assert self.work_path is not None and self.path is not None
        if not self.work_path.exists():
            # Appending to a finished store: reopen it under the partial name so it is never half-updated
            # under its final name.
            if self.format == "zarr-zip":
                _unzip_dir(self.path, self.work_path)
                self.path.unlink()
            else:
                os.replace(self.path, self.work_path)
        elif self.format == "hdf5":
            self._salvage_hdf5()
        try:
            self._backend = self._open_work("a" if self.format == "hdf5" else "r+")
        except Exception as exc:
            raise PosvitError(
                f"cannot resume '{self.work_path}': it is unreadable ({exc}); start again with --overwrite"
            ) from exc
        b = self._backend
        if b.get_attr("schema") != SCHEMA_NAME:
            raise PosvitError(f"cannot resume '{self.work_path}': it is not a posvit feature store")
        old = json.loads(b.get_attr("provenance", "{}"))
        mismatched = [k for k in SIGNATURE_KEYS if old.get(k) != self.provenance.get(k)]
        if mismatched:
            raise PosvitError(
                f"cannot resume '{self.path}': it was made with other settings ({', '.join(mismatched)} differ); "
                "use --overwrite or another output"
            )
        n = int(b.get_attr("n_images", 0))
        b.set_attr("complete", False)
        # Rows beyond n_images were written by an interrupted batch and are dropped.
        for name in ("images/path", "images/meta", "images/group", "images/row", "images/sizes"):
            _resize_rows(b.array(name), n)
        groups = b.read_strings("images/group")
        rows = np.asarray(b.array("images/row")[:n])
        self._group_rows = {}
        for g, r in zip(groups, rows):
            self._group_rows[g] = max(self._group_rows.get(g, 0), int(r) + 1)
        for g, count in self._group_rows.items():
            for kind in ("features", "prefix", "maps"):
                for child in b.children(f"groups/{g}/{kind}"):
                    _resize_rows(b.array(f"groups/{g}/{kind}/{child}"), count)
        self._n = n
        self.done = set(b.read_strings("images/path"))
        b.flush()

    def _salvage_hdf5(self) -> None:
        """Copy the committed images of an interrupted HDF5 store into a fresh file.

        A process killed while HDF5 flushes metadata can leave the file's internal heaps inconsistent: still
        readable, but no longer safe to append to. Resuming therefore rewrites what was committed, then appends
        to the clean copy.
        """
        assert self.work_path is not None
        damaged = f"cannot resume '{self.work_path}': the interrupted store is damaged (was it killed during a write?)"
        try:
            src = FeatureStore(self.work_path, allow_partial=True)
        except PosvitError as exc:
            raise PosvitError(f"{damaged}: {exc}; start again with --overwrite") from exc
        salvage = self.work_path.with_name(self.work_path.name + ".salvage")
        _remove(salvage)
        try:
            with src:
                old = src.provenance
                mismatched = [k for k in SIGNATURE_KEYS if old.get(k) != self.provenance.get(k)]
                if mismatched:
                    raise PosvitError(
                        f"cannot resume '{self.path}': it was made with other settings ({', '.join(mismatched)} "
                        "differ); use --overwrite or another output"
                    )
                self._backend = _H5Backend(str(salvage), "w")
                self._init_new()
                maps = src.map_names()
                for rec in src.records:
                    prefix = None
                    if self.layers and src.prefix_tokens(rec.index, self.layers[0]) is not None:
                        prefix = {layer: src.prefix_tokens(rec.index, layer) for layer in self.layers}
                    rec_maps = {}
                    for m in maps:
                        try:
                            rec_maps[m] = src.token_map(rec.index, m)
                        except PosvitError:
                            pass
                    handle = self.begin_image(
                        rec.path, rec.grid, self.provenance["channels"], orig_size=rec.orig_size,
                        proc_size=rec.proc_size, prefix=prefix, maps=rec_maps or None, meta=rec.meta,
                    )
                    for layer in self.layers:
                        handle.write_rows(layer, 0, src.features(rec.index, layer, dtype=self.dtype))
                    handle.finish()
                self.commit()
        except PosvitError:
            _remove(salvage)
            raise
        except Exception as exc:
            _remove(salvage)
            raise PosvitError(f"{damaged} ({type(exc).__name__}: {exc}); start again with --overwrite") from exc
        finally:
            if getattr(self, "_backend", None) is not None:
                self._backend.close()
        os.replace(salvage, self.work_path)

    # -- appending ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._n

    def _group_arrays(self, grid: tuple[int, int], channels: int, prefix: Mapping[str, np.ndarray] | None, maps):
        b = self._backend
        g = _group_name(grid)
        if g not in self._group_rows:
            self._group_rows[g] = 0
        h, w = grid
        row_bytes = w * channels * self.dtype.itemsize
        rows_per_chunk = int(max(1, min(h, _TARGET_CHUNK_BYTES // max(row_bytes, 1))))
        for layer in self.layers:
            name = f"groups/{g}/features/{layer}"
            if not b.has(name):
                b.create_array(name, (0, h, w, channels), self.dtype, (1, rows_per_chunk, w, channels), self.compression)
            if prefix:
                pname = f"groups/{g}/prefix/{layer}"
                if not b.has(pname):
                    p = prefix[layer].shape[0]
                    b.create_array(pname, (0, p, channels), self.dtype, (64, p, channels), None)
        for mname, arr in (maps or {}).items():
            key = f"groups/{g}/maps/{mname}"
            if not b.has(key):
                b.create_array(key, (0, h, w), np.asarray(arr).dtype, (64, h, w), None)
        return g

    def add(
        self,
        path: str,
        features: Mapping[str, np.ndarray],
        *,
        orig_size: tuple[int, int],
        proc_size: tuple[int, int],
        prefix: Mapping[str, np.ndarray] | None = None,
        maps: Mapping[str, np.ndarray] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> ImageRecord:
        """Append one image.

        Parameters
        ----------
        path : str
            Source path (recorded, and used by ``--resume`` to skip the image next time).
        features : mapping of layer name to ndarray (h, w, C)
            One token grid per layer of the store.
        orig_size, proc_size : (height, width)
            Source size and the size the encoder saw, in pixels.
        prefix : mapping of layer name to ndarray (P, C), optional
            CLS/register tokens.
        maps : mapping of name to ndarray (h, w), optional
            Per-token maps (labels).
        meta : mapping, optional
            Extra JSON-serialisable metadata.
        """
        if self.layers:
            grid, channels = _grid_of(features, self.layers), int(np.shape(features[self.layers[0]])[-1])
        else:  # a maps-only store (cluster labels): the grid comes from the maps
            if not maps:
                raise ValueError("a store without feature layers needs maps for every image")
            shapes = {tuple(np.shape(m)) for m in maps.values()}
            if len(shapes) != 1 or len(next(iter(shapes))) != 2:
                raise ValueError(f"maps must share one (h, w) shape, got {sorted(shapes)}")
            grid, channels = next(iter(shapes)), 0
        handle = self.begin_image(
            path, grid, channels,
            orig_size=orig_size, proc_size=proc_size, prefix=prefix, maps=maps, meta=meta,
        )
        for layer in self.layers:
            handle.write_rows(layer, 0, features[layer])
        return handle.finish()

    def begin_image(
        self,
        path: str,
        grid: tuple[int, int],
        channels: int,
        *,
        orig_size: tuple[int, int],
        proc_size: tuple[int, int],
        prefix: Mapping[str, np.ndarray] | None = None,
        maps: Mapping[str, np.ndarray] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> _ImageHandle:
        """Reserve the rows of one image so its grid can be written in bands (tiled extraction).

        Call :meth:`_ImageHandle.write_rows` for every layer and row band, then :meth:`_ImageHandle.finish`;
        the image counts as written only after ``finish``.
        """
        if self._closed:
            raise RuntimeError("store writer is closed")
        expected = self.provenance["channels"]
        if channels != expected:
            raise PosvitError(f"image '{path}' has {channels} channels; the store holds {expected}")
        if prefix is not None and set(prefix) != set(self.layers):
            raise ValueError("prefix tokens must be given for every layer")
        grid = (int(grid[0]), int(grid[1]))
        g = self._group_arrays(grid, channels, prefix, maps)
        row = self._group_rows[g]
        b = self._backend
        for kind in ("features", "prefix", "maps"):
            for child in b.children(f"groups/{g}/{kind}"):
                _resize_rows(b.array(f"groups/{g}/{kind}/{child}"), row + 1)
        if prefix:
            for layer in self.layers:
                b.array(f"groups/{g}/prefix/{layer}")[row] = np.asarray(prefix[layer], dtype=self.dtype)
        for mname, arr in (maps or {}).items():
            b.array(f"groups/{g}/maps/{mname}")[row] = np.asarray(arr)
        return _ImageHandle(self, path, g, row, grid, orig_size, proc_size, dict(meta or {}))

    def _commit_image(self, handle: _ImageHandle) -> ImageRecord:
        b = self._backend
        i = self._n
        for name in ("images/path", "images/meta", "images/group", "images/row", "images/sizes"):
            _resize_rows(b.array(name), i + 1)
        meta_json = json.dumps(_jsonable(handle.meta)) if handle.meta else ""
        b.array("images/path")[i] = handle.path
        b.array("images/meta")[i] = meta_json
        b.array("images/group")[i] = handle.group
        b.array("images/row")[i] = handle.row
        oh, ow = handle.orig_size
        ph, pw = handle.proc_size
        b.array("images/sizes")[i] = np.array([oh, ow, ph, pw, handle.grid[0], handle.grid[1]], dtype=np.int64)
        self._group_rows[handle.group] = handle.row + 1
        self._n = i + 1
        self.done.add(handle.path)
        return ImageRecord(
            index=i, path=handle.path, orig_size=(int(oh), int(ow)), proc_size=(int(ph), int(pw)),
            grid=handle.grid, group=handle.group, row=handle.row, meta=dict(handle.meta),
        )

    def commit(self) -> None:
        """Make every image added so far durable: a resumed run restarts after the last commit."""
        self._backend.set_attr("n_images", self._n)
        self._backend.flush()

    def update_provenance(self, **items: Any) -> None:
        """Add or replace provenance entries (for facts known only at the end, such as run time)."""
        self.provenance.update(_jsonable(items))
        self._backend.set_attr("provenance", json.dumps(self.provenance))

    # -- finishing ---------------------------------------------------------------------------------------------
    def close(self, complete: bool = True) -> Path | None:
        """Finish the store.

        With ``complete=True`` the store is marked complete and moved to its final name (or streamed to the
        output stream). With ``complete=False`` a file store stays at ``<path>.partial`` for ``--resume``.
        Returns the final path, or None for a streamed store or an unfinished one.
        """
        if self._closed:
            return None
        self._closed = True
        b = self._backend
        try:
            b.set_attr("n_images", self._n)
            if complete:
                b.set_attr("complete", True)
            b.flush()
        finally:
            b.close()
        if self._stream_out is not None:
            assert self._tmpfile is not None
            if complete:
                self._tmpfile.seek(0)
                shutil.copyfileobj(self._tmpfile, self._stream_out, 4 * 2**20)
                self._stream_out.flush()
            self._tmpfile.close()
            return None
        if not complete:
            return None
        assert self.path is not None and self.work_path is not None
        if self.format == "zarr-zip":
            _zip_dir(self.work_path, self.path)
            _remove(self.work_path)
        else:
            if self.path.exists():
                _remove(self.path)
            os.replace(self.work_path, self.path)
        return self.path

    def abort(self) -> None:
        """Stop without finishing: keep the partial store for ``--resume`` (a streamed store is discarded)."""
        self.close(complete=False)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(complete=exc_type is None)


class _ImageHandle:
    """Rows reserved for one image in a :class:`StoreWriter`; written in bands, then finished."""

    def __init__(self, writer, path, group, row, grid, orig_size, proc_size, meta):
        self.writer, self.path, self.group, self.row, self.grid = writer, path, group, row, grid
        self.orig_size, self.proc_size, self.meta = orig_size, proc_size, meta

    def write_rows(self, layer: str, start: int, tokens: np.ndarray) -> None:
        """Write token rows ``start : start + len(tokens)`` of one layer; ``tokens`` is ``(rows, w, C)``."""
        w = self.writer
        tokens = np.asarray(tokens)
        if tokens.ndim != 3 or tokens.shape[1] != self.grid[1]:
            raise ValueError(f"expected token rows of shape (r, {self.grid[1]}, C), got {tokens.shape}")
        with np.errstate(over="ignore"):
            stored = tokens.astype(w.dtype)
        if w.dtype == np.float16 and not np.isfinite(stored).all() and np.isfinite(tokens).all():
            warnings.warn(
                f"features of '{self.path}' overflow float16 (|x| > 65504); extract with --dtype float32",
                PosvitWarning,
                stacklevel=2,
            )
        arr = w._backend.array(f"groups/{self.group}/features/{canonical_layer_name(layer)}")
        arr[self.row, start : start + stored.shape[0]] = stored

    def finish(self) -> ImageRecord:
        return self.writer._commit_image(self)


def _grid_of(features: Mapping[str, np.ndarray], layers: Sequence[str]) -> tuple[int, int]:
    missing = [x for x in layers if x not in features]
    if missing:
        raise ValueError(f"features missing for layers {missing}")
    shapes = {tuple(np.shape(features[x])) for x in layers}
    if len(shapes) != 1:
        raise ValueError(f"all layers must share one (h, w, C) shape, got {sorted(shapes)}")
    shape = shapes.pop()
    if len(shape) != 3:
        raise ValueError(f"features must be (h, w, C), got shape {shape}")
    return int(shape[0]), int(shape[1])


def _jsonable(obj: Any) -> Any:
    """Convert NumPy scalars/arrays and paths so the object survives ``json.dumps``."""
    return json.loads(json.dumps(obj, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (Path, os.PathLike)):
        return str(o)
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _zip_dir(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    # Stored, not deflated: float16 features barely compress and zarr chunks may already be compressed.
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for file in sorted(src.rglob("*")):
            if file.is_file():
                zf.write(file, file.relative_to(src).as_posix())
    os.replace(tmp, dst)


def _unzip_dir(src: Path, dst: Path) -> None:
    with zipfile.ZipFile(src) as zf:
        zf.extractall(dst)


# --------------------------------------------------------------------------------------------------------------
# Merging shards


def merge_stores(
    sources: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress=None,
) -> int:
    """Join stores made with the same settings (``extract --shard i/n``) into one.

    Images keep the order of ``sources``; an image path present in several sources is written once. Returns the
    number of images written.

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
            diff = [k for k in SIGNATURE_KEYS if first.provenance.get(k) != other.provenance.get(k)]
            if diff:
                raise PosvitError(
                    f"cannot merge '{other.source}' with '{first.source}': {', '.join(diff)} differ"
                )
        prov = dict(first.provenance)
        prov["merged_from"] = [str(s) for s in sources]
        shards = [s.provenance.get("shard") for s in stores]
        prov.pop("shard", None)
        if any(shards):
            prov["merged_shards"] = shards
        total = sum(len(s) for s in stores)
        seen: set[str] = set()
        has_prefix = bool(first.provenance.get("prefix_tokens"))
        with StoreWriter(
            output, provenance=prov, layers=first.layers, dtype=first.provenance.get("dtype", "float16"),
            overwrite=overwrite,
        ) as writer:
            done = 0
            for store in stores:
                for rec in store.records:
                    done += 1
                    if rec.path in seen:
                        continue
                    seen.add(rec.path)
                    feats = {layer: store.features(rec.index, layer, dtype=writer.dtype) for layer in store.layers}
                    prefix = (
                        {layer: store.prefix_tokens(rec.index, layer) for layer in store.layers}
                        if has_prefix else None
                    )
                    writer.add(rec.path, feats, orig_size=rec.orig_size, proc_size=rec.proc_size, prefix=prefix,
                               meta=rec.meta)
                    progress("merge", done, total)
                writer.commit()
        return len(seen)
    finally:
        for s in stores:
            s.close()


def read_bytes_store(data: bytes) -> FeatureStore:
    """Open a store from bytes in memory (tests and notebooks)."""
    store = FeatureStore.__new__(FeatureStore)
    store._tmp = None
    store.source = "<bytes>"
    store._backend, store.format = _open_stream(io.BytesIO(data))
    store._load_header(allow_partial=False)
    return store
