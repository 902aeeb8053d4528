"""Where a feature store lives on disk: its file suffixes, and the few array operations on h5py and zarr.

The store class (:mod:`posvit_cli.core.features.store`) and its writer (:mod:`posvit_cli.core.features.writer`)
speak to either backend through :class:`Backend`; nothing else in posvit touches h5py or zarr groups directly.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.fileio import atomic_path

__all__ = [
    "LOCK_SUFFIX",
    "PARTIAL_SUFFIX",
    "STORE_SUFFIXES",
    "Backend",
    "H5Backend",
    "StoreLock",
    "ZarrBackend",
    "is_store_path",
    "open_stream",
    "remove_path",
    "resize_rows",
    "split_store_suffix",
    "store_format",
    "unzip_dir",
    "zip_dir",
]

#: Every file-name ending a feature store may have, longest first (``.zarr.zip`` before ``.zip``), with its
#: backend. The one list every command uses to tell a store from an image or a folder of images.
STORE_SUFFIXES: tuple[str, ...] = (".zarr.zip", ".hdf5", ".zarr", ".hdf", ".zip", ".h5")
_SUFFIX_FORMAT = {".zarr.zip": "zarr-zip", ".zip": "zarr-zip", ".zarr": "zarr", ".h5": "hdf5", ".hdf5": "hdf5",
                  ".hdf": "hdf5"}
#: Suffix of a store whose writer has not finished (resumable with ``--resume``).
PARTIAL_SUFFIX = ".partial"
#: Suffix of the lock file beside a store while a writer works on it (one writer per output).
LOCK_SUFFIX = ".lock"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_ZIP_MAGIC = b"PK\x03\x04"


def _suffix_of(path: str | os.PathLike, allow_partial: bool = False) -> str | None:
    p = str(path).lower().rstrip("/")
    if allow_partial and p.endswith(PARTIAL_SUFFIX):
        p = p[: -len(PARTIAL_SUFFIX)]
    return next((s for s in STORE_SUFFIXES if p.endswith(s)), None)


def is_store_path(path: str | os.PathLike) -> bool:
    """True when ``path`` names a feature store by its suffix (one of :data:`STORE_SUFFIXES`, any case).

    Only the name is read: the path need not exist. ``-`` (a store on a pipe) is not a path, and an
    unfinished ``<store>.partial`` is not a store.
    """
    return _suffix_of(path) is not None


def split_store_suffix(path: str | os.PathLike) -> tuple[str, str]:
    """``(base, suffix)`` of a store path, the suffix as written (``"runs/a.448.Zarr.zip"`` →
    ``("runs/a.448", ".Zarr.zip")``); ``(path, "")`` when it has no store suffix. A trailing ``/`` is dropped."""
    p = str(path).rstrip("/")
    suffix = _suffix_of(p)
    return (p[: len(p) - len(suffix)], p[len(p) - len(suffix):]) if suffix else (p, "")


def store_format(path: str | os.PathLike) -> str:
    """Return the backend for a store path: ``"hdf5"``, ``"zarr"`` (directory) or ``"zarr-zip"``.

    Raises
    ------
    PosvitError
        If the suffix names no known store format.
    """
    suffix = _suffix_of(path, allow_partial=True)
    if suffix is None:
        raise PosvitError(
            f"cannot tell the store format of '{path}': use a name ending in .h5, .zarr or .zarr.zip"
        )
    return _SUFFIX_FORMAT[suffix]


# --------------------------------------------------------------------------------------------------------------
# Backends: the few operations the store needs, on h5py and on zarr


class Backend:
    """Minimal array-and-attribute interface over h5py and zarr groups."""

    def get_attr(self, key: str, default: Any = None) -> Any:
        raise NotImplementedError

    def set_attr(self, key: str, value: Any) -> None:
        raise NotImplementedError

    def has(self, name: str) -> bool:
        raise NotImplementedError

    def array(self, name: str):
        raise NotImplementedError

    def create_array(self, name, shape, dtype, chunks, compression, dims: tuple[str, ...] | None = None):
        """A new array of ``shape`` whose first axis grows; ``dims`` names its axes for other readers.

        The names are written in each format's own way (Zarr v3 ``dimension_names``, HDF5 dimension labels) so
        that ``xarray.open_zarr`` and dask open the arrays as they are; posvit itself never reads them, so stores
        written without names still read.
        """
        raise NotImplementedError

    def create_string_array(self, name, dims: tuple[str, ...] = ("image",)):
        raise NotImplementedError

    def children(self, name: str) -> list[str]:
        raise NotImplementedError

    def missing_chunk(self, name: str, row: int, start: int = 0, stop: int | None = None) -> str | None:
        """The key of a chunk of ``name`` that covers ``[row, start:stop]`` but is absent from the store, or None.

        Only Zarr keeps chunks as separate keys that can go missing (a deleted file) and then silently read as
        the fill value; an HDF5 file has no such hole, so its backend always answers None.
        """
        return None

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class H5Backend(Backend):
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

    def create_array(self, name, shape, dtype, chunks, compression, dims=None):
        kwargs: dict[str, Any] = {}
        if compression == "gzip":
            kwargs = dict(compression="gzip", compression_opts=1, shuffle=True)
        elif compression == "lzf":
            kwargs = dict(compression="lzf", shuffle=True)
        elif compression not in (None, "none"):
            raise PosvitError(f"compression '{compression}' is not available for HDF5 stores: use none, gzip or lzf")
        maxshape = (None,) + tuple(shape[1:])
        dset = self.file.create_dataset(name, shape=shape, maxshape=maxshape, dtype=dtype, chunks=chunks, **kwargs)
        return _label_dims(dset, dims)

    def create_string_array(self, name, dims=("image",)):
        dt = self._h5py.string_dtype("utf-8")
        dset = self.file.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dt, chunks=(256,))
        return _label_dims(dset, dims)

    def read_strings(self, name) -> list[str]:
        return [s.decode() if isinstance(s, bytes) else str(s) for s in self.file[name][...]]

    def children(self, name):
        return list(self.file[name].keys()) if name in self.file else []

    def flush(self):
        self.file.flush()

    def close(self):
        with contextlib.suppress(Exception):
            self.file.close()


def _label_dims(dset, dims: tuple[str, ...] | None):
    """Label the axes of an h5py dataset (the ``DIMENSION_LABELS`` attribute h5py and HDF5 tools show)."""
    for axis, label in enumerate(dims or ()):
        dset.dims[axis].label = label
    return dset


class ZarrBackend(Backend):
    # Every chunk is written, even one equal to the fill value: a missing chunk file then always means damage
    # (see :meth:`missing_chunk`), never "all zeros".
    _ARRAY_CONFIG = {"write_empty_chunks": True}

    def __init__(self, target: str, mode: str, zip_file: bool = False):
        import zarr

        self._zarr = zarr
        self._store = None
        self._writable = mode != "r"
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
        arr = self.group[name]
        return arr.with_config(self._ARRAY_CONFIG) if self._writable else arr

    def missing_chunk(self, name, row, start=0, stop=None):
        from zarr.core.sync import sync

        arr = self.group[name]
        chunks, shape = arr.chunks, arr.shape
        if not shape or row >= shape[0]:
            return None
        if len(shape) > 1:
            stop = shape[1] if stop is None else min(stop, shape[1])
        ranges = [range(row // chunks[0], row // chunks[0] + 1)]
        if len(shape) > 1:
            ranges.append(range(start // chunks[1], max(start // chunks[1] + 1, -(-stop // chunks[1]))))
        ranges += [range(-(-n // c)) for n, c in zip(shape[2:], chunks[2:])]
        store, base = arr.store_path.store, arr.store_path.path
        for coords in itertools.product(*ranges):
            key = f"{base}/{arr.metadata.encode_chunk_key(coords)}" if base else arr.metadata.encode_chunk_key(coords)
            if not sync(store.exists(key)):
                return key
        return None

    def create_array(self, name, shape, dtype, chunks, compression, dims=None):
        from zarr.codecs import BloscCodec, ZstdCodec

        if compression in (None, "none"):
            compressors = None
        elif compression == "zstd":
            compressors = ZstdCodec(level=1)
        elif compression == "lz4":
            compressors = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
        else:
            raise PosvitError(f"compression '{compression}' is not available for Zarr stores: use none, zstd or lz4")
        return self.group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, compressors=compressors,
                                       dimension_names=dims, config=self._ARRAY_CONFIG)

    def create_string_array(self, name, dims=("image",)):
        return self.group.create_array(name, shape=(0,), dtype=str, chunks=(256,), dimension_names=dims,
                                       config=self._ARRAY_CONFIG)

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


class StoreLock:
    """The one-writer-per-output lock: ``<store>.lock`` beside the store, held with ``flock``.

    ``flock`` is released by the kernel when its holder dies, so a lock file left by a killed process does not
    block the next writer; a live holder's pid is written in the file for the message.

    Parameters
    ----------
    store : path-like
        The store's final path (``f.h5``, ``f.zarr``, ``f.zarr.zip``).

    Raises
    ------
    PosvitError
        If another process (or another writer in this one) holds the lock.
    """

    def __init__(self, store: str | os.PathLike):
        self.path = Path(str(store) + LOCK_SUFFIX)
        self._file = None
        try:
            import fcntl
        except ImportError:  # no flock on this platform: no lock (a documented limitation)
            return
        for _ in range(50):
            fh = open(self.path, "a+")
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                fh.seek(0)
                pid = fh.read().strip() or "unknown"
                fh.close()
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise PosvitError(f"cannot lock '{self.path}' to write '{store}' ({exc.strerror})") from None
                raise PosvitError(
                    f"'{store}' is being written by another posvit process (pid {pid}); wait for it or choose "
                    "another output"
                ) from None
            # The holder we waited for may have removed the file between our open and our flock: then we hold
            # a lock on a name nobody else sees, and must take the current file instead.
            try:
                current = os.path.samestat(os.fstat(fh.fileno()), os.stat(self.path))
            except FileNotFoundError:
                current = False
            if current:
                fh.seek(0)
                fh.truncate()
                fh.write(f"{os.getpid()}\n")
                fh.flush()
                self._file = fh
                return
            fh.close()
        raise PosvitError(f"cannot lock '{self.path}': it keeps being replaced by another process")

    def release(self) -> None:
        """Remove the lock file and release the lock (idempotent)."""
        if self._file is None:
            return
        # Unlink while still holding the lock, so a waiter that opened this file sees it is no longer current.
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        self._file.close()
        self._file = None


def resize_rows(arr, n: int) -> None:
    """Grow or shrink the first axis of an h5py or zarr array to ``n`` rows (no-op when it has ``n``)."""
    shape = tuple(arr.shape)
    if shape[0] != n:
        arr.resize((n,) + shape[1:])



def open_stream(stream: BinaryIO) -> tuple[Backend, str]:
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
            backend = H5Backend(tmp, "r")
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
            backend = ZarrBackend(name, "r", zip_file=True)
        finally:
            # The open zip keeps its file descriptor; removing the name now leaves nothing behind.
            with contextlib.suppress(OSError):
                os.unlink(name)
        return backend, "zarr-zip"
    raise PosvitError("standard input does not hold a feature store (expected HDF5 or zipped Zarr bytes)")


def remove_path(path: Path) -> None:
    """Delete a store (a file or a Zarr directory) if it exists."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def zip_dir(src: Path, dst: Path) -> None:
    """Zip the Zarr directory ``src`` into ``dst`` atomically (an interrupted zip leaves ``dst`` as it was)."""
    # Stored, not deflated: float16 features barely compress and zarr chunks may already be compressed.
    with atomic_path(dst, keep_suffix=True) as tmp, \
            zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for file in sorted(src.rglob("*")):
            if file.is_file():
                zf.write(file, file.relative_to(src).as_posix())


def unzip_dir(src: Path, dst: Path) -> None:
    """Unpack a zipped Zarr store ``src`` into the directory ``dst`` (to append to it)."""
    with zipfile.ZipFile(src) as zf:
        zf.extractall(dst)
