"""Rebuild the encoder that made a feature store from the store's provenance.

Commands that must run the same encoder again (the ``svd`` head on a store, re-extracting a segmentation model's
ViT features) read the model name, weights, modifications and seed a store records, and warn when the weights they
load differ from the recorded ones.
"""

from __future__ import annotations

import warnings

from posvit_cli.core.errors import PosvitError, PosvitWarning

__all__ = ["encoder_from_provenance", "weights_from_provenance"]


def weights_from_provenance(provenance: dict, override: str | None = None) -> str:
    """The ``weights`` argument of :func:`~posvit_cli.core.features.encoders.load_encoder` for a recorded encoder.

    Parameters
    ----------
    provenance : dict
        A store's (or model's) encoder facts; ``weights`` as recorded by ``extract``.
    override : str, optional
        The user's ``--weights``, which wins.

    Returns
    -------
    str
        ``override``, else the recorded weights, else ``pretrained``. Weights shipped with posvit are recorded as
        ``bundled:NAME`` and load again as ``pretrained``.
    """
    weights = str(override or provenance.get("weights") or "pretrained")
    return "pretrained" if weights.startswith("bundled:") else weights


def encoder_from_provenance(provenance: dict, source: str, *, device: str = "cpu", seed: int | None = None):
    """Load the encoder a store's provenance names, with its recorded weights and modifications.

    Parameters
    ----------
    provenance : dict
        The store's provenance (``model``, ``weights``, ``weights_sha256``, ``modifications``, ``seed``).
    source : str
        The store, for messages.
    device : str
    seed : int, optional
        Seed of ``random`` weights; default: the recorded seed, else 0.

    Returns
    -------
    Encoder

    Raises
    ------
    PosvitError
        When the provenance names no encoder (a synthetic store, or one written by other tools).

    Warns
    -----
    PosvitWarning
        When the loaded weights' SHA-256 differs from the recorded one (other weights under the same name).
    """
    from posvit_cli.core.features.encoders import load_encoder

    model = provenance.get("model")
    if not model or model == "synthetic":
        raise PosvitError(f"'{source}' does not name the encoder that made it: pass --model and --weights")
    if seed is None:
        seed = int(provenance.get("seed") or 0)
    encoder = load_encoder(model, weights_from_provenance(provenance), device=device, seed=seed,
                           modifications=provenance.get("modifications") or None)
    sha = provenance.get("weights_sha256")
    if sha and encoder.weights_sha256 != sha:
        warnings.warn(
            f"the encoder loaded for '{source}' ({encoder.name}, weights {encoder.weights}) differs from the one that "
            f"made it (sha256 {sha[:12]}… vs {encoder.weights_sha256[:12]}…); pass --model/--weights/--seed",
            PosvitWarning, stacklevel=2,
        )
    return encoder
