"""Baselines with known answers: the constant-image SVD subspace removes a planted positional pattern exactly;
test-time averaging over torus rolls leaves a roll-equivariant (ALiBi, wrap-around) model's features unchanged;
the most positional channels of a planted store are found."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, write_store

from posvit_cli.core.debias.blank import blank_channels, parse_blank, read_blank_spec, store_positional_channels
from posvit_cli.core.debias.report import report_indices, stack_r2_report
from posvit_cli.core.debias.svd import constant_image_subspace, parse_image_size, svd_image_size
from posvit_cli.core.features.encoders import load_encoder
from posvit_cli.core.errors import PosvitError, PosvitWarning
from posvit_cli.core.debias.heads import ProjectionHead, TTAHead
from posvit_cli.core.features.store import FeatureStore


class _PlantedEncoder:
    """Tokens = content (patch means through a linear map, plus a constant) + a rank-3 positional pattern."""

    patch_size, in_chans, embed_dim = 4, 3, 24

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.mix = torch.randn(3, self.embed_dim, generator=g, dtype=torch.float64)
        self.bias = torch.randn(self.embed_dim, generator=g, dtype=torch.float64)
        self.pos_dirs = torch.randn(3, self.embed_dim, generator=g, dtype=torch.float64)

    def content(self, x):
        B, C, H, W = x.shape
        p = self.patch_size
        pooled = x.double().reshape(B, C, H // p, p, W // p, p).mean(dim=(3, 5)).permute(0, 2, 3, 1)
        return pooled @ self.mix + self.bias

    def position(self, h, w):
        r = torch.linspace(0, 1, h, dtype=torch.float64)[:, None].expand(h, w)
        c = torch.linspace(0, 1, w, dtype=torch.float64)[None, :].expand(h, w)
        return torch.stack([r, c, r * c], -1) @ self.pos_dirs

    def forward_tokens(self, x, layers, keep_prefix=False):
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        return {"final": (self.content(x) + self.position(h, w)).float()}, None


def test_svd_subspace_removes_a_planted_positional_pattern_exactly():
    enc = _PlantedEncoder()
    basis, info = constant_image_subspace(enc, (20, 28), rank=4)
    assert basis.shape == (4, 24) and info["grid"] == [5, 7]
    assert np.allclose(basis @ basis.T, np.eye(4), atol=1e-5)
    assert info["explained"] == pytest.approx(1.0)  # bias + 3 positional directions: rank 4 exactly
    head = ProjectionHead(basis[None], method="svd", exact=True)
    x = torch.randn(2, 3, 20, 28, generator=torch.Generator().manual_seed(1))
    feats = enc.forward_tokens(x, ["final"])[0]["final"]
    content_only = enc.content(x).float()
    # After the head, features carry no trace of position: they equal the cleaned content.
    assert torch.allclose(head.apply(feats), head.apply(content_only), atol=1e-4)
    assert (feats - content_only).abs().max() > 0.5
    with pytest.warns(PosvitWarning, match="only 4 directions"):
        more, _ = constant_image_subspace(enc, (20, 28), rank=16)
    assert more.shape == (4, 24)


def test_svd_on_a_real_vit_and_size_parsing():
    enc = load_encoder(TINY_MODEL, "random", seed=0)
    basis, info = constant_image_subspace(enc, (64, 96), rank=8)
    assert basis.shape == (8, 64) and np.allclose(basis @ basis.T, np.eye(8), atol=1e-5)
    assert 0 < info["explained"] <= 1 and info["grid"] == [4, 6]
    assert parse_image_size("70x100", 16) == (64, 96) and parse_image_size("square:40", 16) == (32, 32)
    for bad in ("big", "8", "3x40"):
        with pytest.raises(PosvitError):
            parse_image_size(bad, 16)
    with pytest.raises(PosvitError, match="--rank"):
        constant_image_subspace(enc, (64, 64), rank=0)


def _insid3_recipe(constant_tokens: np.ndarray, tokens: np.ndarray, k: int) -> np.ndarray:
    """INSID3's published recipe, written out independently in numpy: L2-normalise the constant image's tokens,
    centre them over positions, take the top-k right singular vectors P; L2-normalise the features, project onto
    I - P P^T and re-normalise."""
    c = constant_tokens / np.linalg.norm(constant_tokens, axis=1, keepdims=True)
    c = c - c.mean(0)
    P = np.linalg.svd(c, full_matrices=False)[2][:k]
    x = tokens / np.linalg.norm(tokens, axis=1, keepdims=True)
    x = x - (x @ P.T) @ P
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_svd_head_equals_the_published_insid3_recipe_up_to_each_tokens_norm():
    """posvit's head projects the raw tokens and keeps their scale; INSID3 L2-normalises first and re-normalises
    after. A linear projection commutes with a per-token scale, so the two agree exactly once posvit's output is
    L2-normalised: the difference is only each token's norm (documented in docs/commands/debias-train.md)."""
    torch.manual_seed(0)
    enc = load_encoder(TINY_MODEL, "random", seed=0)
    size, k = (64, 96), 6
    basis, _ = constant_image_subspace(enc, size, rank=k)
    with torch.inference_mode():
        const = enc.forward_tokens(torch.zeros(1, 3, *size), ["final"])[0]["final"][0]
        image = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(3))
        feats = enc.forward_tokens(image, ["final"])[0]["final"][0]
    const = const.double().reshape(-1, const.shape[-1]).numpy()
    feats64 = feats.double().reshape(-1, feats.shape[-1]).numpy()
    published = _insid3_recipe(const, feats64, k)
    ours = ProjectionHead(basis[None], method="svd", exact=True).apply(feats.reshape(-1, feats.shape[-1]))
    ours = ours.double().numpy()
    ours_unit = ours / np.linalg.norm(ours, axis=1, keepdims=True)
    assert np.abs(ours_unit - published).max() < 1e-4
    # ... and it is not a vacuous agreement: the projection really changed the directions of the tokens, and the
    # kept scale (not unit norm) is the one documented difference.
    raw_unit = feats64 / np.linalg.norm(feats64, axis=1, keepdims=True)
    assert np.abs(raw_unit - published).max() > 1e-2
    assert np.abs(np.linalg.norm(ours, axis=1) - 1).max() > 0.1


