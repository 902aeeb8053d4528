"""Position-encoding controls (`posvit probe controls`): exact known answers of zero/shuffle/shift, restoration of
the model, position-free models, and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL

from posvit_cli.core.features.encoders import load_encoder
from posvit_cli.core.measure.pe_controls import control_sources, position_control, probe_controls

PATCH = 8  # posvit-tiny


@pytest.fixture(scope="module")
def tiny():
    return load_encoder("posvit-tiny", "pretrained")


def _tokens(encoder, x):
    with torch.inference_mode():
        out, _ = encoder.forward_tokens(x, ["final"])
    return out["final"][0]


def _patch_permute(x, src, h, w, p):
    """The image whose patch k is patch src[k] of ``x`` (1, C, h·p, w·p)."""
    C = x.shape[1]
    patches = x.reshape(1, C, h, p, w, p).permute(0, 1, 2, 4, 3, 5).reshape(1, C, h * w, p, p)
    out = patches[:, :, torch.from_numpy(src)].reshape(1, C, h, w, p, p)
    return out.permute(0, 1, 2, 4, 3, 5).reshape(1, C, h * p, w * p)


def test_control_restores_the_model_also_when_the_forward_raises(one_torch_thread):
    enc = load_encoder(TINY_MODEL, "random")
    model = enc.model
    x = torch.randn(1, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    before = _tokens(enc, x).clone()
    pe_bytes = model.pos_embed.detach().clone()
    with position_control(model, "zero"):
        assert not torch.allclose(_tokens(enc, x), before)  # the control is active inside the block
    assert torch.equal(_tokens(enc, x), before)

    def boom(module, inputs):
        raise RuntimeError("forward failed")

    hook = model.blocks[0].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="forward failed"), position_control(model, "shuffle", seed=3):
            _tokens(enc, x)
    finally:
        hook.remove()
    assert "_pos_embed" not in model.__dict__
    assert torch.equal(model.pos_embed, pe_bytes)
    assert torch.equal(_tokens(enc, x), before)


def test_shift_and_zero_are_exact_under_whole_patch_rolls(tiny, one_torch_thread):
    """Attention is permutation-equivariant: once the position code moves with the content, a torus roll of the
    image by whole patches rolls the tokens exactly."""
    x = torch.randn(1, 1, 8 * PATCH, 10 * PATCH, generator=torch.Generator().manual_seed(1))
    dy, dx = 2, 3
    rolled = torch.roll(x, (dy * PATCH, dx * PATCH), (2, 3))
    ref = _tokens(tiny, x)
    with position_control(tiny, "shift", shift=(dy, dx)):
        shifted = _tokens(tiny, rolled)
    torch.testing.assert_close(shifted, torch.roll(ref, (dy, dx), (0, 1)), atol=2e-5, rtol=1e-5)
    with position_control(tiny, "zero"):
        flat = _tokens(tiny, x)
        flat_rolled = _tokens(tiny, rolled)
    torch.testing.assert_close(flat_rolled, torch.roll(flat, (dy, dx), (0, 1)), atol=2e-5, rtol=1e-5)
    # ... which the model with its embedding is not: the embedding is what ties a token to its place.
    assert (torch.roll(ref, (dy, dx), (0, 1)) - _tokens(tiny, rolled)).abs().max() > 0.1


def test_shuffle_moves_each_code_to_its_source(tiny, one_torch_thread):
    h, w = 6, 7
    x = torch.randn(1, 1, h * PATCH, w * PATCH, generator=torch.Generator().manual_seed(2))
    src = control_sources((h, w), "shuffle", seed=5)
    assert sorted(src.tolist()) == list(range(h * w)) and (src != np.arange(h * w)).any()
    ref = _tokens(tiny, x).reshape(h * w, -1)
    with position_control(tiny, "shuffle", seed=5):
        out = _tokens(tiny, _patch_permute(x, src, h, w, PATCH)).reshape(h * w, -1)
    torch.testing.assert_close(out, ref[torch.from_numpy(src)], atol=2e-5, rtol=1e-5)


def test_shuffle_of_a_zero_embedding_changes_nothing(one_torch_thread):
    enc = load_encoder(TINY_MODEL, "random")
    with torch.no_grad():
        enc.model.pos_embed.zero_()
    x = torch.randn(1, 3, 48, 64, generator=torch.Generator().manual_seed(4))
    ref = _tokens(enc, x)
    with position_control(enc, "shuffle", seed=1):
        torch.testing.assert_close(_tokens(enc, x), ref, atol=1e-6, rtol=0)


def test_rope_controls_on_a_tiny_dinov3(one_torch_thread):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_dinov3", pretrained=False, num_classes=0, dynamic_img_size=True,
                              depth=2, embed_dim=64, num_heads=2).eval()
    with torch.no_grad():  # layer scales of 1e-5 and near-uniform attention would let RoPE barely matter
        for name, param in model.named_parameters():
            if "gamma" in name:
                param.fill_(1.0)
            elif "qkv.weight" in name or "q_proj.weight" in name or "k_proj.weight" in name:
                param.mul_(8.0)
    x = torch.randn(1, 3, 96, 80, generator=torch.Generator().manual_seed(6))
    p, h, w = model.num_prefix_tokens, 6, 5

    def grid(inp):
        with torch.inference_mode():
            return model.forward_features(inp)[0, p:].reshape(h, w, -1)

    ref = grid(x)
    with position_control(model, "shift", shift=(1, 2)) as codes:
        assert codes == ["rope"]
        shifted = grid(torch.roll(x, (16, 32), (2, 3)))
    torch.testing.assert_close(shifted, torch.roll(ref, (1, 2), (0, 1)), atol=2e-5, rtol=1e-5)
    assert (grid(torch.roll(x, (16, 32), (2, 3))) - torch.roll(ref, (1, 2), (0, 1))).abs().max() > 1e-2
    with position_control(model, "zero"):
        zeroed = grid(x)
    rope, model.rope = model.rope, None  # the identity rotation is no rotation at all
    try:
        torch.testing.assert_close(zeroed, grid(x), atol=2e-5, rtol=1e-5)
    finally:
        model.rope = rope
    assert not torch.allclose(zeroed, ref, atol=1e-3)


def _texture_pngs(folder, n, size, seed=0):
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        a = gaussian_filter(rng.random(size), 1.5)
        a = (a - a.min()) / (a.max() - a.min())
        paths.append(folder / f"tex{i}.png")
        Image.fromarray((a * 255).astype(np.uint8)).save(paths[-1])
    return paths


def test_zero_and_shuffle_remove_the_position_of_posvit_tiny(tiny, tmp_path, one_torch_thread):
    from posvit_cli.core.measure.probe import make_settings

    paths = _texture_pngs(tmp_path / "imgs", 2, (128, 128))
    settings, _ = make_settings("holdout", targets=("lr", "ud", "xy", "radial", "random"), fraction=0.25,
                                repeats=2, per_channel=False, extras=False)
    res = probe_controls(tiny, paths, controls=["zero", "shuffle", "shift"], settings=settings)
    c = res["controls"]
    assert res["position_encoding"] == ["pos_embed"]
    assert list(c) == ["none", "zero", "shuffle", "shift"]
    assert c["none"]["stack_r2"]["xy"]["mean"] > 0.9
    for name in ("zero", "shuffle"):
        assert c[name]["stack_r2"]["xy"]["mean"] < 0.2
        assert c[name]["drop"]["xy"] > 0.7
        assert c[name]["drop"]["xy"] == pytest.approx(
            c["none"]["stack_r2"]["xy"]["mean"] - c[name]["stack_r2"]["xy"]["mean"])
    assert c["none"]["drop"]["xy"] == 0.0


def test_position_free_model_is_reported_not_probed(tmp_path, one_torch_thread):
    enc = load_encoder(TINY_MODEL, "random", modifications=[{"name": "nope", "config": {}}])
    paths = _texture_pngs(tmp_path / "imgs", 2, (96, 96))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    ref = _tokens(enc, x)
    with position_control(enc, "shift") as codes:
        assert codes == []
        assert torch.equal(_tokens(enc, x), ref)
    from posvit_cli.core.measure.probe import make_settings

    settings, _ = make_settings("holdout", targets=("lr", "xy", "random"), fraction=0.3, repeats=1,
                                per_channel=False, extras=False)
    res = probe_controls(enc, paths, controls=["zero", "shuffle", "shift"], settings=settings)
    assert res["position_encoding"] == ["no position embedding"]
    assert res["controls"]["none"]["status"] == "probed"
    for name in ("zero", "shuffle", "shift"):
        assert res["controls"][name] == {"status": "no position embedding"}


def test_cli_controls_json_and_refusal(cli, tmp_path, one_torch_thread):
    paths = _texture_pngs(tmp_path / "imgs", 2, (64, 64), seed=3)
    out = tmp_path / "controls.json"
    res = cli(["probe", "controls", *paths, "-m", "posvit-tiny", "--fraction", "0.25", "--repeats", "1",
               "--shift", "1,2", "-o", out, "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc == json.loads(out.read_text())
    assert doc["schema"] == "posvit-pe-controls" and doc["shift"] == [1, 2] and doc["layer"] == "final"
    assert [im["grid"] for im in doc["images"]] == [[8, 8], [8, 8]]
    assert list(doc["controls"]) == ["none", "zero", "shuffle", "shift"]
    for entry in doc["controls"].values():
        assert set(entry["stack_r2"]) == {"lr", "ud", "xy", "radial", "random"}
        assert set(entry["drop"]) == {"lr", "ud", "xy", "radial", "random"}
        assert len(entry["stack_r2"]["xy"]["per_image"]) == 2
    assert "control" in res.stderr and "drop xy" in res.stderr

    # viz controls draws it: one figure in its own index section, the xy numbers of the result in the caption.
    figs = tmp_path / "figs"
    r = cli(["viz", "controls", out, "-o", figs, "--json", "-q"])
    assert r.exit_code == 0, r.output
    (fig,) = json.loads(r.stdout)["figures"]
    assert fig["kind"] == "controls" and (figs / fig["file"]).stat().st_size > 10_000
    for name in ("none", "zero", "shuffle", "shift"):
        assert f"{name}: xy R² {doc['controls'][name]['stack_r2']['xy']['mean']:.3f}" in fig["caption"]
    assert "Position-embedding controls" in (figs / "index.html").read_text()
    wrong = cli(["viz", "controls", tmp_path / "imgs" / paths[0].name, "-o", figs])
    assert wrong.exit_code == 2 and wrong.stderr.startswith("error:"), wrong.output

    out.write_text("keep me")
    bad = cli(["probe", "controls", *paths, "-m", "posvit-tiny", "--controls", "zero,blur", "-o", out])
    assert bad.exit_code == 2
    assert bad.stdout == ""
    lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "blur" in lines[0]
    assert out.read_text() == "keep me"


def test_cli_position_free_model_rows(cli, tmp_path, one_torch_thread):
    paths = _texture_pngs(tmp_path / "imgs", 2, (64, 64), seed=4)
    res = cli(["probe", "controls", *paths, "-m", "posvit-tiny", "-w", "random", "--method", "nope", "--fraction",
               "0.25", "--repeats", "1", "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["position_encoding"] == ["no position embedding"]
    assert doc["controls"]["none"]["status"] == "probed"
    assert {k: v["status"] for k, v in doc["controls"].items() if k != "none"} == dict.fromkeys(
        ["zero", "shuffle", "shift"], "no position embedding")
    assert res.stderr.count("no position embedding") >= 4  # the title and one row per control
    (tmp_path / "nope.json").write_text(res.stdout)
    r = cli(["viz", "controls", tmp_path / "nope.json", "-o", tmp_path / "figs", "--json", "-q"])
    assert r.exit_code == 0, r.output
    (fig,) = json.loads(r.stdout)["figures"]
    assert "not probed: zero (no position embedding)" in fig["caption"]


def test_eva02_with_pos_embed_and_rope_controls_both(one_torch_thread):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=0, dynamic_img_size=True,
                              depth=2).eval()
    with torch.no_grad():  # sharp attention and a strong embedding, so that both codes matter
        for name, param in model.named_parameters():
            if "qkv.weight" in name or "q_proj.weight" in name or "k_proj.weight" in name:
                param.mul_(8.0)
        model.pos_embed.mul_(50.0)
    p, h, w, patch = model.num_prefix_tokens, 6, 5, 14
    x = torch.randn(1, 3, h * patch, w * patch, generator=torch.Generator().manual_seed(8))
    rolled = torch.roll(x, (patch, 2 * patch), (2, 3))

    def grid(inp):
        with torch.inference_mode():
            return model.forward_features(inp)[0, p:].reshape(h, w, -1)

    target = torch.roll(grid(x), (1, 2), (0, 1))
    assert (grid(rolled) - target).abs().max() > 0.1
    with position_control(model, "shift", shift=(1, 2)) as codes:
        assert codes == ["pos_embed", "rope"]
        torch.testing.assert_close(grid(rolled), target, atol=2e-5, rtol=1e-5)
