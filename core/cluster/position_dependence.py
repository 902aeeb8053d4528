"""How much a clustering depends on absolute position, against a null that keeps the images' content.

The question
    Do the clusters sit where they sit because of *what* the tokens show, or because of *where* they are on the
    token grid? A ViT whose features leak position splits a homogeneous image into a top and a bottom cluster;
    a content clustering follows the objects wherever they are.

The statistic
    Cut the ``h × w`` token grid into ``B × B`` blocks (``B`` = ``bins``, 2 by default: the four quadrants; each
    side is cut into ``min(B, side)`` near-equal runs). The statistic is the mutual information, in bits, between
    a token's cluster label and its block,

        I(label; block) = Σ_{l,b} p(l, b) log2 [p(l, b) / (p(l) p(b))],

    from the joint counts of (label, block). With dataset-wide clusterings (one k-means over a store: cluster ids
    mean the same in every image) the counts are pooled over all images of one grid size; with per-image
    decompositions (ids mean nothing across images) they are per image. Either way the MI of each group (grid
    size or image) is weighted by its token count. A top/bottom split with ``B = 2`` scores exactly 1 bit.

The null: rolls, not shuffles
    The plug-in MI of any clustering into blobs is above 0 (blobs do not fill blocks evenly), and shuffling tokens
    destroys the blobs, so a shuffled reference says nothing about position (the old spatial entropy,
    :mod:`~posvit_cli.core.cluster.entropy`, never separated from its shuffled value). Here each draw rolls every
    image's label map by its own uniform random whole-token offset on the torus (``np.roll`` by ``(dy, dx)``):
    the cluster sizes, blob shapes and spatial autocorrelation of every image stay as they are; only their
    alignment to the absolute grid is destroyed. Offsets that map an axis's block partition onto itself (0, and
    h/2 or w/2 with two blocks) are left out of the draws (:func:`breaking_offsets`): they keep the alignment
    and would only copy the observation into its own null. ``draws`` (99 by default) seeded draws give the null
    distribution.

What is reported (:func:`position_dependence`)
    ``mi_bits``
        The observed statistic.
    ``null_mean_bits``, ``null_std``
        Mean and standard deviation (bits) of the rolled statistic.
    ``excess_bits``
        ``mi_bits − null_mean_bits``.
    ``max_bits``
        The largest MI the clusters could reach, ``min(H(label), H(block))`` per group, token-weighted: a
        clustering that is a function of the block (or whose blocks are pure) reaches it.
    ``dependence``
        ``excess_bits / (max_bits − null_mean_bits)``: 1 when the clusters are as aligned to the blocks as their
        sizes allow, about 0 (either sign, by chance) when they sit no better than their rolled copies; 0 when
        the null already reaches the maximum (e.g. one cluster).
    ``p_value``
        ``(1 + #{null ≥ observed}) / (1 + draws)``: the Monte-Carlo p-value of a one-sided permutation test.
    ``position_driven``
        ``p_value < P_THRESHOLD`` (0.05) and ``dependence ≥ DEPENDENCE_THRESHOLD`` (0.1).

Known answers and limits
    - Every image split top/bottom: 1 bit, dependence 1, p = 1/(1 + draws) once a few images are pooled.
    - A content split of a random texture (thresholded smoothed noise, different per image): dependence ≈ 0,
      p roughly uniform on (0, 1].
    - One image: a top/bottom split of a single 20-row grid scores p = 1/(1 + draws) and dependence 1 (the
      rolls by 0 and 10 rows, which reproduce it, are not null draws). One image cannot tell a position split
      from content that happens to lie top/bottom (sky over ground): pool images, whose content moves, for a
      verdict about the encoder.
    - ``B`` blocks see only boundaries on block edges: with ``B = 2`` a centre band (rows h/4 to 3h/4) scores
      0 bits; ``B = 4`` sees it.

Cost and memory
    Each draw is one ``np.bincount`` over combined (group, label, block) keys; the rolls are index arithmetic
    on the per-axis block indices, never on the label maps. Keys are built for at most :data:`CHUNK_TOKENS`
    tokens at a time (whole images, or row bands of one huge image), so a 625 × 625 grid costs a few MB.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from posvit_cli.core.errors import PosvitError

__all__ = [
    "DEFAULT_BINS",
    "DEFAULT_DRAWS",
    "DEPENDENCE_THRESHOLD",
    "P_THRESHOLD",
    "breaking_offsets",
    "dependence_cell",
    "label_block_mi",
    "position_dependence",
]

#: Blocks per side of the grid (2: quadrants).
DEFAULT_BINS = 2
#: Rolled draws of the null.
DEFAULT_DRAWS = 99
#: ``position_driven`` needs a p-value below this ...
P_THRESHOLD = 0.05
#: ... and a normalised dependence at least this.
DEPENDENCE_THRESHOLD = 0.1
#: Tokens whose keys are built at once (bounds the working memory to a few tens of MB).
CHUNK_TOKENS = 1 << 20


def _axis_bins(n: int, bins: int) -> np.ndarray:
    """Block index along one axis of ``n`` tokens cut into ``min(bins, n)`` near-equal runs, shape (n,)."""
    return np.arange(n) * min(bins, n) // n


def breaking_offsets(n: int, bins: int) -> np.ndarray:
    """Roll offsets along one axis of ``n`` tokens that move its block boundaries, shape (m,) of int.

    A roll by a whole number of blocks (0, or n/2 with two blocks) maps the block partition onto itself, so the
    rolled labels keep every alignment to the blocks they had: such a draw is a copy of the observation, not a
    draw of the null, and would put a floor of (its share of offsets) under every p-value (0.1 for one 20-row
    top/bottom split). They are left out; when every offset keeps the partition (one-token blocks), all are
    kept.
    """
    edge = _axis_bins(n, bins)
    edge = edge != np.roll(edge, 1)  # a block starts at this token (on the torus)
    shifted = edge[(np.arange(n)[None, :] - np.arange(n)[:, None]) % n]  # row s: the edges rolled by s
    moved = np.flatnonzero((shifted != edge[None, :]).any(axis=1))
    return moved if moved.size else np.arange(n)


def _entropy_bits(p: np.ndarray, axis) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0).sum(axis=axis)


def label_block_mi(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mutual information (bits) of joint (label, block) counts, and the largest it could be.

    Parameters
    ----------
    counts : ndarray, shape (g, k, b)
        Tokens of label ``l`` in block ``b`` for each of ``g`` groups (images or grid sizes).

    Returns
    -------
    mi : ndarray, shape (g,)
        ``H(label) + H(block) − H(label, block)`` in bits (0 for an empty group; clipped at 0 against rounding).
    max_mi : ndarray, shape (g,)
        ``min(H(label), H(block))`` in bits.
    """
    counts = np.asarray(counts, dtype=np.float64)
    n = counts.sum(axis=(1, 2))
    p = counts / np.maximum(n, 1.0)[:, None, None]
    h_label = _entropy_bits(p.sum(2), 1)
    h_block = _entropy_bits(p.sum(1), 1)
    h_joint = _entropy_bits(p.reshape(len(p), -1), 1)
    return np.maximum(h_label + h_block - h_joint, 0.0), np.minimum(h_label, h_block)


