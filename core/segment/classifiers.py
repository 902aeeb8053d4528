"""Pixel classifiers for trainable segmentation, saved without pickle.

Three kinds, all fitted on ``(N, F)`` float32 features and integer classes ``0..K-1``, with per-sample weights
(class balancing is done by the caller through the weights: XGBoost ignores scikit-learn's ``class_weight``):

``xgboost`` (default)
    Gradient-boosted trees, ``tree_method="hist"``, on the CPU or CUDA. Saved in XGBoost's own UBJSON format.
``random-forest``
    XGBoost's random-forest mode (one round of ``trees`` parallel trees, row and column subsampling), so it
    saves, loads and runs on a GPU like the boosted model.
``logistic``
    Multinomial logistic regression (scikit-learn, L-BFGS) on standardised features. Saved as arrays
    (means, scales, coefficients, intercepts); probabilities are computed here, so loading needs no pickle.

Every classifier serialises to ``(config dict, {file name: bytes})`` and back, for the ``.posvit-seg`` model
file (:mod:`posvit_cli.core.segment.segmenter`).
"""

from __future__ import annotations

import dataclasses
import io
import os

import numpy as np

from posvit_cli.core.errors import PosvitError

__all__ = ["CLASSIFIERS", "ClassifierConfig", "PixelClassifier", "balanced_weights", "load_classifier"]

CLASSIFIERS = ("xgboost", "random-forest", "logistic")


@dataclasses.dataclass
class ClassifierConfig:
    """Classifier choice and its settings.

    Attributes
    ----------
    kind : {"xgboost", "random-forest", "logistic"}
    trees : int
        Boosting rounds (``xgboost``) or forest size (``random-forest``).
    depth : int
        Maximum tree depth (the reference uses 8).
    learning_rate : float
        Boosting step (``xgboost`` only).
    max_bin : int
        Histogram bins per feature.
    balance : bool
        Weight classes inversely to their labelled pixel counts.
    device : str
        ``cpu`` or ``cuda`` (XGBoost kinds).
    threads : int or None
        CPU threads (None: all cores this process may use).
    seed : int
    c : float
        Inverse L2 strength (``logistic``).
    """

    kind: str = "xgboost"
    trees: int = 100
    depth: int = 8
    learning_rate: float = 0.3
    max_bin: int = 256
    balance: bool = True
    device: str = "cpu"
    threads: int | None = None
    seed: int = 0
    c: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in CLASSIFIERS:
            raise PosvitError(f"unknown classifier '{self.kind}': use {', '.join(CLASSIFIERS)}")
        if self.trees < 1 or self.depth < 1:
            raise PosvitError("--trees and --depth must be at least 1")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("threads")
        d.pop("device")
        return d


