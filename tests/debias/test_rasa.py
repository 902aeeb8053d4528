"""RASA on cached tokens: planted positional planes are removed (coordinate error → constant predictor, stack R²
→ 0) while the semantic part survives; planes act in training order; the exact variant is a projector; the
token cache samples evenly with the right targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_store

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.debias.heads import ProjectionHead, gram_schmidt
from posvit_cli.core.measure.probe import stack_r2
from posvit_cli.core.debias.rasa import (
    RasaConfig, TokenCache, _through_planes, grid_coordinates, load_token_cache, train_rasa,
)
from posvit_cli.core.features.store import FeatureStore

D, H, W, N = 384, 12, 16, 48


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def planted():
    """Features = isotropic semantic part + a linear function of (row, col) along two random directions."""
    rng = np.random.default_rng(0)
    A = rng.normal(size=(2, D))
    A /= np.linalg.norm(A, axis=1, keepdims=True)
    semantic = rng.normal(size=(N, H, W, D)).astype(np.float32)
    position = ((grid_coordinates(H, W) - 0.5) @ (8.0 * A)).reshape(H, W, D).astype(np.float32)
    return semantic, semantic + position[None]


def _cache(feats):
    n, h, w, d = feats.shape
    return TokenCache(torch.from_numpy(feats.reshape(-1, d)), torch.from_numpy(np.tile(grid_coordinates(h, w), (n, 1))),
                      n_images=n)


def test_grid_coordinates_known_values():
    c = grid_coordinates(3, 4)
    assert c.shape == (12, 2)
    assert np.allclose(c[:4], [[0, 0], [0, 1 / 3], [0, 2 / 3], [0, 1]])
    assert np.allclose(c[-1], [1, 1]) and np.allclose(c[5], [0.5, 1 / 3])
    assert np.allclose(grid_coordinates(1, 3), [[0.5, 0], [0.5, 0.5], [0.5, 1]])


def test_rasa_removes_a_planted_position_and_keeps_the_semantics(planted):
    semantic, feats = planted
    logs = []
    result = train_rasa(_cache(feats), RasaConfig(lr=1e-2, batch_images=4, rounds=9, epochs=3), on_round=logs.append)
    assert result.planes.shape == (9, 2, D) and [r.round for r in logs] == list(range(1, 10))
    first, last = logs[0], logs[-1]
    assert first.probe_mse_before < 0.3 * first.constant_mse  # position is decodable before
    assert last.probe_mse_after > 0.97 * last.constant_mse  # ... and no better than a constant afterwards
    clean = ProjectionHead(result.planes).apply_numpy(feats)
    before = np.mean([stack_r2(f, targets=("xy",), fraction=0.5)["xy"] for f in feats[:6]])
    after = np.mean([stack_r2(f, targets=("xy",), fraction=0.5)["xy"] for f in clean[:6]])
    assert before > 0.6 and after < 0.1
    cos = (clean * semantic).sum(-1) / np.linalg.norm(clean, axis=-1) / np.linalg.norm(semantic, axis=-1)
    assert cos.mean() > 0.95
    assert abs(last.cosine - float(np.mean((clean * feats).sum(-1) / np.linalg.norm(clean, axis=-1)
                                           / np.linalg.norm(feats, axis=-1)))) < 0.01


def test_training_sees_tokens_after_earlier_planes_in_order():
    """sigmoid(W z̃) with z̃ = z after planes 1..t-1 in order equals the raw tokens times W pushed through them."""
    rng = np.random.default_rng(1)
    planes = [gram_schmidt(torch.from_numpy(rng.normal(size=(2, 10)))) for _ in range(3)]  # overlapping planes
    W = torch.from_numpy(rng.normal(size=(2, 10)))
    z = torch.from_numpy(rng.normal(size=(20, 10)))
    cleaned = z.clone()
    for u in planes:
        cleaned = cleaned - (cleaned @ u.T) @ u
    assert torch.allclose(z @ _through_planes(W, planes, None).T, cleaned @ W.T, atol=1e-12)
    wrong_order = z.clone()
    for u in planes[::-1]:
        wrong_order = wrong_order - (wrong_order @ u.T) @ u
    assert (wrong_order @ W.T - cleaned @ W.T).abs().max() > 1e-3
    q, _ = torch.linalg.qr(torch.cat(planes).T)
    exact = z - (z @ q) @ q.T
    assert torch.allclose(z @ _through_planes(W, planes, q).T, exact @ W.T, atol=1e-12)


def test_exact_rasa_head_is_a_projector(planted):
    _, feats = planted
    result = train_rasa(_cache(feats[:8]), RasaConfig(lr=1e-2, batch_images=4, rounds=3, epochs=1, exact=True))
    head = ProjectionHead(result.planes, exact=True)
    L = head.matrix()
    assert torch.allclose(L, L.T, atol=1e-10) and torch.allclose(L @ L, L, atol=1e-10)
    assert head.basis().shape == (D, 6)


def test_training_is_reproducible_and_seeded(planted):
    _, feats = planted
    cfg = RasaConfig(lr=1e-2, batch_images=4, rounds=2, epochs=1, seed=3)
    a = train_rasa(_cache(feats[:8]), cfg).planes
    b = train_rasa(_cache(feats[:8]), cfg).planes
    c = train_rasa(_cache(feats[:8]), RasaConfig(lr=1e-2, batch_images=4, rounds=2, epochs=1, seed=4)).planes
    assert np.array_equal(a, b) and not np.allclose(a, c)


def test_token_cache_samples_evenly_with_matching_targets(tmp_path):
    grids = []
    for h, w in [(4, 6), (4, 6), (5, 3)]:
        yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        f = np.zeros((h, w, 8), np.float32)
        f[..., 0], f[..., 1], f[..., 2] = yy, xx, h  # each token carries its own position
        grids.append(f)
    write_store(tmp_path / "s.h5", grids)
    with FeatureStore(tmp_path / "s.h5") as s:
        full = load_token_cache(s)
        part = load_token_cache(s, max_tokens=30, seed=1)
    assert len(full) == 63 and not full.sampled and full.grids == {"4x6": 2, "5x3": 1}
    assert part.sampled and len(part) == 11 + 11 + 7 and part.offsets.tolist() == [0, 11, 22, 29]
    assert full.offsets.tolist() == [0, 24, 48, 63]
    for cache in (full, part):
        t, c = cache.tokens.float(), cache.coords
        h = t[:, 2]
        w = torch.where(h == 4, 6.0, 3.0)
        assert torch.allclose(c[:, 0] * (h - 1), t[:, 0]) and torch.allclose(c[:, 1] * (w - 1), t[:, 1])


def test_token_cache_refuses_bad_stores(tmp_path):
    bad = np.zeros((2, 2, 4), np.float32)
    bad[0, 0, 0] = np.nan
    write_store(tmp_path / "nan.h5", [bad])
    with FeatureStore(tmp_path / "nan.h5") as s, pytest.raises(PosvitError, match="NaN"):
        load_token_cache(s)
    for kw, msg in [({"rounds": 0}, "--rounds"), ({"lr": -1.0}, "--lr-head"), ({"token_fraction": 0.0}, "fraction"),
                    ({"batch_images": 0}, "--batch-images"), ({"epochs": 0}, "--epochs")]:
        with pytest.raises(PosvitError, match=msg):
            RasaConfig(**kw).validate()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_matches_cpu(planted):
    _, feats = planted
    cfg = RasaConfig(lr=1e-2, batch_images=4, rounds=3, epochs=2)
    cpu = train_rasa(_cache(feats[:16]), cfg)
    c = _cache(feats[:16])
    gpu = train_rasa(TokenCache(c.tokens.cuda(), c.coords.cuda(), c.n_images), cfg)
    for a, b in zip(cpu.planes, gpu.planes):
        ua, ub = gram_schmidt(torch.from_numpy(a)), gram_schmidt(torch.from_numpy(b))
        assert torch.linalg.svdvals(ua @ ub.T).min() > 0.99  # same planes up to float noise


def test_every_round_starts_from_the_seeded_linear_initialisation(planted):
    from posvit_cli.core.debias.rasa import initial_weights

    _, feats = planted
    inits = initial_weights(D, 3, seed=5)
    assert inits.shape == (3, 2, D) and float(inits.abs().max()) <= 1 / np.sqrt(D)
    assert torch.equal(inits, initial_weights(D, 3, seed=5)) and not torch.equal(inits, initial_weights(D, 3, 6))
    frozen = train_rasa(_cache(feats[:4]), RasaConfig(lr=1e-30, batch_images=2, rounds=3, epochs=1, seed=5))
    assert np.allclose(frozen.planes, inits.numpy(), atol=1e-12)


def _reference_protocol(feats, config):
    """The references' loop, written out: all tokens of `batch_images` images per step, in order, the last
    partial batch dropped (Franca's loader: drop_last=True) and the cosine over the full batches only, the earlier
    planes applied to the tokens one after the other."""
    import math

    import torch.nn.functional as F

    from posvit_cli.core.debias.rasa import initial_weights

    n, h, w, d = feats.shape
    z_all = torch.from_numpy(feats.reshape(n, h * w, d))
    y = torch.from_numpy(grid_coordinates(h, w))
    inits = initial_weights(d, config.rounds, config.seed)
    steps = (n // config.batch_images) * config.epochs
    planes, bases = [], []
    for t in range(config.rounds):
        W = inits[t].clone().requires_grad_(True)
        opt = torch.optim.AdamW([W], lr=config.lr, weight_decay=0.0)
        k = 0
        for _ in range(config.epochs):
            for b in range(0, n - n % config.batch_images, config.batch_images):
                z = z_all[b : b + config.batch_images].reshape(-1, d)
                for u in bases:
                    z = z - (z @ u.T) @ u
                for g in opt.param_groups:
                    g["lr"] = 0.5 * config.lr * (1 + math.cos(math.pi * k / steps))
                loss = F.mse_loss(torch.sigmoid(z @ W.T), y.repeat(z.shape[0] // (h * w), 1))
                opt.zero_grad()
                loss.backward()
                opt.step()
                k += 1
        planes.append(W.detach().clone())
        bases.append(gram_schmidt(planes[-1]).float())
    return torch.stack(planes).numpy()


def test_images_in_order_batching_reproduces_the_reference_protocol(planted):
    _, feats = planted
    config = RasaConfig(lr=1e-2, batch_images=3, rounds=3, epochs=2, batching="images-in-order", seed=2)
    ours = train_rasa(_cache(feats[:10]), config).planes  # 10 images: batches of 3, 3, 3 (the last one dropped)
    reference = _reference_protocol(feats[:10], config)
    assert np.allclose(ours, reference, atol=1e-6)
    shuffled = train_rasa(_cache(feats[:10]), RasaConfig(lr=1e-2, batch_images=3, rounds=3, epochs=2,
                                                         batching="images", seed=2)).planes
    assert np.abs(shuffled - reference).max() > 1e-4
    with pytest.raises(PosvitError, match="--token-fraction applies"):
        RasaConfig(batching="images", token_fraction=0.5).validate()
    with pytest.raises(PosvitError, match="--batching"):
        RasaConfig(batching="pixels").validate()


def test_images_in_order_drops_the_last_partial_batch_as_the_reference(planted, monkeypatch):
    """12 images in batches of 5: Franca's loader runs 2 full batches per epoch (drop_last=True) and sizes its
    cosine from ⌊12/5⌋ · epochs steps; images 11 and 12 are never seen."""
    import math
    import warnings

    import posvit_cli.core.debias.rasa as rasa
    from posvit_cli.core.errors import PosvitWarning

    _, feats = planted
    feats = feats[:12]
    config = RasaConfig(lr=1e-2, batch_images=5, rounds=2, epochs=3, batching="images-in-order", seed=2)
    lrs, batches = [], []

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            lrs.append(self.param_groups[0]["lr"])
            return super().step(closure)

    def recording_batches(*args, **kwargs):
        chunks = epoch_batches(*args, **kwargs)
        batches.append([c.cpu() for c in chunks])
        return chunks

    epoch_batches = rasa._epoch_batches
    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    monkeypatch.setattr(rasa, "_epoch_batches", recording_batches)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PosvitWarning)  # 6 steps per round: the "too few steps" warning
        result = train_rasa(_cache(feats), config)
    monkeypatch.undo()
    assert result.steps_per_round == 2 * 3
    assert len(lrs) == 2 * 2 * 3  # rounds × steps per epoch × epochs optimiser steps
    schedule = [0.5 * 1e-2 * (1 + math.cos(math.pi * k / 6)) for k in range(6)]
    assert lrs == pytest.approx(schedule * 2)
    tokens_per_image = H * W
    assert len(batches) == 2 * 3 and all(len(epoch) == 2 for epoch in batches)
    for epoch in batches:
        assert [sorted(set((c // tokens_per_image).tolist())) for c in epoch] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    # The dropped images change nothing: replacing them by anything gives the same planes.
    other = feats.copy()
    other[10:] = np.random.default_rng(1).normal(size=other[10:].shape) * 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PosvitWarning)
        again = train_rasa(_cache(other), config)
        assert np.array_equal(again.planes, result.planes)
        assert np.allclose(result.planes, _reference_protocol(feats, config), atol=1e-6)
        with pytest.raises(PosvitError, match="no full batch of 5"):
            train_rasa(_cache(feats[:4]), config)
        # The other batchings keep ⌈n/B⌉ steps (every image every epoch).
        shuffled = train_rasa(_cache(feats), RasaConfig(lr=1e-2, batch_images=5, rounds=1, epochs=3,
                                                        batching="images", seed=2))
        assert shuffled.steps_per_round == 3 * 3


def test_too_few_steps_per_round_warns():
    """Franca's defaults on a dozen images give one step per epoch: the user is told the planes will not train."""
    from posvit_cli.core.errors import PosvitWarning

    rng = np.random.default_rng(0)
    n, h, w, d = 12, 6, 6, 8
    coords = torch.as_tensor(np.tile(grid_coordinates(h, w), (n, 1)), dtype=torch.float32)
    cache = TokenCache(tokens=torch.as_tensor(rng.normal(size=(n * h * w, d)), dtype=torch.float32), coords=coords,
                       n_images=n)
    with pytest.warns(PosvitWarning, match="optimiser steps per round"):
        train_rasa(cache, RasaConfig(rounds=1, epochs=5, batch_images=128))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", PosvitWarning)
        train_rasa(cache, RasaConfig(rounds=1, epochs=5, batch_images=1))  # 60 steps: no warning
