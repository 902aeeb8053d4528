"""``debias-train auto``: fit every cheap debiasing head on part of a store, score each on the rest, pick one.

Split
    The store's images are split by name (:func:`~posvit_cli.core.measure.semantic.dataset.image_split`: a
    seeded permutation of the sorted file stems, so the split depends on the names and ``seed`` only):
    ``holdout_fraction`` of them (at least one, at most ``max_holdout`` scored) are held out; heads are fitted on
    the rest. A one-image store is fitted and scored on that image (the table says so).

Candidates (all fitted on the fit images; names as in the table)
    ``none``; ``svd-k`` (the constant-image subspace of the encoder rebuilt from the store's provenance, its first
    ``k`` singular vectors; skipped with a note when the encoder cannot be rebuilt); ``posmean``; ``blank-k``
    (``probe``'s top-``k`` channels per ramp set to their fit-image means); ``rasa-r`` (the first ``r`` planes of
    ONE RASA fit of ``max(rasa_rounds)`` rounds: round ``t`` is trained on the output of rounds ``1..t−1`` only, so
    those are exactly the planes an ``r``-round run trains); ``svd-k+rasa-r`` (both subspaces in one exact
    projection head). ``posmean`` followed by a projection is not a candidate: a head file holds one method, and
    ``(z − f) L`` is neither a mean field nor a projection.

Scores (:mod:`~posvit_cli.core.debias.auto_scores`): positional = held-out ``xy`` stack R² and its ``random``
null; kept = semantic ridge-probe mIoU with masks, else the kNN agreement of the content with the raw features (plus
k-means seed stability, reported only); and, where the encoder can be rebuilt and the held-out images' files read,
the crop-shift correspondence of each candidate (:mod:`~posvit_cli.core.debias.auto_shift`: the fraction of
tokens whose nearest neighbour in a shifted view follows the content, and the fraction that follows the grid),
reported only: a store alone does not carry what it needs (images and encoder), so the rule cannot rest on it.

Rule (:func:`choose`)
    Default: the candidates whose kept score is at least ``kept(none) − max_loss`` are eligible; their positional
    score is the held-out ``xy`` R², floored at the raw features' ``random`` null (``null(none)``: at or below it
    there is no linear evidence of position, so such candidates tie); the chosen one is the **simplest** eligible
    candidate whose positional score is within ``tie`` of the lowest. One floor for every candidate, the raw
    features' null, rather than each candidate's own: with the few training tokens of the published fraction the
    null lies far below 0 and moves by ±0.3 between candidates (posvit-tiny on the demo's textures), more than
    the differences the rule must see. A floor at 0 instead would call a head that leaves a probe at −0.4 (one
    RASA plane on a planted store, whose pooled xy R² is still 0.57) as clean as one at −1.2 (eight planes).
    Simplest: ``none`` < ``blank`` < ``posmean`` <
    ``svd`` < ``rasa`` < combinations, then fewer channels, vectors or planes. So a store whose raw features are
    already at the null keeps ``none``, and a head is chosen only when it removes position that is there.
    With ``max_r2``: the candidates whose held-out ``xy`` R² is at most ``max_r2`` are eligible and the one that
    keeps most (ties within ``tie``: the simplest) is chosen; when none reaches it, the run is refused.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from posvit_cli.core.debias.auto_scores import (
    across_images_r2, apply_window, cluster_stability, labelled_sample, load_held_out, neighbour_agreement, positional_scores,
    raw_neighbours, semantic_miou,
)
from posvit_cli.core.debias.auto_shift import shift_pairs, shift_scores, shift_unavailable
from posvit_cli.core.errors import PosvitError
from posvit_cli.core.progress import ProgressCallback, report

__all__ = ["AUTO_SCHEMA", "AUTO_SCHEMA_VERSION", "FAMILIES", "AutoSettings", "Candidate", "StoreView", "choose",
           "fit_candidates", "rebuild_encoder", "run_auto", "split_images"]

AUTO_SCHEMA = "posvit-debias-auto"
AUTO_SCHEMA_VERSION = 1
#: Candidate families in order of simplicity (ties go to the earlier family).
FAMILIES = ("none", "blank", "posmean", "svd", "rasa", "svd+rasa")


@dataclasses.dataclass
class AutoSettings:
    """What ``auto`` fits and how it scores and chooses (see the module docstring).

    Attributes
    ----------
    families : tuple of str
        Candidate families to fit (:data:`FAMILIES`; ``none`` is always scored).
    svd_ranks, blank_ks, rasa_rounds : tuple of int
    combos : tuple of (int, int)
        ``(k, r)`` pairs of ``svd-k+rasa-r``.
    max_loss : float
        Largest drop of the kept score below ``none``'s (absolute).
    max_r2 : float or None
        The alternative rule's threshold on held-out ``xy`` R².
    tie : float
        Scores this close count as equal (the simpler candidate wins).
    holdout_fraction, max_holdout : float, int
    window : int
        Held-out grids are scored on their central ``window × window`` tokens.
    rasa_max_tokens, rasa_epochs : int
        Tokens cached for RASA, epochs per round.
    rasa_lr : float
    knn_k, knn_queries, kmeans_k, kmeans_tokens : int
    ignore_index : int or None
        Mask value of unlabelled pixels.
    shift : bool
        Score the crop-shift correspondence where the encoder and the images are available (reported only).
    shift_images : int
        Held-out images whose shifted views are encoded for it.
    layer : str
    seed : int
    """

    families: tuple = FAMILIES
    svd_ranks: tuple = (1, 2, 4, 8)
    blank_ks: tuple = (2, 4, 8)
    rasa_rounds: tuple = (1, 2, 4, 8)
    combos: tuple = ((2, 2), (8, 8))
    max_loss: float = 0.05
    max_r2: float | None = None
    tie: float = 0.05
    holdout_fraction: float = 0.3
    max_holdout: int = 16
    window: int = 96
    rasa_max_tokens: int = 200_000
    rasa_epochs: int = 20
    rasa_lr: float = 0.05
    knn_k: int = 10
    knn_queries: int = 256
    kmeans_k: int = 8
    kmeans_tokens: int = 2048
    ignore_index: int | None = 255
    shift: bool = True
    shift_images: int = 4
    layer: str = "final"
    seed: int = 0

    def validate(self) -> AutoSettings:
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown:
            raise PosvitError(f"unknown candidate family '{unknown[0]}': use {', '.join(FAMILIES)}")
        if not (self.max_loss >= 0):
            raise PosvitError(f"--max-loss must be 0 or more, got {self.max_loss}")
        if not (0.0 < self.holdout_fraction < 1.0):
            raise PosvitError(f"the held-out fraction must be in (0, 1), got {self.holdout_fraction}")
        return self

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Candidate:
    """One fitted head. ``head`` is None for ``none``; ``rank`` orders candidates by simplicity."""

    name: str
    family: str
    params: dict
    head: object | None
    rank: tuple
    scores: dict = dataclasses.field(default_factory=dict)


class StoreView:
    """The images ``indices`` of a store as a store of their own (re-indexed 0..n−1); other attributes pass
    through. Lets the fitting functions that take a store (:func:`store_means`, ``probe_store``,
    :func:`load_token_cache`) see the fit images only, without copying them."""

    def __init__(self, store, indices):
        self._store = store
        self._map = [int(i) for i in indices]
        self._records = [dataclasses.replace(store.record(i), index=j) for j, i in enumerate(self._map)]

    def __getattr__(self, name):
        return getattr(self._store, name)

    def __len__(self) -> int:
        return len(self._map)

    @property
    def records(self):
        return list(self._records)

    def record(self, index: int):
        return self._records[index]

    def features(self, index: int, layer=None, dtype=np.float32):
        return self._store.features(self._map[index], layer, dtype=dtype)

    def feature_rows(self, index: int, layer, start: int, stop: int, dtype=np.float32):
        return self._store.feature_rows(self._map[index], layer, start, stop, dtype=dtype)

    def prefix_tokens(self, index: int, layer=None, dtype=np.float32):
        return self._store.prefix_tokens(self._map[index], layer, dtype=dtype)

    def token_map(self, index: int, name: str):
        return self._store.token_map(self._map[index], name)


def split_images(store, fraction: float, seed: int, max_holdout: int) -> tuple[list[int], list[int]]:
    """(fit, held-out) store indices, split by image name (see the module docstring)."""
    from posvit_cli.core.measure.semantic.dataset import image_split

    n = len(store)
    if n == 0:
        raise PosvitError(f"'{store.source}' holds no images")
    if n == 1:
        return [0], [0]
    fit, held = image_split([r.name for r in store.records], fraction, seed, salt=17)
    if len(held) > max_holdout:
        keep = np.random.default_rng([int(seed), 19]).permutation(len(held))[:max_holdout]
        fit = sorted(fit + [held[j] for j in range(len(held)) if j not in set(keep.tolist())])
        held = sorted(held[j] for j in keep)
    return fit, held


# --------------------------------------------------------------------------------------------------------------
# Fitting


def rebuild_encoder(store, seed: int = 0) -> tuple[object | None, str | None]:
    """The encoder named by the store's provenance (on the CPU), or ``(None, why)`` when it cannot be rebuilt."""
    from posvit_cli.core.features.rebuild import encoder_from_provenance

    try:
        return encoder_from_provenance(store.provenance, store.source, seed=seed), None
    except Exception as exc:  # no model named, weights not available offline, ...: what needs it is skipped
        return None, str(exc)