def balanced_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Sample weights ``N / (K · N_c)`` that give every class the same total weight.

    Parameters
    ----------
    y : ndarray of int, shape (N,)
        Classes in ``0..n_classes-1``.

    Returns
    -------
    ndarray of float32, shape (N,)
    """
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(n_classes)
    w[present] = y.size / (present.sum() * counts[present])
    return w[y].astype(np.float32)


#: Below this many feature values (rows × columns) one thread is faster than OpenMP's start-up and barriers.
_SMALL_PROBLEM = 4_000_000


def _n_threads(threads: int | None, size: int | None = None) -> int:
    if threads:
        return int(threads)
    if size is not None and size < _SMALL_PROBLEM:
        return 1
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover
        return max(1, os.cpu_count() or 1)


class PixelClassifier:
    """A fitted pixel classifier: ``predict_proba(X (N, F)) -> (N, K)``."""

    def __init__(self, config: ClassifierConfig, n_classes: int, n_features: int):
        self.config = config
        self.n_classes = int(n_classes)
        self.n_features = int(n_features)
        self._booster = None
        self._linear: dict[str, np.ndarray] | None = None

    # -- fitting -----------------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, X: np.ndarray, y: np.ndarray, n_classes: int, config: ClassifierConfig,
            sample_weight: np.ndarray | None = None) -> PixelClassifier:
        """Fit on labelled pixels.

        Parameters
        ----------
        X : ndarray of float32, shape (N, F)
        y : ndarray of int, shape (N,)
            Classes in ``0..n_classes-1``; every class must occur.
        n_classes : int
        config : ClassifierConfig
        sample_weight : ndarray, shape (N,), optional
            Overrides the class balancing of ``config.balance``.
        """
        X = np.ascontiguousarray(X, dtype=np.float32)
        y = np.asarray(y, dtype=np.int64)
        counts = np.bincount(y, minlength=n_classes)
        if (counts == 0).any():
            raise PosvitError(f"class index {int(np.flatnonzero(counts == 0)[0])} has no training pixel")
        if sample_weight is None:
            sample_weight = balanced_weights(y, n_classes) if config.balance else np.ones(y.size, np.float32)
        model = cls(config, n_classes, X.shape[1])
        if config.kind == "logistic":
            model._fit_logistic(X, y, sample_weight)
        else:
            model._fit_xgboost(X, y, sample_weight)
        return model

    def _xgb_params(self, size: int | None = None) -> dict:
        cfg = self.config
        params = {
            "tree_method": "hist",
            "max_depth": cfg.depth,
            "max_bin": cfg.max_bin,
            "device": cfg.device,
            "nthread": _n_threads(cfg.threads, size),
            "seed": cfg.seed,
            "verbosity": 0,
        }
        if self.n_classes == 2:
            params.update(objective="binary:logistic", eval_metric="logloss")
        else:
            params.update(objective="multi:softprob", num_class=self.n_classes, eval_metric="mlogloss")
        if cfg.kind == "random-forest":
            params.update(learning_rate=1.0, num_parallel_tree=cfg.trees, subsample=0.8, colsample_bynode=0.8)
        else:
            params.update(learning_rate=cfg.learning_rate)
        return params

    def _fit_xgboost(self, X, y, w) -> None:
        import xgboost as xgb

        dtrain = xgb.QuantileDMatrix(X, label=y, weight=w, max_bin=self.config.max_bin,
                                     nthread=_n_threads(self.config.threads, X.size))
        rounds = 1 if self.config.kind == "random-forest" else self.config.trees
        self._booster = xgb.train(self._xgb_params(X.size), dtrain, num_boost_round=rounds)

    def _fit_logistic(self, X, y, w) -> None:
        from sklearn.linear_model import LogisticRegression

        mean = X.mean(0, dtype=np.float64)
        scale = X.std(0, dtype=np.float64)
        scale[scale == 0] = 1.0
        Z = (X - mean) / scale
        lr = LogisticRegression(C=self.config.c, max_iter=1000, random_state=self.config.seed)
        lr.fit(Z, y, sample_weight=w)
        self._linear = {
            "mean": mean.astype(np.float32),
            "scale": scale.astype(np.float32),
            "coef": lr.coef_.astype(np.float32),
            "intercept": lr.intercept_.astype(np.float32),
        }

    # -- prediction --------------------------------------------------------------------------------------------
    def set_runtime(self, device: str = "cpu", threads: int | None = None) -> None:
        """Choose where to predict (the device is not part of the saved model)."""
        self.config.device = device
        self.config.threads = threads
        if self._booster is not None:
            self._booster.set_param({"device": device, "nthread": _n_threads(threads)})

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities.

        Parameters
        ----------
        X : ndarray, shape (N, F)

        Returns
        -------
        ndarray of float32, shape (N, K)
        """
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise PosvitError(
                f"features have {X.shape[-1]} channels; the classifier was trained on {self.n_features}"
            )
        if self._linear is not None:
            p = self._linear
            z = ((X - p["mean"]) / p["scale"]) @ p["coef"].T + p["intercept"]
            if z.shape[1] == 1:
                p1 = 1.0 / (1.0 + np.exp(-z[:, 0]))
                return np.stack([1.0 - p1, p1], axis=1).astype(np.float32)
            z -= z.max(1, keepdims=True)
            e = np.exp(z)
            return (e / e.sum(1, keepdims=True)).astype(np.float32)
        if self.config.threads is None:
            self._booster.set_param({"nthread": _n_threads(None, X.size)})
        out = self._booster.inplace_predict(np.ascontiguousarray(X))
        out = np.asarray(out, dtype=np.float32)
        if self.n_classes == 2:
            out = out.reshape(-1)
            return np.stack([1.0 - out, out], axis=1)
        return out.reshape(-1, self.n_classes)

    # -- persistence -------------------------------------------------------------------------------------------
    def to_files(self) -> tuple[dict, dict[str, bytes]]:
        """The classifier as a JSON-ready dict and named binary files (no pickle)."""
        meta = {"config": self.config.to_dict(), "n_classes": self.n_classes, "n_features": self.n_features}
        if self._linear is not None:
            buf = io.BytesIO()
            np.savez(buf, **self._linear)
            meta["file"] = "classifier.npz"
            return meta, {"classifier.npz": buf.getvalue()}
        raw = self._booster.save_raw(raw_format="ubj")
        meta["file"] = "classifier.ubj"
        return meta, {"classifier.ubj": bytes(raw)}


def load_classifier(meta: dict, files: dict[str, bytes]) -> PixelClassifier:
    """Rebuild a :class:`PixelClassifier` from :meth:`PixelClassifier.to_files` output.

    Raises
    ------
    PosvitError
        If the files are missing or unreadable.
    """
    cfg_d = dict(meta["config"])
    cfg = ClassifierConfig(**{k: v for k, v in cfg_d.items() if k in {f.name for f in dataclasses.fields(ClassifierConfig)}})
    model = PixelClassifier(cfg, meta["n_classes"], meta["n_features"])
    name = meta.get("file")
    if name not in files:
        raise PosvitError(f"the model file lacks its classifier ('{name}')")
    try:
        if name.endswith(".npz"):
            with np.load(io.BytesIO(files[name]), allow_pickle=False) as z:
                model._linear = {k: z[k] for k in ("mean", "scale", "coef", "intercept")}
        else:
            import xgboost as xgb

            booster = xgb.Booster()
            booster.load_model(bytearray(files[name]))
            model._booster = booster
    except Exception as exc:
        raise PosvitError(f"cannot read the classifier in the model file ({type(exc).__name__}: {exc})") from exc
    model.set_runtime("cpu", None)
    return model