def test_tta_over_rolls_returns_the_unaveraged_features_of_a_roll_equivariant_model():
    from posvit_cli.core.features.alibi import retrofit

    x = torch.randn(2, 3, 80, 96, generator=torch.Generator().manual_seed(0))  # 5 × 6 grid, non-square
    head = TTAHead("rolls:3,roll:-2,5")
    original = load_encoder(TINY_MODEL, "random", seed=0)
    plain, avg = (e.forward_tokens(x, ["final"])[0]["final"] for e in (original, head.wrap_encoder(original)))
    assert (plain - avg).abs().max() > 1e-2  # a learned position embedding is not roll-equivariant
    alibi = retrofit(load_encoder(TINY_MODEL, "random", seed=0), "alibi")  # torus distances: equivariant
    wrapped = head.wrap_encoder(alibi)
    plain = alibi.forward_tokens(x, ["final"])[0]["final"]
    avg, _ = wrapped.forward_tokens(x, ["final"])
    assert torch.allclose(avg["final"], plain, atol=1e-4)
    assert wrapped.patch_size == 16 and wrapped.provenance()["model"] == TINY_MODEL


def _ramp_store(path, n=4, h=9, w=11, C=16, seed=0):
    rng = np.random.default_rng(seed)
    grids = []
    for _ in range(n):
        f = rng.normal(size=(h, w, C)).astype(np.float32)
        f[..., 3] = np.linspace(0, 1, w)[None, :] + 0.01 * rng.normal(size=(h, w))  # left-right ramp
        f[..., 7] = np.linspace(0, 1, h)[:, None] + 0.01 * rng.normal(size=(h, w))  # up-down ramp
        grids.append(f)
    return write_store(path, grids)