def _svd_basis(store, settings: AutoSettings, notes: list, rebuilt=None):
    """Rows ``(k, C)`` of the constant-image subspace of the store's encoder, or None (and a note) without it."""
    import warnings

    from posvit_cli.core.debias.report import encoder_input_size
    from posvit_cli.core.debias.svd import constant_image_subspace, svd_image_size

    encoder, why = rebuilt or rebuild_encoder(store, settings.seed)
    if encoder is None:
        notes.append(f"svd skipped: the encoder cannot be rebuilt from the store's provenance ({why})")
        return None, {}
    if store.channels and encoder.embed_dim != store.channels:
        notes.append(f"svd skipped: the rebuilt encoder has {encoder.embed_dim} channels, the store {store.channels}")
        return None, {}
    hw = svd_image_size("auto", encoder.patch_size, encoder_input_size(store))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer directions than asked: the ranks beyond are simply not fitted
        basis, facts = constant_image_subspace(encoder, hw, max(settings.svd_ranks))
    return basis, facts


def _as_pairs(rows: np.ndarray) -> np.ndarray:
    """Rows ``(k, C)`` as planes ``(ceil(k/2), 2, C)`` (a zero row pads an odd ``k``; zero rows add no direction)."""
    k, C = rows.shape
    padded = np.zeros((k + k % 2, C), dtype=np.float32)
    padded[:k] = rows
    return padded.reshape(-1, 2, C)


