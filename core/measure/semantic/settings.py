"""Settings of the semantic probe: the head, the resolution at which masks and predictions meet, the
optimiser and the splits, validated once (:meth:`SemanticSettings.validated`)."""

from __future__ import annotations

import dataclasses
import math

from posvit_cli.core.errors import PosvitError

__all__ = ["HEADS", "MIN_STEPS_PER_EPOCH", "RESOLUTIONS", "SEMANTIC_SCHEMA", "SEMANTIC_SCHEMA_VERSION", "SemanticSettings"]

SEMANTIC_SCHEMA = "posvit-semantic-probe-result"
#: Fewest optimiser steps per epoch of the linear head (small training sets get smaller batches).
MIN_STEPS_PER_EPOCH = 20
SEMANTIC_SCHEMA_VERSION = 1
HEADS = ("linear", "ridge")
RESOLUTIONS = ("tokens", "pixels")


@dataclasses.dataclass(frozen=True)
class SemanticSettings:
    """How to train and score the semantic probe.

    Attributes
    ----------
    head : {"linear", "ridge"}
        See the module docstring.
    resolution : {"tokens", "pixels"}
        Where masks and predictions meet (see the module docstring).
    epochs : int
        Most epochs of the linear head (50, as published).
    patience : int
        Stop after this many epochs without a lower early-stopping loss (0: no early stopping, train
        ``epochs`` epochs on all training images and keep the last).
    lr, weight_decay : float
        AdamW settings (1e-3 as published; 0.01 is torch's default decay).
    batch_size : int
        Tokens (or pixels) per optimiser step; smaller when the training set is under ``20 × batch_size``, so
        that every epoch takes at least :data:`MIN_STEPS_PER_EPOCH` steps.
    dropout : float
        Dropout on the normalised channels. Off by default: the published head drops whole channel maps of an
        image (``Dropout2d(0.1)``), a regulariser a head of ``C × K`` weights trained on up to a million tokens
        does not need, and per-token dropout doubled the cost of a training step here.
    batchnorm : bool
        Batch norm before the linear layer (published for VOC; off for their ADE20K head).
    alpha : float
        Ridge strength on standardised features (``ridge`` head).
    holdout_fraction : float
        Fraction of the training images that decide early stopping (at least one image).
    test_fraction : float
        Fraction of the images held out and scored when no validation store is given (at least one image).
    max_train_tokens : int
        Most training samples held in memory (float16: ``max_train_tokens × C × 2`` bytes); above it every
        image contributes the same fraction of its labelled tokens.
    pixels_per_token : int
        Training pixels drawn per token with ``resolution="pixels"``.
    seed : int
        Splits, subsamples, initial weights, shuffling and dropout.
    """

    head: str = "linear"
    resolution: str = "tokens"
    epochs: int = 50
    patience: int = 5
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 8192
    dropout: float = 0.0
    batchnorm: bool = True
    alpha: float = 1.0
    holdout_fraction: float = 0.1
    test_fraction: float = 0.2
    max_train_tokens: int = 1_000_000
    pixels_per_token: int = 4
    seed: int = 0

    def validated(self) -> SemanticSettings:
        """Return self after checking every field (raises :class:`PosvitError` naming the option)."""
        if self.head not in HEADS:
            raise PosvitError(f"unknown head '{self.head}': use {' or '.join(HEADS)}")
        if self.resolution not in RESOLUTIONS:
            raise PosvitError(f"unknown resolution '{self.resolution}': use {' or '.join(RESOLUTIONS)}")
        if self.epochs < 1:
            raise PosvitError(f"--epochs must be at least 1, got {self.epochs}")
        if self.patience < 0:
            raise PosvitError(f"--patience must be 0 (no early stopping) or more, got {self.patience}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise PosvitError(f"--lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise PosvitError(f"--weight-decay must be 0 or more, got {self.weight_decay}")
        if self.batch_size < 2:
            raise PosvitError(f"--batch-size must be at least 2 tokens (batch norm), got {self.batch_size}")
        if not (0.0 <= self.dropout < 1.0):
            raise PosvitError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not (self.alpha >= 0 and math.isfinite(self.alpha)):
            raise PosvitError(f"--alpha must be 0 or more, got {self.alpha}")
        if not (0.0 < self.holdout_fraction < 1.0):
            raise PosvitError(f"the early-stopping fraction must be in (0, 1), got {self.holdout_fraction}")
        if not (0.0 < self.test_fraction < 1.0):
            raise PosvitError(f"--test-fraction must be in (0, 1), got {self.test_fraction}")
        if self.max_train_tokens < 2:
            raise PosvitError(f"--max-train-tokens must be at least 2, got {self.max_train_tokens}")
        if self.pixels_per_token < 1:
            raise PosvitError(f"--pixels-per-token must be at least 1, got {self.pixels_per_token}")
        return self

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["masks"] = (
            "nearest-downsampled to the token grid (class at each patch centre)" if self.resolution == "tokens"
            else "in the frame the encoder saw; logits bilinearly upsampled to it (align_corners=False)"
        )
        d["head_form"] = (
            ("batch norm → " if self.batchnorm else "") + (f"dropout {self.dropout:g} → " if self.dropout else "")
            + "linear; AdamW, cross-entropy, best early-stopping loss" if self.head == "linear"
            else f"ridge least squares on one-hot targets, standardised features, alpha {self.alpha:g}"
        )
        d["metric"] = "mIoU from one dataset-wide confusion matrix; classes with an empty union left out"
        return d
