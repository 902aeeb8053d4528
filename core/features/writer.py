"""Writing a feature store: create or resume ``<path>.partial``, append images, rename it into place when done.

A store under its final name is always complete; an interrupted write leaves a partial store that
:class:`StoreWriter` resumes (``posvit extract --resume``). The layout is documented in ``docs/feature-store.md``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from posvit_cli import __version__
from posvit_cli.core.errors import PosvitError, PosvitWarning
from posvit_cli.core.features.backends import (
    PARTIAL_SUFFIX,
    Backend,
    H5Backend,
    StoreLock,
    ZarrBackend,
    remove_path,
    resize_rows,
    store_format,
    unzip_dir,
    zip_dir,
)
from posvit_cli.core.features.provenance import identity_differences
from posvit_cli.core.features.records import (
    SCHEMA_NAME,
    SCHEMA_VERSION,
    ImageRecord,
    canonical_layer_name,
    grid_group_name,
)
from posvit_cli.core.fileio import json_clean

__all__ = ["ImageHandle", "StoreWriter"]

# Chunks of at most this many bytes: one chunk per image for ordinary grids, row bands for huge tiled grids.
_TARGET_CHUNK_BYTES = 8 * 2**20

# Axis names written on every array (Zarr ``dimension_names``, HDF5 dimension labels) so that xarray and dask
# open a store as it is (docs/feature-store.md). ``image`` counts rows of the array's own group: images/* hold
# every image, groups/{h}x{w}/* only the images with that grid (images/row says which row is which image).
IMAGE_DIMS = ("image",)
SIZES_DIMS = ("image", "size")
FEATURE_DIMS = ("image", "y", "x", "channel")
PREFIX_DIMS = ("image", "token", "channel")
MAP_DIMS = ("image", "y", "x")


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
        contain ``channels``; the keys in
        :data:`~posvit_cli.core.features.provenance.IDENTITY_KEYS` decide whether a resume is compatible.
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
        ``None`` picks the measured default (none for HDF5, zstd for Zarr); see :meth:`Backend.create_array`.
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
        self.provenance = json_clean(dict(provenance))
        self.provenance.setdefault("posvit_version", __version__)
        self.provenance["dtype"] = dtype
        self.provenance["layers"] = self.layers
        self._stream_out: BinaryIO | None = None
        self._tmpfile: BinaryIO | None = None
        self._closed = False
        self._lock: StoreLock | None = None
        self._backend: Backend | None = None
        self._committed = 0
        #: True once a write failed (full disk, I/O error): the writer is closed and wrote nothing more.
        self.failed = False
        #: True when the writer continues an existing store (``resume`` found one), False for a new store.
        self.resumed = False
        self.done: set[str] = set()

        if str(path) == "-" or stream is not None:
            self.path = None
            self.format = "hdf5"
            self._stream_out = stream if stream is not None else sys.stdout.buffer
            self._tmpfile = tempfile.TemporaryFile()
            self.work_path = None
            self._backend = H5Backend(self._tmpfile, "w")
            self.compression = compression
            self._init_new()
            return

        self.path = Path(path)
        self.format = store_format(self.path)
        self.compression = compression if compression is not None else ("zstd" if self.format != "hdf5" else None)
        self.work_path = Path(str(self.path) + PARTIAL_SUFFIX)
        if not self.path.parent.exists():
            raise PosvitError(f"output folder '{self.path.parent}' does not exist")
        # One writer per output: taken before anything is looked at, held until close/abort.
        self._lock = StoreLock(self.path)
        try:
            with self._writing():
                self._open(overwrite, resume)
        except BaseException:
            if self._backend is not None:
                self._backend.close()
            self._release_lock()
            raise

    # -- setup -------------------------------------------------------------------------------------------------
    def _open(self, overwrite: bool, resume: bool) -> None:
        assert self.work_path is not None and self.path is not None
        if resume and (self.work_path.exists() or self.path.exists()):
            self.resumed = True
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
            remove_path(self.work_path)
        self._backend = self._open_work("w")
        self._init_new()

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    @contextlib.contextmanager
    def _writing(self):
        """Turn an OSError while writing (a full disk, an I/O error) into one PosvitError, closing the store."""
        try:
            yield
        except OSError as exc:
            raise self._write_failed(exc) from exc

    def _write_failed(self, exc: OSError) -> PosvitError:
        """Close the store without writing more after ``exc``; the error to raise, saying what is saved."""
        self.failed = True
        self._closed = True
        if self._backend is not None:
            self._backend.close()  # nothing more is written: no n_images, no complete flag
        if self._tmpfile is not None:
            self._tmpfile.close()
        self._release_lock()
        no_space = exc.errno == errno.ENOSPC or "No space left" in str(exc) or "errno = 28" in str(exc)
        where = f"'{self.path}'" if self.path is not None else "the store for stdout (in a temporary file)"
        what = "no space left on device" if no_space else f"an I/O error ({exc.strerror or exc})"
        fix = "free space" if no_space else "fix it"
        if self.work_path is None or (self._committed == 0 and not self.resumed):
            if self.work_path is not None:
                with contextlib.suppress(OSError):
                    remove_path(self.work_path)
            return PosvitError(f"{what} while writing {where}: nothing was saved; {fix} and run again")
        return PosvitError(f"{what} while writing {where}: {self._committed} images are saved in "
                           f"'{self.work_path}'; {fix} and run again with --resume")

    def _open_work(self, mode: str) -> Backend:
        assert self.work_path is not None
        if self.format == "hdf5":
            return H5Backend(str(self.work_path), mode)
        # Zipped Zarr is assembled as a directory and zipped once at the end: zip archives cannot be updated
        # in place, and a directory keeps partial work resumable.
        return ZarrBackend(str(self.work_path), mode)

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
        b.create_array("images/row", (0,), "int64", (1024,), None, dims=IMAGE_DIMS)
        b.create_array("images/sizes", (0, 6), "int64", (1024, 6), None, dims=SIZES_DIMS)
        self._n = 0
        self._committed = 0
        self._group_rows: dict[str, int] = {}
        b.flush()

    def _open_for_resume(self) -> None:
        assert self.work_path is not None and self.path is not None
        if not self.work_path.exists():
            # Appending to a finished store. Whether it can be continued is decided from the store as it is,
            # read only: a refusal leaves it byte-identical.
            self._check_finished_store()
            # Then it is reopened under the partial name so it is never half-updated under its final name. A
            # zipped store stays in place (the updated one replaces it on close); its copy is unpacked.
            if self.format == "zarr-zip":
                try:
                    unzip_dir(self.path, self.work_path)
                except BaseException:
                    remove_path(self.work_path)
                    raise
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
        self._check_resumable(json.loads(b.get_attr("provenance", "{}")))
        n = int(b.get_attr("n_images", 0))
        b.set_attr("complete", False)
        # Rows beyond n_images were written by an interrupted batch and are dropped.
        for name in ("images/path", "images/meta", "images/group", "images/row", "images/sizes"):
            resize_rows(b.array(name), n)
        groups = b.read_strings("images/group")
        rows = np.asarray(b.array("images/row")[:n])
        self._group_rows = {}
        for g, r in zip(groups, rows):
            self._group_rows[g] = max(self._group_rows.get(g, 0), int(r) + 1)
        for g, count in self._group_rows.items():
            for kind in ("features", "prefix", "maps"):
                for child in b.children(f"groups/{g}/{kind}"):
                    resize_rows(b.array(f"groups/{g}/{kind}/{child}"), count)
        self._n = n
        self._committed = n
        self.done = set(b.read_strings("images/path"))
        b.flush()

    def _check_finished_store(self) -> None:
        """Refuse, before any file is touched, to append to a finished store that cannot be continued."""
        from posvit_cli.core.features.store import FeatureStore  # here: the store module imports this one

        assert self.path is not None
        try:
            with FeatureStore(self.path) as finished:
                old_provenance = finished.provenance
        except PosvitError as exc:
            raise PosvitError(f"cannot resume '{self.path}': {exc}") from exc
        self._check_resumable(old_provenance)

    def _check_resumable(self, old_provenance: Mapping[str, Any]) -> None:
        mismatched = identity_differences(old_provenance, self.provenance)
        if mismatched:
            raise PosvitError(
                f"cannot resume '{self.path}': it was made with other settings ({', '.join(mismatched)} differ); "
                "use --overwrite or another output"
            )

    def _salvage_hdf5(self) -> None:
        """Copy the committed images of an interrupted HDF5 store into a fresh file.

        A process killed while HDF5 flushes metadata can leave the file's internal heaps inconsistent: still
        readable, but no longer safe to append to. Resuming therefore rewrites what was committed, then appends
        to the clean copy.
        """
        assert self.work_path is not None
        from posvit_cli.core.features.store import FeatureStore  # here: the store module imports this one

        damaged = f"cannot resume '{self.work_path}': the interrupted store is damaged (was it killed during a write?)"
        try:
            src = FeatureStore(self.work_path, allow_partial=True)
        except PosvitError as exc:
            raise PosvitError(f"{damaged}: {exc}; start again with --overwrite") from exc
        salvage = self.work_path.with_name(self.work_path.name + ".salvage")
        remove_path(salvage)
        try:
            with src:
                self._check_resumable(src.provenance)
                self._backend = H5Backend(str(salvage), "w")
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
            remove_path(salvage)
            raise
        except Exception as exc:
            remove_path(salvage)
            raise PosvitError(f"{damaged} ({type(exc).__name__}: {exc}); start again with --overwrite") from exc
        finally:
            if getattr(self, "_backend", None) is not None:
                self._backend.close()
        os.replace(salvage, self.work_path)

    # -- appending ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._n

    @property
    def committed(self) -> int:
        """Images made durable by the last :meth:`commit` (what a resumed run would find)."""
        return self._committed

    def _group_arrays(self, grid: tuple[int, int], channels: int, prefix: Mapping[str, np.ndarray] | None, maps):
        b = self._backend
        g = grid_group_name(grid)
        if g not in self._group_rows:
            self._group_rows[g] = 0
        h, w = grid
        row_bytes = w * channels * self.dtype.itemsize
        rows_per_chunk = int(max(1, min(h, _TARGET_CHUNK_BYTES // max(row_bytes, 1))))
        for layer in self.layers:
            name = f"groups/{g}/features/{layer}"
            if not b.has(name):
                chunks = (1, rows_per_chunk, w, channels)
                b.create_array(name, (0, h, w, channels), self.dtype, chunks, self.compression, dims=FEATURE_DIMS)
            if prefix:
                pname = f"groups/{g}/prefix/{layer}"
                if not b.has(pname):
                    p = prefix[layer].shape[0]
                    b.create_array(pname, (0, p, channels), self.dtype, (64, p, channels), None, dims=PREFIX_DIMS)
        for mname, arr in (maps or {}).items():
            key = f"groups/{g}/maps/{mname}"
            if not b.has(key):
                b.create_array(key, (0, h, w), np.asarray(arr).dtype, (64, h, w), None, dims=MAP_DIMS)
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
    ) -> ImageHandle:
        """Reserve the rows of one image so its grid can be written in bands (tiled extraction).

        Call :meth:`ImageHandle.write_rows` for every layer and row band, then :meth:`ImageHandle.finish`;
        the image counts as written only after ``finish``.
        """
        if self._closed:
            raise RuntimeError("store writer is closed")
        with self._writing():
            return self._begin_image(path, grid, channels, orig_size, proc_size, prefix, maps, meta)

    def _begin_image(self, path, grid, channels, orig_size, proc_size, prefix, maps, meta) -> ImageHandle:
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
                resize_rows(b.array(f"groups/{g}/{kind}/{child}"), row + 1)
        if prefix:
            for layer in self.layers:
                b.array(f"groups/{g}/prefix/{layer}")[row] = np.asarray(prefix[layer], dtype=self.dtype)
        for mname, arr in (maps or {}).items():
            b.array(f"groups/{g}/maps/{mname}")[row] = np.asarray(arr)
        return ImageHandle(self, path, g, row, grid, orig_size, proc_size, dict(meta or {}))

    def _commit_image(self, handle: ImageHandle) -> ImageRecord:
        if self._closed:
            raise RuntimeError("store writer is closed")
        b = self._backend
        i = self._n
        oh, ow = handle.orig_size
        ph, pw = handle.proc_size
        with self._writing():
            for name in ("images/path", "images/meta", "images/group", "images/row", "images/sizes"):
                resize_rows(b.array(name), i + 1)
            meta_json = json.dumps(json_clean(handle.meta)) if handle.meta else ""
            b.array("images/path")[i] = handle.path
            b.array("images/meta")[i] = meta_json
            b.array("images/group")[i] = handle.group
            b.array("images/row")[i] = handle.row
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
        if self._closed:
            raise RuntimeError("store writer is closed")
        with self._writing():
            self._backend.set_attr("n_images", self._n)
            self._backend.flush()
        self._committed = self._n

    def update_provenance(self, **items: Any) -> None:
        """Add or replace provenance entries (for facts known only at the end, such as run time)."""
        self.provenance.update(json_clean(items))
        with self._writing():
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
        try:
            with self._writing():
                return self._finish(complete)
        finally:
            self._release_lock()

    def _finish(self, complete: bool) -> Path | None:
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
            zip_dir(self.work_path, self.path)
            remove_path(self.work_path)
        else:
            if self.path.is_dir():  # a directory cannot be replaced in one step; a file can, atomically
                remove_path(self.path)
            os.replace(self.work_path, self.path)
        return self.path

    def abort(self) -> None:
        """Stop without finishing: keep the partial store for ``--resume`` (a streamed store is discarded)."""
        self.close(complete=False)

    def discard(self) -> None:
        """Stop and delete what this writer created: a new store's ``.partial`` (nothing under the final name).

        A resumed store is kept as :meth:`abort` keeps it: its earlier images are not this writer's to delete.
        """
        if self.resumed:
            self.abort()
            return
        if not self._closed:
            self._closed = True
            if self._backend is not None:
                self._backend.close()
            if self._tmpfile is not None:
                self._tmpfile.close()
        if self.work_path is not None:
            remove_path(self.work_path)
        self._release_lock()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(complete=exc_type is None)


class ImageHandle:
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
        if w._closed:
            raise RuntimeError("store writer is closed")
        with w._writing():
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