def _rasa_planes(view, settings: AutoSettings, progress) -> tuple[np.ndarray, dict]:
    """Planes ``(T, 2, C)`` of one RASA fit of ``max(rasa_rounds)`` rounds on the fit images' tokens."""
    import warnings

    from posvit_cli.core.debias.rasa import RasaConfig, load_token_cache, train_rasa

    cache = load_token_cache(view, layer=settings.layer, max_tokens=settings.rasa_max_tokens, seed=settings.seed,
                             progress=progress)
    # About 8 steps an epoch whatever the store's size, so that small stores still train every plane.
    config = RasaConfig(rounds=max(settings.rasa_rounds), epochs=settings.rasa_epochs, lr=settings.rasa_lr,
                        batch_images=max(1, len(view) // 8), seed=settings.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train_rasa(cache, config, progress=progress)
    return result.planes, {"training": config.as_dict(), "tokens": result.tokens,
                           "rounds": [r.as_dict() for r in result.rounds]}


def _fit_simple(view, settings: AutoSettings, progress) -> list[Candidate]:
    """``posmean`` and ``blank-k`` candidates (one pass for the means, one probe for the channels)."""
    from posvit_cli.core.debias.blank import store_positional_channels
    from posvit_cli.core.debias.heads import BlankHead, PosMeanHead
    from posvit_cli.core.debias.posmean import reference_grid, store_means
    from posvit_cli.core.measure.probe import positional_channels

    out = []
    if not {"posmean", "blank"} & set(settings.families):
        return out
    means = store_means(view, reference_grid(view) if "posmean" in settings.families else None, progress=progress)
    if "posmean" in settings.families:
        field = means["field"] - means["field"].mean(axis=(0, 1))
        out.append(Candidate("posmean", "posmean", {}, PosMeanHead(field), (2, 0)))
    if "blank" in settings.families:
        _, result = store_positional_channels(view, max(settings.blank_ks), seed=settings.seed, progress=progress)
        for k in sorted(settings.blank_ks):
            chans = positional_channels(result, k=k)
            head = BlankHead(chans, view.channels, info={"fill": "mean", "channel_source": f"top {k} per ramp"},
                             fill_values=means["channel_mean"][chans])
            out.append(Candidate(f"blank-{k}", "blank", {"top_k": k, "channels": list(chans)}, head, (1, k)))
    return out


def fit_candidates(store, fit: list[int], settings: AutoSettings, *, rebuilt: tuple | None = None,
                   progress: ProgressCallback | None = None) -> tuple[list[Candidate], list[str], dict]:
    """Fit every candidate of ``settings.families`` on the images ``fit`` of ``store``.

    ``rebuilt``: ``(encoder or None, why)`` of :func:`rebuild_encoder` when the caller rebuilt it already (else it
    is rebuilt here when an svd family needs it).

    Returns
    -------
    candidates : list of Candidate
        ``none`` first.
    notes : list of str
        Families skipped and why.
    facts : dict
        ``svd`` (the subspace's facts) and ``rasa`` (training settings and round logs).
    """
    from posvit_cli.core.debias.heads import ProjectionHead

    progress = report(progress)
    view = StoreView(store, fit)
    fams = set(settings.families)
    cands = [Candidate("none", "none", {}, None, (0, 0))]
    notes: list[str] = []
    facts: dict = {}
    cands += _fit_simple(view, settings, progress)
    basis = None
    if fams & {"svd", "svd+rasa"}:
        basis, facts["svd"] = _svd_basis(store, settings, notes, rebuilt)
    if basis is not None and "svd" in fams:
        for k in sorted(settings.svd_ranks):
            if k <= basis.shape[0]:
                cands.append(Candidate(f"svd-{k}", "svd", {"rank": k},
                                       ProjectionHead(basis[None, :k], method="svd", exact=True), (3, k)))
    planes = None
    if fams & {"rasa", "svd+rasa"}:
        planes, facts["rasa"] = _rasa_planes(view, settings, progress)
    if planes is not None and "rasa" in fams:
        for r in sorted(settings.rasa_rounds):
            cands.append(Candidate(f"rasa-{r}", "rasa", {"rounds": r},
                                   ProjectionHead(planes[:r], method="rasa", exact=False), (4, r)))
    if planes is not None and basis is not None and "svd+rasa" in fams:
        for k, r in settings.combos:
            if k <= basis.shape[0] and r <= planes.shape[0]:
                both = np.concatenate([_as_pairs(basis[:k]), planes[:r]])
                cands.append(Candidate(f"svd-{k}+rasa-{r}", "svd+rasa", {"rank": k, "rounds": r},
                                       ProjectionHead(both, method="rasa", exact=True), (5, k + 2 * r)))
    elif "svd+rasa" in fams and basis is None:
        notes.append("svd+rasa skipped: no svd subspace")
    return cands, notes, facts


# --------------------------------------------------------------------------------------------------------------
# Choosing


def choose(rows: list[dict], settings: AutoSettings) -> tuple[str, str]:
    """The chosen candidate's name and the rule, in words, that chose it (see the module docstring).

    Parameters
    ----------
    rows : list of dict
        One per candidate: ``name``, ``rank`` (simplicity), ``xy``, ``null``, ``kept``; ``none`` among them.

    Raises
    ------
    PosvitError
        With ``max_r2``, when no candidate reaches it.
    """
    tie = settings.tie
    by_name = {r["name"]: r for r in rows}
    simplest = lambda rs: min(rs, key=lambda r: tuple(r["rank"]))  # noqa: E731
    positional, what = positional_score(rows)
    if settings.max_r2 is not None:
        ok = [r for r in rows if positional(r) <= settings.max_r2]
        if not ok:
            best = min(rows, key=positional)
            raise PosvitError(f"no candidate reaches {what} <= {settings.max_r2:g} (lowest: {best['name']} "
                              f"{positional(best):.3f}): raise --max-r2, or drop it to use --max-loss")
        top = max(r["kept"] for r in ok)
        pick = simplest([r for r in ok if r["kept"] >= top - tie])
        return pick["name"], (f"most kept among candidates with {what} <= {settings.max_r2:g} "
                              f"(ties within {tie:g}: the simplest)")
    floor = by_name["none"]["kept"] - settings.max_loss
    ok = [r for r in rows if r["kept"] >= floor - 1e-12]
    low = min(positional(r) for r in ok)
    pick = simplest([r for r in ok if positional(r) <= low + tie])
    return pick["name"], (f"least positional ({what}; ties within {tie:g}: the simplest) among "
                          f"candidates keeping >= kept(none) - {settings.max_loss:g} = {floor:.3f}")


def positional_score(rows: list[dict]):
    """The positional score the rule ranks by, and its name: the held-out xy R² across images, 0 when below (two
    or more held-out images), else the within-image probe's xy R² floored at the raw features' null."""
    if all(r.get("xy_across") is not None for r in rows):
        return (lambda r: max(0.0, r["xy_across"])), "xy R2 across held-out images (0 if below)"
    floor_r2 = next(r["null"] for r in rows if r["name"] == "none")
    return (lambda r: max(floor_r2, r["xy"])), f"held-out xy R2 (floored at the raw null {floor_r2:.3f})"


# --------------------------------------------------------------------------------------------------------------
# The run


def _score(cands: list[Candidate], held, sample, pairs, settings: AutoSettings, progress) -> list[dict]:
    """Score every candidate on the held-out windows (and crop-shift ``pairs``); one row per candidate."""
    raw_nn = raw_neighbours(held, k=settings.knn_k, queries=settings.knn_queries, seed=settings.seed)
    rows = []
    for n, c in enumerate(cands):
        t0 = time.perf_counter()
        cleaned = [apply_window(c.head, f, g, o) for f, g, o in zip(held.windows, held.grids, held.origins)]
        pos = positional_scores(cleaned, seed=settings.seed)
        row = {"name": c.name, "family": c.family, "params": c.params, "rank": list(c.rank),
               "xy": pos["xy"], "null": pos["null"], "above_null": pos["xy"] - pos["null"],
               "xy_across": across_images_r2(cleaned, held.grids, held.origins, frames=held.frames,
                                             seed=settings.seed)}
        row["knn_agreement"] = neighbour_agreement(cleaned, raw_nn)
        row["cluster_stability"] = cluster_stability(cleaned, k=settings.kmeans_k, tokens=settings.kmeans_tokens,
                                                     seed=settings.seed)
        if sample is not None:
            row["miou"] = semantic_miou(c.head, sample, cleaned)
        row["kept"] = row["miou"] if sample is not None else row["knn_agreement"]
        row.update(shift_scores(c.head, pairs))
        row["seconds"] = round(time.perf_counter() - t0, 3)
        rows.append(row)
        progress("score candidates", n + 1, len(cands))
    return rows


def _shift_pairs(store, held_idx: list, rebuilt, layer: str, settings: AutoSettings):
    """The encoded crop-shift views of the held-out images, or ``(None, [why])``."""
    encoder, why = rebuilt
    reason = shift_unavailable(store, encoder, why)
    if reason:
        return None, [f"content/grid match skipped: {reason}"]
    (name,) = encoder.layer_names([layer])
    return shift_pairs(store, held_idx, encoder, layer=name, max_images=settings.shift_images)


def run_auto(store, settings: AutoSettings, *, masks=None,
             progress: ProgressCallback | None = None) -> tuple[object | None, dict]:
    """Fit, score and choose (see the module docstring).

    Parameters
    ----------
    store : FeatureStore
        Holding ``settings.layer`` tokens.
    settings : AutoSettings
    masks : str or path-like, optional
        Folder of class masks matched to the images by stem: the kept score becomes the ridge-probe mIoU.
    progress : callable, optional

    Returns
    -------
    head : Head or None
        The chosen head (None when ``none`` is chosen).
    table : dict
        JSON-ready: ``split``, ``kept_metric``, ``rule``, ``chosen``, ``rows`` (one per candidate; ``shift_content``
        and ``shift_absolute`` None where the crop-shift probe could not run), ``notes``, ``fit`` (svd and RASA
        facts; ``shift``: the images and views of the crop-shift probe, or None), ``settings``, ``seconds``.
    """
    progress = report(progress)
    settings.validate()
    t0 = time.perf_counter()
    layer = store.check_layer(settings.layer)
    fit, held_idx = split_images(store, settings.holdout_fraction, settings.seed, settings.max_holdout)
    rebuilt = None
    if settings.shift or {"svd", "svd+rasa"} & set(settings.families):
        rebuilt = rebuild_encoder(store, settings.seed)
    cands, notes, facts = fit_candidates(store, fit, settings, rebuilt=rebuilt, progress=progress)
    held = load_held_out(store, held_idx, layer=layer, window=settings.window)
    pairs = None
    if settings.shift:
        t_shift = time.perf_counter()
        pairs, shift_notes = _shift_pairs(store, held_idx, rebuilt, layer, settings)
        notes += shift_notes
        facts["shift"] = {**pairs.facts(), "encode_seconds": round(time.perf_counter() - t_shift, 3)} if pairs else None
    sample = None
    if masks is not None:
        sample = labelled_sample(store, masks, fit, held, layer=layer, ignore_index=settings.ignore_index,
                                 seed=settings.seed)
    rows = _score(cands, held, sample, pairs, settings, progress)
    chosen, rule = choose(rows, settings)
    for r in rows:
        r["chosen"] = r["name"] == chosen
    if fit == held_idx:
        notes.append("one image: candidates were fitted and scored on the same image")
    head = next(c.head for c in cands if c.name == chosen)
    table = {
        "store": store.source, "images": len(store), "layer": layer,
        "split": {"fit": [store.record(i).name for i in fit], "held_out": held.names, "window": settings.window},
        "kept_metric": "miou" if sample is not None else "knn_agreement",
        "rule": rule, "chosen": chosen, "rows": rows, "notes": notes, "fit": facts,
        "settings": settings.as_dict(), "seconds": round(time.perf_counter() - t0, 3),
    }
    return head, table
