"""Training data of a retrofit run: readable-image checks, the seeded train/validation split, the per-epoch order
and its split into processes and micro-batches, and the image set the loader reads.

Determinism: the order of every epoch is a function of (seed, stage, epoch) only; a step's global batch is split
across processes and micro-batches by position, so the same images form a step whatever the number of processes
and gradient-accumulation steps.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from posvit_cli.core.io.images import read_image, to_channels, to_float
from posvit_cli.core.io.preprocess import ResizeMode, resize_and_normalise
from posvit_cli.core.progress import ProgressCallback, report


def check_images(paths: Sequence[str | os.PathLike], progress: ProgressCallback | None = None) -> list[tuple[str, str]]:
    """Find images that cannot be decoded, cheaply (headers and integrity checks, no full decode of JPEGs).

    Returns
    -------
    list of (path, reason)
    """
    progress = report(progress)
    bad = []
    total = len(paths)
    for i, p in enumerate(paths):
        p = Path(p)
        try:
            if p.suffix.lower() in (".tif", ".tiff"):
                import tifffile

                with tifffile.TiffFile(str(p)) as tf:
                    _ = tf.pages[0].shape
            else:
                from PIL import Image

                with Image.open(p) as im:
                    im.verify()
        except Exception as exc:
            bad.append((str(p), f"{type(exc).__name__}: {exc}".strip()))
        if (i + 1) % 256 == 0 or i + 1 == total:
            progress("checking images", i + 1, total)
    return bad


def split_train_val(paths: Sequence[Path], fraction: float, max_val: int, seed: int) -> tuple[list[Path], list[Path]]:
    """A seeded split of the sorted image list into training and validation images.

    Returns
    -------
    train, val : list of Path
        Both in sorted order.
    """
    import torch

    paths = sorted(Path(p) for p in paths)
    n = len(paths)
    n_val = min(max_val, int(round(n * fraction))) if fraction > 0 else 0
    if fraction > 0 and n >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, n - 1)
    g = torch.Generator().manual_seed(int(seed) + 7919)
    perm = torch.randperm(n, generator=g).tolist()
    val_idx = set(perm[:n_val])
    train = [p for i, p in enumerate(paths) if i not in val_idx]
    val = [p for i, p in enumerate(paths) if i in val_idx]
    return train, val


def epoch_order(n: int, seed: int, stage: int, epoch: int):
    """The image order of one epoch: a permutation of ``range(n)`` fixed by (seed, stage, epoch).

    Returns
    -------
    torch.Tensor of int64, shape (n,)
    """
    import torch

    key = hashlib.sha256(f"{seed}/{stage}/{epoch}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))
    return torch.randperm(n, generator=g)


def step_batches(order, step_in_epoch: int, global_batch: int, rank: int, world: int, micro: int) -> list[list[int]]:
    """This process's micro-batches (image indices) of one optimiser step.

    The step's global batch is ``order[step·G:(step+1)·G]``; process ``rank`` takes every ``world``-th image of
    it starting at ``rank``, in chunks of at most ``micro``.
    """
    batch = order[step_in_epoch * global_batch : (step_in_epoch + 1) * global_batch].tolist()
    share = batch[rank::world]
    return [share[i : i + micro] for i in range(0, len(share), micro)]


def noise_images(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` uniform-noise RGB images (uint8, ``size × size``): the published position probe's "noise" set."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def prepare_image(raw: np.ndarray, mode: ResizeMode, patch: int, mean, std, in_chans: int, intensity: str):
    """One image as the normalised encoder input, a tensor of shape (C, H, W)."""
    img = to_channels(to_float(raw, intensity), in_chans)
    tensor, _ = resize_and_normalise(img, mode, patch, mean, std)
    return tensor


class ImageSet:
    """Training/validation images as tensors of one stage size; optionally the teacher's stored targets.

    Errors are returned, not raised, so a decoding failure in a loader worker reaches the training process as a
    clear message naming the file.
    """

    def __init__(self, paths, size: int, patch: int, mean, std, in_chans: int, intensity: str,
                 store_path: str | None = None, store_index: dict[str, int] | None = None):
        self.paths = [str(p) for p in paths]
        self.mode = ResizeMode("crop", int(size))
        self.patch, self.mean, self.std, self.in_chans, self.intensity = patch, mean, std, in_chans, intensity
        self.store_path, self.store_index = store_path, store_index
        self._store = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        import torch

        path = self.paths[i]
        try:
            raw = read_image(path)
            t = prepare_image(raw, self.mode, self.patch, self.mean, self.std, self.in_chans, self.intensity)
            target = None
            if self.store_path is not None:
                if self._store is None:  # opened lazily: one handle per loader process
                    from posvit_cli.core.features.store import FeatureStore

                    self._store = FeatureStore(self.store_path)
                f = self._store.features(self.store_index[os.path.abspath(path)], "final")
                target = torch.from_numpy(np.ascontiguousarray(f, dtype=np.float32))
            return {"index": i, "image": t, "target": target, "error": None}
        except Exception as exc:
            return {"index": i, "image": None, "target": None, "error": f"'{path}': {exc}"}


def collate_items(items: list[dict]) -> dict:
    """Stack loader items into a batch, or pass on the first decoding error as ``{"error": message}``."""
    import torch

    errors = [it["error"] for it in items if it["error"]]
    if errors:
        return {"error": errors[0]}
    out = {"index": [it["index"] for it in items], "image": torch.stack([it["image"] for it in items])}
    if items[0]["target"] is not None:
        out["target"] = torch.stack([it["target"] for it in items])
    return out


def make_loader(dataset: ImageSet, batches: list[list[int]], workers: int):
    """A DataLoader over ``dataset`` yielding exactly ``batches`` (lists of indices), in order."""
    import torch

    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=workers if batches else 0, collate_fn=collate_items,
        persistent_workers=False, pin_memory=False,
    )
