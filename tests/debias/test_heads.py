"""Head files and their application: Gram-Schmidt, sequential vs exact projection, posvit and Franca formats,
width checks, blanking, and cleaning a stored store without re-extraction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_store

from posvit_cli.core.errors import PosvitError, PosvitWarning
from posvit_cli.core.debias.heads import (
    BlankHead, ProjectionHead, TTAHead, apply_head_to_store, gram_schmidt, load_head, save_head,
)
from posvit_cli.core.features.store import FeatureStore
from posvit_cli.core.features.writer import StoreWriter


def _planes(T=3, D=12, seed=0):
    return np.random.default_rng(seed).normal(size=(T, 2, D)).astype(np.float32)


def test_gram_schmidt_known_answer():
    u = gram_schmidt(torch.tensor([[3.0, 4.0, 0.0], [1.0, 0.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    # u_r = w0/|w0|; u_c = normalised (v - (v.u_r) u_r) with v = w1/|w1|; w2 adds nothing new, w3 is zero.
    assert torch.allclose(u, torch.tensor([[0.6, 0.8, 0.0], [0.8, -0.6, 0.0]], dtype=torch.float64), atol=1e-12)


def test_sequential_head_applies_planes_in_training_order():
    planes = _planes()
    head = ProjectionHead(planes)
    z = torch.randn(50, 12, dtype=torch.float64)
    expected = z.clone()
    for W in planes:
        u = gram_schmidt(torch.from_numpy(W))
        expected = expected - (expected @ u.T) @ u
    assert torch.allclose(head.apply(z.float()).double(), expected, atol=1e-5)
    assert torch.allclose(z @ head.matrix(), expected, atol=1e-10)
    reverse = ProjectionHead(planes[::-1].copy())
    assert (reverse.apply(z.float()) - head.apply(z.float())).abs().max() > 1e-3  # order matters (planes overlap)
    L = head.matrix()
    assert (L - L.T).abs().max() > 1e-3  # the sequential product of non-orthogonal planes is not a projector


def test_exact_head_is_a_symmetric_idempotent_projector():
    head = ProjectionHead(_planes(T=4), exact=True)
    L = head.matrix()
    assert torch.allclose(L, L.T, atol=1e-12)
    assert torch.allclose(L @ L, L, atol=1e-12)
    assert head.basis().shape == (12, 8)
    assert abs(torch.trace(L).item() - (12 - 8)) < 1e-9
    z = torch.randn(7, 3, 12)
    assert torch.allclose(head.apply(z), (z.double() @ L).float(), atol=1e-5)
    # Every plane vector is removed exactly.
    assert torch.allclose(head.apply(torch.from_numpy(_planes(T=4).reshape(-1, 12))), torch.zeros(8, 12), atol=1e-5)


def test_posvit_head_round_trip(tmp_path):
    head = ProjectionHead(_planes(), exact=True, info={"backbone": {"model": "dinov2-s-reg"}, "note": [1, 2]})
    path = save_head(head, tmp_path / "h.safetensors")
    back = load_head(path, channels=12)
    assert isinstance(back, ProjectionHead) and back.exact and back.method == "rasa"
    assert torch.equal(back.planes, head.planes)
    assert back.info["backbone"]["model"] == "dinov2-s-reg" and back.info["note"] == [1, 2]
    prov = back.provenance()
    assert prov["method"] == "rasa" and prov["head"] == str(path) and len(prov["head_sha256"]) == 64


@pytest.mark.parametrize("T", [9, 10])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_franca_format_round_trip(tmp_path, T, suffix):
    head = ProjectionHead(_planes(T=T, D=16), info={"backbone": {"model": "x"}})
    path = save_head(head, tmp_path / f"franca{suffix}", layout="franca")
    if suffix == ".pth":
        sd = torch.load(path, weights_only=True)
        assert sorted(sd) == sorted([f"pre_pos_layers.{i}.weight" for i in range(T - 1)] + ["pos_pred.weight"])
        assert torch.equal(sd["pos_pred.weight"], head.planes[-1])
    back = load_head(path, channels=16)
    assert back.rounds == T and torch.equal(back.planes, head.planes)


@pytest.mark.parametrize("prefix", ["rasa_head.", "module.", "module.rasa_head."])
def test_franca_prefixes_and_whole_models(tmp_path, prefix):
    planes = torch.from_numpy(_planes(T=9, D=8))
    sd = {f"{prefix}pre_pos_layers.{i}.weight": planes[i] for i in range(8)}
    sd[f"{prefix}pos_pred.weight"] = planes[8]
    if "rasa_head" in prefix:  # a whole Franca model: backbone weights next to its RASA head
        sd[prefix.replace("rasa_head.", "") + "blocks.0.attn.qkv.weight"] = torch.zeros(24, 8)
    torch.save(sd, tmp_path / "h.pth")
    back = load_head(tmp_path / "h.pth", channels=8)
    assert torch.equal(back.planes, planes) and not back.exact


def test_head_of_another_width_is_refused(tmp_path):
    path = save_head(ProjectionHead(_planes(D=384), info={"backbone": {"model": "dinov2-s-reg"}}),
                     tmp_path / "h.safetensors")
    with pytest.raises(PosvitError, match=r"384-channel features of dinov2-s-reg; .* 768 channels"):
        load_head(path, channels=768)
    with pytest.raises(PosvitError, match="384-channel"):
        ProjectionHead(_planes(D=384)).apply(torch.zeros(2, 768))


def test_files_that_are_not_heads_are_refused(tmp_path):
    torch.save({"blocks.0.weight": torch.zeros(2, 2)}, tmp_path / "model.pth")
    with pytest.raises(PosvitError, match="not a RASA head"):
        load_head(tmp_path / "model.pth")
    torch.save({"pre_pos_layers.1.weight": torch.zeros(2, 4), "pos_pred.weight": torch.zeros(2, 4)},
               tmp_path / "gap.pth")
    with pytest.raises(PosvitError, match="numbered"):
        load_head(tmp_path / "gap.pth")
    with pytest.raises(PosvitError, match="does not exist"):
        load_head(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(PosvitError, match="cannot read"):
        load_head(tmp_path / "junk.safetensors")


def test_blank_head(tmp_path):
    head = BlankHead([5, 1, 5], channels=8)
    z = torch.arange(16, dtype=torch.float32).reshape(2, 8) + 1
    out = head.apply(z)
    assert out[:, [1, 5]].abs().sum() == 0 and torch.equal(out[:, [0, 2, 3, 4, 6, 7]], z[:, [0, 2, 3, 4, 6, 7]])
    back = load_head(save_head(head, tmp_path / "b.safetensors"))
    assert back.channels_zeroed == [1, 5] and back.channels == 8
    with pytest.raises(PosvitError, match="8-channel"):
        load_head(tmp_path / "b.safetensors", channels=4)
    with pytest.raises(PosvitError, match="does not exist"):
        BlankHead([9], channels=8)
    with pytest.raises(PosvitError, match="only 4 channels"):
        BlankHead([6]).check_channels(4)


def test_tta_head_round_trip_and_refuses_stored_tokens(tmp_path):
    back = load_head(save_head(TTAHead("flips,roll:1,2"), tmp_path / "t.safetensors"), channels=64)
    assert isinstance(back, TTAHead) and back.transforms == ["identity", "flip-lr", "flip-ud", "roll:1,2"]
    with pytest.raises(PosvitError, match="extracting"):
        back.apply(torch.zeros(1, 2, 2, 4))
    with pytest.raises(PosvitError, match="Franca"):
        save_head(back, tmp_path / "t.pth", layout="franca")


def _store_with_everything(path, rng):
    grids = {"a.png": (5, 3), "b.png": (5, 3), "c.png": (2, 4)}
    prov = {"model": "synthetic", "patch_size": 16, "channels": 12, "debias": []}
    feats = {}
    with StoreWriter(path, provenance=prov, layers=["block1", "final"], dtype="float32") as w:
        for name, (h, wd) in grids.items():
            f = {ly: rng.normal(size=(h, wd, 12)).astype(np.float32) for ly in ("block1", "final")}
            feats[name] = f
            w.add(name, f, orig_size=(h * 16, wd * 16), proc_size=(h * 16, wd * 16),
                  prefix={ly: rng.normal(size=(2, 12)).astype(np.float32) for ly in ("block1", "final")},
                  maps={"labels": np.arange(h * wd).reshape(h, wd)}, meta={"tag": name})
        w.commit()
    return feats


def test_apply_head_to_store_in_row_bands(tmp_path):
    rng = np.random.default_rng(0)
    feats = _store_with_everything(tmp_path / "s.h5", rng)
    head = ProjectionHead(_planes())
    path = save_head(head, tmp_path / "h.safetensors")
    head = load_head(path)
    with FeatureStore(tmp_path / "s.h5") as src:
        # 2 rows of 3 tokens × 12 channels per band: the 5-row grids are cleaned in 3 bands.
        summary = apply_head_to_store(head, src, tmp_path / "clean.zarr", band_bytes=2 * 3 * 12 * 4, command="cmd")
        src_prefix = src.prefix_tokens(0, "final")
    assert summary["images"] == 3
    with FeatureStore(tmp_path / "clean.zarr") as out:
        for rec in out.records:
            f = feats[rec.path]
            assert np.allclose(out.features(rec.index, "final"), head.apply_numpy(f["final"]), atol=1e-6)
            assert np.array_equal(out.features(rec.index, "block1"), f["block1"])
            assert np.array_equal(out.token_map(rec.index, "labels"), np.arange(rec.grid[0] * rec.grid[1])
                                  .reshape(rec.grid))
            assert rec.meta == {"tag": rec.path}
        assert np.array_equal(out.prefix_tokens(0, "final"), src_prefix)
        debias = out.provenance["debias"]
        assert debias[-1]["method"] == "rasa" and debias[-1]["head"] == str(path)
        assert debias[-1]["applied_to_store"].endswith("s.h5") and out.provenance["command"] == "cmd"
    with FeatureStore(tmp_path / "clean.zarr") as again, pytest.warns(PosvitWarning, match="already cleaned"):
        apply_head_to_store(head, again, tmp_path / "twice.h5")


def test_apply_head_to_store_refusals(tmp_path):
    write_store(tmp_path / "b3.h5", [np.zeros((2, 2, 12), np.float32)], layers=("block3",))
    write_store(tmp_path / "w8.h5", [np.zeros((2, 2, 8), np.float32)])
    with FeatureStore(tmp_path / "b3.h5") as s, pytest.raises(PosvitError, match="--layers final"):
        apply_head_to_store(ProjectionHead(_planes()), s, tmp_path / "o.h5")
    with FeatureStore(tmp_path / "w8.h5") as s, pytest.raises(PosvitError, match="12-channel"):
        apply_head_to_store(ProjectionHead(_planes()), s, tmp_path / "o.h5")
    with FeatureStore(tmp_path / "w8.h5") as s, pytest.raises(PosvitError, match="extract the images again"):
        apply_head_to_store(TTAHead("flips"), s, tmp_path / "o.h5")
    assert not (tmp_path / "o.h5").exists() and not (tmp_path / "o.h5.partial").exists()


def test_backbone_mismatch_warns(tmp_path):
    head = ProjectionHead(_planes(), info={"backbone": {"model": "dinov2-s-reg", "weights_sha256": "a" * 64}})
    with pytest.warns(PosvitWarning, match="trained on dinov2-s-reg"):
        head.check_backbone({"model": "dino-s16"})
    with pytest.warns(PosvitWarning, match="other weights"):
        head.check_backbone({"model": "dinov2-s-reg", "weights_sha256": "b" * 64})


@pytest.mark.parametrize("nested", [True, False])
def test_franca_lightning_checkpoint_gives_its_head(tmp_path, nested):
    """Franca trains the head in a Lightning module (`backbone` + `head`): its checkpoint holds both."""
    planes = torch.from_numpy(_planes(T=4, D=8, seed=3))
    bare = {f"pre_pos_layers.{i}.weight": planes[i] for i in range(3)}
    bare["pos_pred.weight"] = planes[3]
    torch.save(bare, tmp_path / "bare.pth")
    sd = {"backbone.cls_token": torch.randn(1, 1, 8), "backbone.blocks.0.attn.qkv.weight": torch.randn(24, 8),
          "backbone.head.weight": torch.randn(2, 8)}
    sd.update({f"head.{k}": v for k, v in bare.items()})
    ckpt = {"state_dict": sd, "epoch": 4, "global_step": 410, "pytorch-lightning_version": "2.4.0"} if nested else sd
    torch.save(ckpt, tmp_path / "last.ckpt")
    with pytest.warns(PosvitWarning, match=r"whole model: using its RASA head \(head\.\*\), ignoring 3 other"):
        head = load_head(tmp_path / "last.ckpt", channels=8)
    ref = load_head(tmp_path / "bare.pth", channels=8)
    z = torch.randn(2, 5, 8)
    assert head.rounds == 4 and torch.equal(head.apply(z), ref.apply(z))
    assert (head.apply(z) - z).abs().max() > 1e-3