def test_positional_channels_of_a_planted_store_and_the_report(tmp_path):
    with FeatureStore(_ramp_store(tmp_path / "s.h5")) as s:
        channels, result = store_positional_channels(s, k=1)
        assert {3, 7} <= set(channels) and result["results"]["final"]["top_channels"]["lr"] == [3]
        from posvit_cli.core.debias.heads import BlankHead

        head = BlankHead([3, 7], channels=16)
        images = [{"name": r.name, "path": r.path, "grid": list(r.grid)} for r in s.records]
        rep = stack_r2_report(lambda i: s.features(i), images, apply=head.apply_numpy)
    assert rep["images"] == 4 and set(rep["before"]) == {"lr", "ud", "diag", "radial", "xy"}
    assert rep["before"]["xy"] > 0.7 and rep["after"]["xy"] < 0.1 and rep["fraction"] == pytest.approx(16 / 99)
    assert report_indices(10, 4) == [0, 3, 6, 9] and report_indices(3, 8) == [0, 1, 2]


def test_one_blank_rule_for_the_head_and_the_retrofit(tmp_path):
    """`--blank` parses the same way for both users; only the blank head refuses `none` (it would do nothing)."""
    assert read_blank_spec("47, 113,47").channels == read_blank_spec("113,47").channels
    assert read_blank_spec("47, 113,47").channels == (47, 113) and read_blank_spec("auto").kind == "auto"
    assert read_blank_spec("none").kind == read_blank_spec("").kind == read_blank_spec(None).kind == "none"
    assert parse_blank("none") == [] and parse_blank("auto") == "auto" and parse_blank("5,9") == [5, 9]
    for bad, msg in (("-1", "0 or more"), ("a,b", "channel indices"), ("1", "--top-k")):
        with pytest.raises(PosvitError, match=msg):
            read_blank_spec(bad, top_k=0 if bad == "1" else 2)
    with pytest.raises(PosvitError, match="does not exist"):
        read_blank_spec(str(tmp_path / "missing.json"))
    with FeatureStore(_ramp_store(tmp_path / "s.h5")) as s:
        channels, width, source = blank_channels("auto", top_k=1, store=s)
        assert {3, 7} <= set(channels) and width == 16 and source.startswith("auto: top 1")
        assert blank_channels("2,5", store=s) == ([2, 5], 16, "2,5")
        with pytest.raises(PosvitError, match="nothing to blank"):
            blank_channels("none", store=s)
    assert blank_channels("2,5") == ([2, 5], None, "2,5")
    with pytest.raises(PosvitError, match="probes the input store"):
        blank_channels("auto")


def test_svd_image_size_rules():
    assert svd_image_size("auto", 14) == (518, 518)
    assert svd_image_size("auto", 16, (100, 70)) == (96, 64)
    assert svd_image_size("32x48", 16, (100, 70)) == (32, 48) == parse_image_size("32x48", 16)
    with pytest.raises(PosvitError, match="smaller than one"):
        svd_image_size("8", 16)


def test_encoder_from_provenance(tmp_path):
    """The encoder a store names is rebuilt (same weights: same sha); another one is warned about; none is refused."""
    from posvit_cli.core.features.rebuild import encoder_from_provenance, weights_from_provenance

    assert weights_from_provenance({"weights": "bundled:posvit-tiny"}) == "pretrained"
    assert weights_from_provenance({"weights": "random"}, override="w.safetensors") == "w.safetensors"
    assert weights_from_provenance({}) == "pretrained"
    made = load_encoder(TINY_MODEL, "random", seed=3)
    prov = made.provenance()
    again = encoder_from_provenance(prov, "s.h5", seed=3)
    assert again.weights_sha256 == made.weights_sha256 and again.embed_dim == made.embed_dim
    with pytest.warns(PosvitWarning, match="differs from the one that made it"):
        encoder_from_provenance(prov, "s.h5", seed=4)
    with pytest.raises(PosvitError, match="does not name the encoder"):
        encoder_from_provenance({"model": "synthetic"}, "syn.h5")