def _group_counts(labels: np.ndarray, k: int, bins: int, shifts: np.ndarray | None, per_image: bool):
    """Joint (label, block) counts of images of one grid, after rolling each by its shift, chunk by chunk.

    Parameters
    ----------
    labels : ndarray, shape (n, h, w) of int in [0, k)
    shifts : ndarray, shape (n, 2) of int, optional
        Roll of each image ``(dy, dx)`` (``np.roll`` semantics); None: as stored.
    per_image : bool
        One count table per image (else one pooled table).

    Yields
    ------
    ndarray of int64, shape (m, k, nb) with ``nb`` the number of blocks: per image, ``m`` images at a time (at
    most :data:`CHUNK_TOKENS` tokens and count cells per chunk), or once the pooled table (``m`` = 1).
    """
    n, h, w = labels.shape
    rows, cols = _axis_bins(h, bins), _axis_bins(w, bins)
    bw = min(bins, w)
    nb = min(bins, h) * bw
    pooled = np.zeros((1, k, nb), dtype=np.int64)
    # np.roll(lab, (dy, dx))[r, c] = lab[r - dy, c - dx]: the token stored at (r, c) lands in the block of
    # (r + dy, c + dx), so rolling the block indices is the same as rolling the labels.
    row_idx = np.arange(h)
    col_blocks = np.broadcast_to(cols, (n, w)) if shifts is None else cols[(np.arange(w) + shifts[:, 1:2]) % w]
    band = max(1, min(h, CHUNK_TOKENS // max(w, 1)))  # rows per chunk when one image is larger than a chunk
    per_chunk = max(1, CHUNK_TOKENS // max(h * w, k * nb if per_image else 1))  # images per chunk otherwise
    for a in range(0, n, per_chunk):
        b = min(n, a + per_chunk)
        out = np.zeros((b - a, k, nb), dtype=np.int64) if per_image else pooled
        for r0 in range(0, h, band if per_chunk == 1 else h):
            r1 = min(h, r0 + (band if per_chunk == 1 else h))
            rr = row_idx[r0:r1]
            row_blocks = (np.broadcast_to(rows[rr], (b - a, r1 - r0)) if shifts is None
                          else rows[(rr[None, :] + shifts[a:b, 0:1]) % h])
            key = labels[a:b, r0:r1].astype(np.int64) * nb + (row_blocks[:, :, None] * bw
                                                              + col_blocks[a:b, None, :])
            if per_image:
                key += (np.arange(b - a) * (k * nb))[:, None, None]
                out += np.bincount(key.ravel(), minlength=(b - a) * k * nb).reshape(b - a, k, nb)
            else:
                out[0] += np.bincount(key.ravel(), minlength=k * nb).reshape(k, nb)
        if per_image:
            yield out
    if not per_image:
        yield pooled


def _by_grid(labels_per_image: Sequence[np.ndarray]) -> tuple[dict[tuple[int, int], np.ndarray], int]:
    """Label maps stacked per grid size, and the number of labels (max label + 1)."""
    groups: dict[tuple[int, int], list[np.ndarray]] = {}
    k = 0
    for i, lab in enumerate(labels_per_image):
        lab = np.asarray(lab)
        if lab.ndim != 2 or lab.size == 0:
            raise PosvitError(f"label map {i} has shape {lab.shape}: position dependence needs (h, w) label grids")
        if not np.issubdtype(lab.dtype, np.integer):
            raise PosvitError(f"label map {i} holds {lab.dtype} values: cluster labels must be integers")
        lo, hi = int(lab.min()), int(lab.max())
        if lo < 0:
            raise PosvitError(f"label map {i} holds the negative label {lo}: cluster labels must be 0 or more")
        k = max(k, hi + 1)
        groups.setdefault(lab.shape, []).append(lab)
    return {g: np.stack(v) for g, v in groups.items()}, k


def _statistic(grids: dict, k: int, bins: int, per_image: bool, shifts: dict | None) -> tuple[float, float]:
    """Token-weighted MI (bits) and its maximum over all groups; ``shifts``: per grid size, (n, 2) rolls."""
    mi_sum = max_sum = 0.0
    tokens = 0
    for g, labs in grids.items():
        for counts in _group_counts(labs, k, bins, None if shifts is None else shifts[g], per_image):
            weight = counts.sum(axis=(1, 2)).astype(np.float64)
            mi, max_mi = label_block_mi(counts)
            mi_sum += float(weight @ mi)
            max_sum += float(weight @ max_mi)
            tokens += int(weight.sum())
    return mi_sum / tokens, max_sum / tokens


def position_dependence(labels_per_image: Sequence[np.ndarray], *, per_image: bool = False,
                        bins: int = DEFAULT_BINS, draws: int = DEFAULT_DRAWS, seed: int = 0) -> dict:
    """Mutual information between cluster label and grid block, against rolled copies (module docstring).

    Parameters
    ----------
    labels_per_image : sequence of ndarray, shape (h, w) of int ≥ 0
        Cluster label of every token; images may have different grids.
    per_image : bool
        Per-image decompositions (ids mean nothing across images): count and score each image on its own. Else
        the counts are pooled over the images of one grid size (dataset-wide cluster ids).
    bins : int
        Blocks per side of the grid (≥ 2; a side shorter than ``bins`` tokens is cut into one-token blocks).
    draws : int
        Rolled draws of the null (≥ 1).
    seed : int
        Seed of the rolls: the same seed gives the same result.

    Returns
    -------
    dict (JSON-ready)
        ``mi_bits``, ``null_mean_bits``, ``null_std``, ``excess_bits``, ``max_bits``, ``dependence``,
        ``p_value``, ``position_driven`` (see the module docstring), and the settings ``bins``, ``draws``,
        ``seed``, ``per_image``, ``null`` (in words), ``n_images``, ``n_tokens``.
    """
    if int(bins) < 2:
        raise PosvitError(f"position bins must be at least 2 (got {bins})")
    if int(draws) < 1:
        raise PosvitError(f"null draws must be at least 1 (got {draws})")
    if len(labels_per_image) == 0:
        raise PosvitError("no label maps to measure position dependence on")
    bins, draws = int(bins), int(draws)
    grids, k = _by_grid(labels_per_image)
    observed, max_bits = _statistic(grids, k, bins, per_image, None)
    rng = np.random.default_rng(seed)
    offsets = {g: (breaking_offsets(g[0], bins), breaking_offsets(g[1], bins)) for g in grids}
    null = np.empty(draws)
    for d in range(draws):
        shifts = {g: np.stack([rng.choice(offsets[g][0], len(labs)), rng.choice(offsets[g][1], len(labs))], 1)
                  for g, labs in grids.items()}
        null[d] = _statistic(grids, k, bins, per_image, shifts)[0]
    null_mean = float(null.mean())
    excess = observed - null_mean
    headroom = max_bits - null_mean
    dependence = excess / headroom if headroom > 1e-12 else 0.0
    # A rolled copy that reproduces the observed partition ties with it up to rounding: count it as ≥.
    p_value = (1 + int(np.sum(null >= observed - 1e-12))) / (1 + draws)
    return {
        "mi_bits": float(observed), "null_mean_bits": null_mean, "null_std": float(null.std()),
        "excess_bits": float(excess), "max_bits": float(max_bits), "dependence": float(dependence),
        "p_value": float(p_value),
        "position_driven": bool(p_value < P_THRESHOLD and dependence >= DEPENDENCE_THRESHOLD),
        "bins": bins, "draws": draws, "seed": int(seed), "per_image": bool(per_image),
        "null": "each image's labels rolled by an independent uniform whole-token offset on the torus (offsets "
                "that keep the block partition left out)",
        "n_images": len(labels_per_image), "n_tokens": int(sum(np.asarray(x).size for x in labels_per_image)),
    }


def dependence_cell(result: dict | None) -> str:
    """A result as a table cell: ``0.93 (p=0.01)``, with `` *`` when it is position-driven; ``""`` for None."""
    if not result:
        return ""
    cell = f"{result['dependence']:.2f} (p={result['p_value']:.2g})"
    return cell + " *" if result["position_driven"] else cell
