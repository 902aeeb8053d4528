"""What a positional probe fits: the targets (ramps on the token grid), the settings of a protocol and the
sampling masks of one image.

Pure NumPy, no torch: :func:`make_settings` and :func:`sampling_plan` are cheap enough to call before any
feature is read, so a bad setting or a grid too small for the sampling fails at once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from posvit_cli.core.errors import PosvitError

__all__ = [
    "ALL_TARGETS",
    "CONTROL_TARGETS",
    "POSITIONAL_RAMPS",
    "PROBE_SCHEMA",
    "PROBE_SCHEMA_VERSION",
    "PROTOCOLS",
    "RAMP_TARGETS",
    "REGRESSORS",
    "SAMPLINGS",
    "TARGET_COLUMNS",
    "TARGET_MATRIX_COLUMNS",
    "ProbeSettings",
    "SamplingPlan",
    "check_targets",
    "make_settings",
    "ramp_targets",
    "sampling_plan",
]

#: Ramp targets in the order reports list them; ``xy`` is the joint 2-output (x, y) target.
RAMP_TARGETS = ("lr", "ud", "diag", "radial", "xy")
#: Targets that carry no position (``random``) or an artificial one (``raster``): the nulls of a report.
CONTROL_TARGETS = ("random", "raster")
#: Single-output ramps whose top channels define "the most positional channels".
POSITIONAL_RAMPS = ("lr", "ud", "diag", "radial")
ALL_TARGETS = RAMP_TARGETS + CONTROL_TARGETS
SAMPLINGS = ("random", "grid", "grid-holdout")
PROTOCOLS = ("holdout", "dino-saw")
REGRESSORS = ("ridge", "ols")
PROBE_SCHEMA = "posvit-probe-result"
PROBE_SCHEMA_VERSION = 1

# Columns of the per-mask target matrix; ``xy`` is the pair (lr, ud) fitted on its own mask.
TARGET_MATRIX_COLUMNS = ("lr", "ud", "diag", "radial", "random", "raster")
TARGET_COLUMNS = {
    "lr": (0,), "ud": (1,), "diag": (2,), "radial": (3,), "xy": (0, 1), "random": (4,), "raster": (5,),
}
# The published setting ("What DINO saw", Table 1): step-6 random masks, ridge alpha 1, 6 repeats, numpy seed.
_DINO_SAW = {"sampling": "random", "fraction": 1 / 36, "step": 6, "repeats": 6, "alpha": 1.0, "regressor": "ridge",
             "seed": 100001}
_DEFAULT_CUTOFF = {"random": 1.0, "grid": 1.0, "grid-holdout": 0.7}


# --------------------------------------------------------------------------------------------------------------
# Targets


def ramp_targets(h: int, w: int, names=RAMP_TARGETS, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """Positional targets on an ``h × w`` token grid, each in [0, 1].

    Parameters
    ----------
    h, w : int
        Grid rows and columns (each ≥ 2 along at least one axis).
    names : sequence of str
        ``lr`` = x/(w−1), ``ud`` = y/(h−1), ``diag`` = mean of per-axis ``linspace(0, 1, max(h, w))`` ramps
        (so below 1 at the far corner of non-square grids), ``radial`` = 1 − ρ/ρmax with ρ the distance to
        ``(h//2, w//2)``, ``xy`` = ``lr`` and ``ud`` stacked (shape ``(h, w, 2)``), ``random`` = U(0, 1) noise,
        ``raster`` = row-major index / (h·w).
    rng : numpy Generator, optional
        Source of the ``random`` target.

    Returns
    -------
    dict of str to ndarray, shape (h, w) or (h, w, 2) for ``xy``

    Raises
    ------
    PosvitError
        For a 1×1 grid or an unknown target name.
    """
    if h * w < 2:
        raise PosvitError(f"a {h}×{w} token grid has no positions to probe (need at least 2 tokens)")
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    lr = xs / (w - 1) if w > 1 else np.zeros_like(xs)
    ud = ys / (h - 1) if h > 1 else np.zeros_like(ys)
    out: dict[str, np.ndarray] = {}
    for name in names:
        if name == "lr":
            out[name] = lr
        elif name == "ud":
            out[name] = ud
        elif name == "diag":
            a = np.linspace(0.0, 1.0, max(h, w))
            out[name] = (a[:h][:, None] + a[:w][None, :]) / 2.0
        elif name == "radial":
            rho = np.hypot(ys - h // 2, xs - w // 2)
            out[name] = 1.0 - rho / rho.max()
        elif name == "xy":
            out[name] = np.stack([lr, ud], axis=-1)
        elif name == "random":
            out[name] = (rng or np.random.default_rng(0)).random((h, w))
        elif name == "raster":
            out[name] = np.arange(h * w, dtype=np.float64).reshape(h, w) / (h * w)
        else:
            raise PosvitError(f"unknown target '{name}': use {', '.join(ALL_TARGETS)}")
    return out


def check_targets(targets: Iterable[str]) -> tuple[str, ...]:
    """Validate target names (order kept, duplicates dropped).

    Raises
    ------
    PosvitError
        For an unknown name or an empty list.
    """
    out: list[str] = []
    for t in targets:
        t = str(t).strip()
        if t not in TARGET_COLUMNS:
            raise PosvitError(f"unknown target '{t}': use {', '.join(ALL_TARGETS)}")
        if t not in out:
            out.append(t)
    if not out:
        raise PosvitError(f"no targets to probe: name some of {', '.join(ALL_TARGETS)}")
    return tuple(out)


# --------------------------------------------------------------------------------------------------------------
# Settings


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
    """How to probe. Build with :func:`make_settings` to get a protocol's defaults and validation.

    Attributes
    ----------
    targets : tuple of str
        Targets to score (see :func:`ramp_targets`).
    protocol : {"holdout", "dino-saw"}
        ``holdout``: R² on tokens not used for training; one sampling mask per repeat shared by all targets (a
        centred box for ``radial`` when ``cutoff < 1``). ``dino-saw``: the published setting: R² over *all* tokens
        (training tokens included), an independent mask per target and repeat, grid masks at offset 0.
    sampling : {"random", "grid", "grid-holdout"}
        ``random``: ⌊area · fraction⌋ tokens of the sampling region, uniformly without replacement. ``grid``:
        every ``step``-th row and column of the region (random offset per repeat under ``holdout``, offset 0
        under ``dino-saw``). ``grid-holdout``: ``grid`` inside the top-left ``cutoff`` box (a centred box for
        ``radial``); under ``holdout`` R² is measured on the tokens outside the box (extrapolation).
    fraction : float
        Fraction of the region's tokens used for training by ``random`` sampling (1/36 as published).
    step : int
        Grid spacing in tokens for ``grid`` and ``grid-holdout``.
    cutoff : float
        Side fraction of the sampling region (1 = whole grid).
    repeats : int
        Fresh sampling masks per image.
    alpha : float
        Ridge strength on per-channel standardised features (ignored by ``ols``).
    regressor : {"ridge", "ols"}
    seed : int
        Masks and the ``random`` target of image ``i`` come from ``numpy.random.default_rng([seed, i])``.
    per_channel : bool
        Also score each channel alone.
    top_k : int
        Channels kept per ramp as "most positional".
    extras : bool
        Also measure the 2-D coordinate RMSE and the token-index classifier accuracy.
    """

    targets: tuple[str, ...] = ALL_TARGETS
    protocol: str = "holdout"
    sampling: str = "random"
    fraction: float = 1 / 36
    step: int = 6
    cutoff: float = 1.0
    repeats: int = 6
    alpha: float = 1.0
    regressor: str = "ridge"
    seed: int = 0
    per_channel: bool = True
    top_k: int = 2
    extras: bool = True

    def validated(self) -> ProbeSettings:
        """Return self after checking every field (raises :class:`PosvitError` naming the bad option)."""
        check_targets(self.targets)
        if self.protocol not in PROTOCOLS:
            raise PosvitError(f"unknown protocol '{self.protocol}': use {' or '.join(PROTOCOLS)}")
        if self.sampling not in SAMPLINGS:
            raise PosvitError(f"unknown sampling '{self.sampling}': use {', '.join(SAMPLINGS)}")
        if self.regressor not in REGRESSORS:
            raise PosvitError(f"unknown regressor '{self.regressor}': use {' or '.join(REGRESSORS)}")
        if not (0.0 < self.fraction < 1.0):
            raise PosvitError(f"--fraction must be between 0 and 1 (exclusive), got {self.fraction}")
        if self.step < 1:
            raise PosvitError(f"--step must be at least 1, got {self.step}")
        if not (0.0 < self.cutoff <= 1.0):
            raise PosvitError(f"--cutoff must be in (0, 1], got {self.cutoff}")
        if self.sampling == "grid-holdout" and self.cutoff >= 1.0 and self.protocol == "holdout":
            raise PosvitError("grid-holdout needs --cutoff below 1: the tokens outside the box are the test set")
        if self.repeats < 1:
            raise PosvitError(f"--repeats must be at least 1, got {self.repeats}")
        if self.regressor == "ridge" and not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise PosvitError(f"ridge needs --alpha > 0, got {self.alpha} (use --regressor ols for no penalty)")
        if self.top_k < 1:
            raise PosvitError(f"--top-k must be at least 1, got {self.top_k}")
        return self

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        d["evaluated_on"] = "all tokens" if self.protocol == "dino-saw" else (
            "tokens outside the sampling box" if self.sampling == "grid-holdout" else "held-out tokens"
        )
        d["standardisation"] = "per image and fit, each channel z-scored on its training tokens"
        d["masks"] = "one per target and repeat" if self.protocol == "dino-saw" else "one per repeat, shared by targets"
        return d


def make_settings(protocol: str = "holdout", **overrides: Any) -> tuple[ProbeSettings, list[str]]:
    """Settings of a protocol, with explicit overrides (``None`` values mean "the protocol's default").

    Parameters
    ----------
    protocol : {"holdout", "dino-saw"}
    **overrides
        Any :class:`ProbeSettings` field.

    Returns
    -------
    settings : ProbeSettings
        Validated.
    deviations : list of str
        For ``dino-saw``: the overrides that depart from the published setting (empty when faithful).
    """
    if protocol not in PROTOCOLS:
        raise PosvitError(f"unknown protocol '{protocol}': use {' or '.join(PROTOCOLS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(given) - {f.name for f in dataclasses.fields(ProbeSettings)}
    if unknown:
        raise TypeError(f"unknown probe settings {sorted(unknown)}")
    base: dict[str, Any] = dict(_DINO_SAW) if protocol == "dino-saw" else {}
    deviations = []
    if protocol == "dino-saw":
        for k, v in given.items():
            if k in _DINO_SAW and k not in ("sampling", "seed") and v != _DINO_SAW[k]:
                deviations.append(f"{k}={v} (published: {_DINO_SAW[k]:.6g})" if isinstance(v, float)
                                  else f"{k}={v} (published: {_DINO_SAW[k]})")
    base.update(given)
    if protocol == "dino-saw" and "step" in given and "fraction" not in given:
        # The published random masks draw ⌊area / step²⌋ tokens: the step sets the fraction.
        base["fraction"] = 1.0 / float(given["step"]) ** 2
    if "targets" in base:
        base["targets"] = check_targets(base["targets"])
    if "cutoff" not in base:
        base["cutoff"] = _DEFAULT_CUTOFF.get(base.get("sampling", "random"), 1.0)
    elif protocol == "dino-saw":
        published = _DEFAULT_CUTOFF.get(base.get("sampling", "random"))
        if published is not None and base["cutoff"] != published:
            deviations.append(f"cutoff={base['cutoff']} (published: {published})")
    return ProbeSettings(protocol=protocol, **base).validated(), deviations


# --------------------------------------------------------------------------------------------------------------
# Sampling masks


@dataclasses.dataclass
class SamplingPlan:
    """The fits of one image: training and evaluation masks and which targets each mask serves.

    Attributes
    ----------
    grid : (h, w)
    train : ndarray of bool, shape (M, h·w)
        Training tokens of each mask (row-major token order).
    evaluate : ndarray of bool, shape (M, h·w)
        Tokens on which R² is measured.
    mask_of : dict of str to ndarray of int, shape (repeats,)
        For every target (and ``"xy"``, always present for the coordinate RMSE), the mask index of each repeat.
    targets : ndarray of float64, shape (M, h·w, 6)
        Columns ``lr, ud, diag, radial, random, raster`` for each mask (``random`` is drawn per mask).
    """

    grid: tuple[int, int]
    train: np.ndarray
    evaluate: np.ndarray
    mask_of: dict[str, np.ndarray]
    targets: np.ndarray


def _region(h: int, w: int, cutoff: float, centred: bool) -> tuple[int, int, int, int]:
    rh, rw = int(h * cutoff), int(w * cutoff)
    if centred:  # the published radial region: a centred box of the same side fraction
        y0, y1 = math.ceil((h - rh) / 2), math.floor((h + rh) / 2)
        x0, x1 = math.ceil((w - rw) / 2), math.floor((w + rw) / 2)
        return y0, y1, x0, x1
    return 0, rh, 0, rw


def _one_mask(h, w, settings: ProbeSettings, rng: np.random.Generator, centred: bool):
    y0, y1, x0, x1 = _region(h, w, settings.cutoff, centred)
    region = np.zeros((h, w), bool)
    region[y0:y1, x0:x1] = True
    train = np.zeros((h, w), bool)
    rh, rw = y1 - y0, x1 - x0
    if settings.sampling == "random":
        area = rh * rw
        # The small epsilon keeps area·(1/36) = k − 1e-16 from flooring to k − 1 when area = 36k.
        n = int(math.floor(area * settings.fraction + 1e-9))
        if n >= 1:
            flat = np.zeros(area, bool)
            flat[rng.choice(area, size=n, replace=False)] = True
            train[y0:y1, x0:x1] = flat.reshape(rh, rw)
    else:
        s = settings.step
        if settings.protocol == "dino-saw":
            oy = ox = 0
        else:  # a fresh offset per repeat so that repeats of a grid probe differ
            oy, ox = int(rng.integers(min(s, max(rh, 1)))), int(rng.integers(min(s, max(rw, 1))))
        train[y0 + oy:y1:s, x0 + ox:x1:s] = True
    if settings.protocol == "dino-saw":
        evaluate = np.ones((h, w), bool)
    elif settings.sampling == "grid-holdout":
        evaluate = ~region
    else:
        evaluate = ~train
    return train.ravel(), evaluate.ravel()


def sampling_plan(grid: tuple[int, int], settings: ProbeSettings, rng: np.random.Generator) -> SamplingPlan:
    """Draw the masks and the ``random`` targets of one image.

    Parameters
    ----------
    grid : (h, w)
        Token grid.
    settings : ProbeSettings
    rng : numpy Generator
        Consumed in a fixed order (repeat by repeat, then target by target), so a seed fixes every number.

    Returns
    -------
    SamplingPlan

    Raises
    ------
    PosvitError
        When a mask holds fewer than 2 training tokens or fewer than 2 evaluation tokens.
    """
    h, w = int(grid[0]), int(grid[1])
    if h * w < 2:
        raise PosvitError(f"a {h}×{w} token grid has no positions to probe (need at least 2 tokens)")
    roles = list(settings.targets)
    if "xy" not in roles:
        roles.append("xy")  # the coordinate RMSE comes from the xy fit
    trains, evals = [], []
    mask_of: dict[str, list[int]] = {t: [] for t in roles}
    shared_centred = settings.cutoff < 1.0
    for _ in range(settings.repeats):
        if settings.protocol == "dino-saw":
            for t in roles:
                tr, ev = _one_mask(h, w, settings, rng, centred=(t == "radial"))
                mask_of[t].append(len(trains))
                trains.append(tr)
                evals.append(ev)
        else:
            tr, ev = _one_mask(h, w, settings, rng, centred=False)
            plain = len(trains)
            trains.append(tr)
            evals.append(ev)
            centred_index = plain
            if shared_centred and "radial" in roles:
                tr, ev = _one_mask(h, w, settings, rng, centred=True)
                centred_index = len(trains)
                trains.append(tr)
                evals.append(ev)
            for t in roles:
                mask_of[t].append(centred_index if t == "radial" else plain)
    train = np.stack(trains)
    evaluate = np.stack(evals)
    n_train, n_eval = train.sum(1), evaluate.sum(1)
    if n_train.min() < 2:
        how = (f"--fraction {settings.fraction:.4g}" if settings.sampling == "random"
               else f"--step {settings.step} and --cutoff {settings.cutoff:g}")
        raise PosvitError(
            f"a {h}×{w} token grid gives {int(n_train.min())} training token(s) with {how}: "
            "raise --fraction (or lower --step, raise --cutoff)"
        )
    if n_eval.min() < 2:
        raise PosvitError(f"a {h}×{w} token grid leaves {int(n_eval.min())} evaluation token(s): lower --fraction or --cutoff")
    base = ramp_targets(h, w, ("lr", "ud", "diag", "radial", "raster"))
    fixed = np.stack([base[c].ravel() for c in ("lr", "ud", "diag", "radial")], axis=-1)
    raster = base["raster"].ravel()
    m = len(trains)
    noise = rng.random((m, h * w))
    targets = np.empty((m, h * w, len(TARGET_MATRIX_COLUMNS)))
    targets[:, :, :4] = fixed[None]
    targets[:, :, 4] = noise
    targets[:, :, 5] = raster[None]
    return SamplingPlan((h, w), train, evaluate, {t: np.asarray(v) for t, v in mask_of.items()}, targets)
