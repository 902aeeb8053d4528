"""``--blank``: which channels to zero, parsed by one rule for the ``blank`` head and the retrofit's targets.

A specification is one of

- ``auto``: the most positional channels, found by probing (the input store for the ``blank`` head, the monitor
  images for the retrofit);
- ``none`` (or empty): no channel. The retrofit then distils to the unmodified teacher; the ``blank`` head
  refuses it, since a head that zeroes nothing does nothing;
- a comma-separated list of channel indices, e.g. ``47,113,117,359``;
- a ``posvit probe`` result (``.json``): its top-``k`` channels per ramp (lr, ud, diag, radial).
"""

from __future__ import annotations

import dataclasses
import os

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.progress import ProgressCallback

__all__ = ["BlankSpec", "blank_channels", "parse_blank", "read_blank_spec", "store_positional_channels"]


@dataclasses.dataclass(frozen=True)
class BlankSpec:
    """A parsed ``--blank``.

    Attributes
    ----------
    kind : {"auto", "none", "channels", "probe"}
    channels : tuple of int
        Ascending channel indices (empty for ``auto`` and ``none``).
    width : int or None
        Channels of the features a probe result was computed on (``probe`` only, when it says).
    source : str
        Where the channels came from, in words (recorded in heads and logs).
    """

    kind: str
    channels: tuple[int, ...] = ()
    width: int | None = None
    source: str = ""


def read_blank_spec(spec: str | None, *, top_k: int = 2) -> BlankSpec:
    """Parse a ``--blank`` value (see the module docstring); a probe result is read here.

    Parameters
    ----------
    spec : str or None
        None means ``none``.
    top_k : int
        Channels taken per ramp from a probe result.

    Raises
    ------
    PosvitError
        For a negative or non-integer channel, ``top_k`` below 1, or a probe result that is missing or unreadable.
    """
    if top_k < 1:
        raise PosvitError(f"--top-k must be at least 1, got {top_k}")
    s = (spec or "").strip()
    if s.lower() == "auto":
        return BlankSpec("auto", source="auto")
    if s.lower() in ("none", ""):
        return BlankSpec("none", source="none")
    if os.path.isfile(s) or s.lower().endswith(".json"):
        from posvit_cli.core.measure.probe import positional_channels, read_probe_result

        result = read_probe_result(s)
        probed = (result.get("store") or {}).get("channels")
        chans = sorted(int(c) for c in positional_channels(result, k=top_k))
        return BlankSpec("probe", tuple(chans), int(probed) if probed else None,
                         f"probe result {s} (top {top_k} per ramp)")
    try:
        chans = sorted({int(v) for v in s.split(",") if v.strip()})
    except ValueError:
        raise PosvitError(f"--blank '{spec}': use auto, none, channel indices (47,113) or a probe result .json") from None
    if any(c < 0 for c in chans):
        raise PosvitError(f"--blank '{spec}': channel indices must be 0 or more")
    return BlankSpec("channels", tuple(chans), source=s)


def parse_blank(spec: str | None, *, top_k: int = 2) -> list[int] | str:
    """``--blank`` as the retrofit's :attr:`RetrofitConfig.blank`: ``"auto"`` or a list of channels (``none``: [])."""
    parsed = read_blank_spec(spec, top_k=top_k)
    return "auto" if parsed.kind == "auto" else list(parsed.channels)


def store_positional_channels(store, k: int = 2, *, images: int | None = None, seed: int = 0,
                              progress: ProgressCallback | None = None) -> tuple[list[int], dict]:
    """The most positional channels of a store: ``probe``'s top-``k`` channels per ramp (lr, ud, diag, radial).

    Returns
    -------
    channels : list of int
    result : dict
        The probe result document it was read from.
    """
    from posvit_cli.core.measure.probe import POSITIONAL_RAMPS, make_settings, positional_channels, probe_store

    settings, _ = make_settings("holdout", targets=POSITIONAL_RAMPS, per_channel=True, extras=False, top_k=k,
                                seed=seed)
    result = probe_store(store, settings, progress=progress)
    return positional_channels(result, k=k), result


def blank_channels(spec: str | None, *, top_k: int = 2, store=None, seed: int = 0,
                   progress: ProgressCallback | None = None) -> tuple[list[int], int | None, str]:
    """The channels the ``blank`` head zeroes.

    Parameters
    ----------
    spec : str
        A ``--blank`` value; ``auto`` probes ``store``.
    top_k : int
        Channels per ramp from a probe (``auto``) or a probe result.
    store : FeatureStore, optional
        The store the head is made for (its ``final`` tokens); needed for ``auto``.
    seed : int
        Seed of the probe's sampling.

    Returns
    -------
    channels : list of int
    width : int or None
        Feature channels the head is for (the store's, else the probe result's, else unknown).
    source : str

    Raises
    ------
    PosvitError
        For ``none``, ``auto`` without a store, or a probe result of another width than the store.
    """
    parsed = read_blank_spec(spec, top_k=top_k)
    width = store.channels if store is not None else None
    if parsed.kind == "none":
        raise PosvitError("--blank none leaves nothing to blank: give auto, a channel list or a probe result")
    if parsed.kind == "auto":
        if store is None:
            raise PosvitError("--blank auto probes the input store: give a feature store, a channel list "
                              "(--blank 47,113) or a probe result (--blank probe.json)")
        channels, _ = store_positional_channels(store, top_k, seed=seed, progress=progress)
        return list(channels), width, f"auto: top {top_k} per ramp of `posvit probe` on {store.source}"
    if parsed.kind == "probe":
        if width is not None and parsed.width and parsed.width != width:
            raise PosvitError(f"probe result '{spec}' is of {parsed.width}-channel features; "
                              f"'{store.source}' has {width}")
        width = width or parsed.width
    return list(parsed.channels), width, parsed.source
