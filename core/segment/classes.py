"""The classes a segmenter predicts, and an image with its scribbles as class indices."""

from __future__ import annotations

import dataclasses

import numpy as np

from posvit_cli.core.errors import PosvitError

__all__ = [
    "ClassTable",
    "LabelledImage",
]


@dataclasses.dataclass
class ClassTable:
    """The classes a segmenter predicts.

    Attributes
    ----------
    values : list of int
        Label value of each class in label images (never 0, which means unlabelled).
    names : list of str
    colours : list of (r, g, b) or None
        Colour of each class when the training labels were RGB images.
    """

    values: list[int]
    names: list[str]
    colours: list[tuple[int, int, int]] | None = None

    def __post_init__(self) -> None:
        if len(self.values) != len(self.names):
            raise PosvitError(f"{len(self.names)} class names for {len(self.values)} classes")
        if len(self.values) < 2:
            raise PosvitError(
                f"only one class (value {self.values[0] if self.values else '-'}) is labelled: "
                "label pixels of at least two classes"
            )

    def __len__(self) -> int:
        return len(self.values)

    def lookup(self) -> np.ndarray:
        """Table mapping a label value to its class index (−1 for unlabelled and unknown values)."""
        lut = np.full(max(self.values) + 1, -1, np.int16)
        lut[np.asarray(self.values)] = np.arange(len(self.values), dtype=np.int16)
        return lut

    def to_index(self, labels: np.ndarray) -> np.ndarray:
        """Label values ``(H, W)`` → class indices (−1 = unlabelled).

        Raises
        ------
        PosvitError
            If the labels hold a value that is neither 0 nor a class value.
        """
        labels = np.asarray(labels)
        if labels.size and (labels.min() < 0 or labels.max() > max(self.values)):
            bad = labels[(labels < 0) | (labels > max(self.values))].flat[0]
            raise PosvitError(f"label value {bad} is not a class (classes: {self.values}; 0 = unlabelled)")
        idx = self.lookup()[labels]
        stray = (idx < 0) & (labels != 0)
        if stray.any():
            raise PosvitError(f"label value {labels[stray].flat[0]} is not a class (classes: {self.values})")
        return idx

    def to_dict(self) -> dict:
        return {"values": self.values, "names": self.names,
                "colours": [list(c) for c in self.colours] if self.colours else None}

    @classmethod
    def from_dict(cls, d: dict) -> ClassTable:
        colours = [tuple(c) for c in d["colours"]] if d.get("colours") else None
        return cls(values=[int(v) for v in d["values"]], names=list(d["names"]), colours=colours)


@dataclasses.dataclass
class LabelledImage:
    """An image and its scribbles.

    Attributes
    ----------
    path : str
    labels : ndarray of int16, shape (H, W)
        Class indices, −1 where unlabelled.
    """

    path: str
    labels: np.ndarray
