"""Linear-probe semantic segmentation on cached patch features, and its transformation-robustness test.

The question it answers: do the features still say *what* a patch shows once position is removed? A linear head
is trained on the frozen features of a store (the backbone is never re-run) against class masks matched to the
images by file stem, and scored on other images with one dataset-wide confusion matrix.

Masks and resolution (``resolution``)
    A mask is first brought onto the frame the encoder saw (the store's ``--size`` resize, or the crop of tiled
    and ``crop:N`` extractions; nearest neighbour). ``tokens`` (default): the mask is nearest-downsampled to the
    token grid (each token takes the class at its patch centre); the head is trained and scored per token.
    ``pixels`` (the published setting of "What DINO saw"): the head's logits are bilinearly upsampled to the
    mask in that frame (``align_corners=False``) and every pixel is scored; training uses, per image, a seeded
    sample of pixels whose features are the bilinear interpolation of the tokens (``pixels_per_token`` pixels
    per token), which for an affine head is exactly the upsampled-logit loss at those pixels.

Heads (``head``)
    ``linear`` (default, the published head): batch norm → dropout → linear layer, trained with AdamW and
    cross-entropy on minibatches of tokens held in memory (a seeded, class-blind subsample of at most
    ``max_train_tokens`` tokens, float16), keeping the epoch of lowest loss on an early-stopping split of the
    training images. ``ridge``: closed-form least squares on one-hot targets (features standardised on the
    training tokens, ``alpha`` on the Gram diagonal): one pass, no epochs. Both end as one affine map
    ``logits = x @ W + b`` (batch norm folded in), so scoring and robustness treat them alike.

Scoring
    mIoU from ONE confusion matrix accumulated over every scored pixel of every image (not per batch, which
    averages batch-level scores and inflates them), IoU per class (a class with an empty union, never in the
    ground truth and never predicted, is left out of the mean and reported), pixel accuracy. Pixels whose mask
    value is ``ignore_index`` never count.

Splits
    Images, not tokens, are split, by a seeded permutation of the sorted file stems (so every store of the same
    images gets the same split). Without a validation store, ``test_fraction`` of the images are held out and
    scored; ``holdout_fraction`` of the remaining training images decide early stopping.

Robustness
    Stores extracted with ``posvit extract --transform T`` hold the features of transformed images mapped back
    to the original frame; the SAME head is scored on them with the original masks (:func:`score_store`), one
    mIoU per transform. A model equivariant to a transform scores exactly as on the untransformed images.
"""

# The package is split by concern: settings, heads (the fitted maps and upsampling), dataset (masks, samples,
# scoring) and pipeline (the whole probe and its document). Public names are re-exported here.

from __future__ import annotations

from posvit_cli.core.measure.semantic.dataset import (
    MASK_SUFFIXES, MaskScan, MaskSource, gather_samples, image_split, scan_masks, score_store, scores_from_confusion,
)
from posvit_cli.core.measure.semantic.heads import (
    AffineHead, bilinear_taps, fit_ridge_head, train_linear_head, upsample_argmax,
)
from posvit_cli.core.measure.semantic.pipeline import check_same_features, read_semantic_result, semantic_probe
from posvit_cli.core.measure.semantic.settings import (
    HEADS, MIN_STEPS_PER_EPOCH, RESOLUTIONS, SEMANTIC_SCHEMA, SEMANTIC_SCHEMA_VERSION, SemanticSettings,
)

__all__ = [
    "AffineHead",
    "HEADS",
    "MASK_SUFFIXES",
    "MIN_STEPS_PER_EPOCH",
    "MaskScan",
    "MaskSource",
    "RESOLUTIONS",
    "SEMANTIC_SCHEMA",
    "SEMANTIC_SCHEMA_VERSION",
    "SemanticSettings",
    "bilinear_taps",
    "check_same_features",
    "fit_ridge_head",
    "gather_samples",
    "image_split",
    "read_semantic_result",
    "scan_masks",
    "score_store",
    "scores_from_confusion",
    "semantic_probe",
    "train_linear_head",
    "upsample_argmax",
]
