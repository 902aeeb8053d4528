"""What makes two sets of features "the same": the provenance keys that identify features, and one check of them.

Every store records in its provenance how its features were made (``docs/feature-store.md``). Whenever posvit
combines features from two places (merging shards, resuming a store, scoring a validation store with a head
trained on another, applying a trained segmenter, drawing a saved probe result over a store) it compares the
same list, :data:`IDENTITY_KEYS`, through :func:`identity_differences`. Each caller names the keys that may
differ for its purpose (a validation store may be stored as float32 when the training store is float16); it
never keeps a key list of its own.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

__all__ = [
    "IDENTITY_KEYS",
    "INPUT_KEYS",
    "NETWORK_KEYS",
    "PREPROCESSING_KEYS",
    "STORAGE_KEYS",
    "debias_signature",
    "feature_identity",
    "identity_differences",
]

#: Which network made the features.
NETWORK_KEYS = ("model", "weights_sha256", "modifications", "patch_size", "channels")
#: How the images were fed to it.
INPUT_KEYS = ("preprocessing", "tiling", "transform")
#: How the tokens were stored (not what they are): combining stores needs these equal, scoring does not.
STORAGE_KEYS = ("layers", "dtype", "prefix_tokens")
#: The one list of provenance keys that identify features: network, debiasing applied, input, storage.
IDENTITY_KEYS = NETWORK_KEYS + ("debias",) + INPUT_KEYS + STORAGE_KEYS
#: The entries of ``preprocessing`` that change the features (its other entries, if any, are descriptive).
PREPROCESSING_KEYS = ("size", "interpolation", "intensity", "mean", "std", "in_chans")


def debias_signature(debias: Any) -> list:
    """The parts of a provenance ``debias`` list that change the features (method, head checksum, channels
    zeroed, transforms averaged), without the descriptive ones (the store a head was applied to, timings)."""
    out: list = []
    for d in debias or []:
        if isinstance(d, Mapping):
            out.append((d.get("method"), d.get("head_sha256"), d.get("channels_zeroed"),
                        tuple(d.get("transforms") or ())))
        else:
            out.append(str(d))
    return out


def feature_identity(provenance: Mapping[str, Any]) -> dict:
    """The entries of ``provenance`` named in :data:`IDENTITY_KEYS` (those present), as a plain dict."""
    return {k: provenance[k] for k in IDENTITY_KEYS if k in provenance}


def _same(key: str, a: Any, b: Any) -> bool:
    if key == "debias":
        return debias_signature(a) == debias_signature(b)
    # An absent entry, None, 0, "" and an empty list all mean "none" (older stores wrote some as null).
    return (a or None) == (b or None)


def identity_differences(
    a: Mapping[str, Any],
    b: Mapping[str, Any],
    *,
    ignore: Collection[str] = (),
    missing_ok: bool = False,
) -> list[str]:
    """The identity keys whose values differ between two provenances, in :data:`IDENTITY_KEYS` order.

    Parameters
    ----------
    a, b : mapping
        Store provenances (or feature identities saved with a trained model, or a probe result's store entry).
    ignore : collection of str
        Keys of :data:`IDENTITY_KEYS` that may differ for the caller's purpose (``STORAGE_KEYS`` when only
        the features' meaning matters). ``"preprocessing"`` ignores all of its entries.
    missing_ok : bool
        Skip a key absent from either mapping (documents written before posvit recorded it), instead of
        counting absent against present.

    Returns
    -------
    list of str
        Differing keys; a preprocessing entry is named ``"preprocessing.size"`` and the like. Empty when the
        features were made the same way.

    Raises
    ------
    ValueError
        If ``ignore`` names a key that is not an identity key (a typo would silently compare everything).
    """
    unknown = set(ignore) - set(IDENTITY_KEYS)
    if unknown:
        raise ValueError(f"not identity keys: {sorted(unknown)} (known: {', '.join(IDENTITY_KEYS)})")
    out: list[str] = []
    for key in IDENTITY_KEYS:
        if key in ignore or (missing_ok and (key not in a or key not in b)):
            continue
        if key == "preprocessing":
            pa, pb = a.get(key) or {}, b.get(key) or {}
            out += [f"preprocessing.{k}" for k in PREPROCESSING_KEYS
                    if not (missing_ok and (k not in pa or k not in pb)) and not _same(k, pa.get(k), pb.get(k))]
        elif not _same(key, a.get(key), b.get(key)):
            out.append(key)
    return out
