"""2-D ALiBi: the bias matrix (hand-computed values), the retrofitted model (roll equivariance, fused == explicit
attention, caching) and loading retrofitted checkpoints (posvit's and the published plain state dicts)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from posvit_cli.core.features.alibi import AlibiConfig, alibi_bias, alibi_slopes, grid_distances, retrofit
from posvit_cli.core.features.encoders import load_encoder, save_encoder_checkpoint
from posvit_cli.core.errors import PosvitError, PosvitWarning

from conftest import TINY_MODEL


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tokens(enc, x):
    with torch.no_grad():
        return enc.forward_tokens(x, ["final"])[0]["final"]


# --------------------------------------------------------------------------------------------------------------
# The bias matrix


def test_bias_hand_computed_1x4_torus_and_plain():
    # A 1×4 ring: torus distances 0,1,2,1 from token 0, max 2 → bias 0, -1/2, -1, -1/2.
    b = alibi_bias(1, 4)
    assert torch.equal(b[0], torch.tensor([0.0, -0.5, -1.0, -0.5]))
    # Without wrap: distances 0,1,2,3, max 3.
    b = alibi_bias(1, 4, wrap=False)
    assert torch.allclose(b[0], torch.tensor([0.0, -1 / 3, -2 / 3, -1.0]))
    # Without normalisation: raw patch distances.
    assert torch.equal(alibi_bias(1, 4, normalize=False)[0], torch.tensor([0.0, -1.0, -2.0, -1.0]))


def test_bias_properties_square_grid():
    h = w = 6
    b = alibi_bias(h, w, num_prefix_tokens=0)
    assert b.shape == (36, 36)
    assert torch.equal(b, b.T)
    assert torch.all(torch.diagonal(b) == 0)
    assert b.max() == 0 and b.min() == -1
    # Farthest torus pair from (0, 0) is (3, 3): distance √18 = the normaliser.
    assert b[0, 3 * w + 3] == -1.0
    assert math.isclose(float(b[0, 1]), -1 / math.sqrt(18), rel_tol=1e-6)


def test_bias_is_invariant_under_rolling_the_grid():
    h, w = 5, 7
    b = alibi_bias(h, w).reshape(h, w, h, w)
    for dy, dx in [(1, 0), (0, 3), (2, 5), (4, 6)]:
        rolled = torch.roll(b, shifts=(dy, dx, dy, dx), dims=(0, 1, 2, 3))
        assert torch.equal(rolled, b)
    # Without wrap it is not.
    nb = alibi_bias(h, w, wrap=False).reshape(h, w, h, w)
    assert not torch.equal(torch.roll(nb, shifts=(1, 1, 1, 1), dims=(0, 1, 2, 3)), nb)


def test_bias_prefix_rows_and_columns_are_zero():
    p = 5
    b = alibi_bias(3, 4, num_prefix_tokens=p)
    assert b.shape == (p + 12, p + 12)
    assert torch.all(b[:p] == 0) and torch.all(b[:, :p] == 0)
    assert torch.equal(b[p:, p:], alibi_bias(3, 4))


def test_bias_non_square_grid_and_manhattan():
    h, w = 2, 6
    d = grid_distances(h, w)
    # token (0,0) to (1,3): torus Δy = 1, Δx = 3 → √10, the farthest pair.
    assert math.isclose(float(d[0, 1 * w + 3]), math.sqrt(10), rel_tol=1e-6)
    assert math.isclose(float(d.max()), math.sqrt(10), rel_tol=1e-6)
    b = alibi_bias(h, w)
    assert b[0, 1 * w + 3] == -1.0 and torch.equal(b, b.T)
    m = grid_distances(h, w, distance="manhattan")
    assert float(m[0, 1 * w + 3]) == 4.0 and float(m[0, 2]) == 2.0
    one = alibi_bias(1, 1, num_prefix_tokens=1)
    assert torch.equal(one, torch.zeros(2, 2))


def test_slopes():
    assert torch.equal(alibi_slopes("constant", 3, 1.0), torch.ones(3))
    g = alibi_slopes("geometric", 4)
    assert torch.allclose(g, torch.tensor([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8]))
    with pytest.raises(PosvitError, match="slopes"):
        AlibiConfig(slopes="steep")


# --------------------------------------------------------------------------------------------------------------
# The retrofitted model


def test_roll_equivariance_alibi_but_not_original():
    torch.manual_seed(0)
    enc = load_encoder(TINY_MODEL, "random", seed=0)
    x = torch.randn(1, 3, 80, 96)  # 5 × 6 grid, non-square
    k = (2, 3)
    xr = torch.roll(x, shifts=(k[0] * 16, k[1] * 16), dims=(2, 3))
    f, fr = _tokens(enc, x), _tokens(enc, xr)
    assert (torch.roll(f, k, (1, 2)) - fr).abs().max() > 1e-2  # the learned position embedding breaks it
    retrofit(enc, "alibi")
    f, fr = _tokens(enc, x), _tokens(enc, xr)
    assert torch.allclose(torch.roll(f, k, (1, 2)), fr, atol=1e-5)
    # Without wrap-around the bias itself is not roll-invariant.
    enc2 = load_encoder(TINY_MODEL, "random", seed=0)
    retrofit(enc2, "alibi", {"wrap": False})
    f, fr = _tokens(enc2, x), _tokens(enc2, xr)
    assert (torch.roll(f, k, (1, 2)) - fr).abs().max() > 1e-3


def _explicit_alibi_forward(model, x, bias):
    """Reference: the published explicit-softmax ALiBi attention, written out."""
    B = x.shape[0]
    t = model.patch_embed(x)
    t = model._pos_embed(t)
    t = model.norm_pre(t)
    for i, blk in enumerate(model.blocks):
        a = blk.attn
        b = bias[i] if isinstance(bias, list) else bias  # one bias per block, or the same for all
        y = blk.norm1(t)
        N, C = y.shape[1], y.shape[2]
        qkv = a.qkv(y).reshape(B, N, 3, a.num_heads, C // a.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = a.q_norm(q), a.k_norm(k)
        logits = (q * a.scale) @ k.transpose(-2, -1) + b
        o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
        t = t + blk.ls1(a.proj(a.norm(o)))
        t = t + blk.ls2(blk.mlp(blk.norm2(t)))
    return model.norm(t)


@pytest.mark.parametrize("slopes", ["constant", "geometric"])
def test_fused_attention_equals_explicit_softmax(slopes):
    enc = load_encoder(TINY_MODEL, "random", seed=1)
    retrofit(enc, "alibi", {"slopes": slopes, "slope": 2.0})
    m = enc.model
    x = torch.randn(2, 3, 48, 64)
    s = alibi_slopes(slopes, m.blocks[0].attn.num_heads, 2.0)
    bias = (s[:, None, None] * alibi_bias(3, 4, m.num_prefix_tokens))[None]
    with torch.no_grad():
        fused = m.forward_features(x)
        explicit = _explicit_alibi_forward(m, x, bias)
    assert torch.allclose(fused, explicit, atol=1e-5)
    assert all(blk.attn.fused_attn for blk in m.blocks)


def test_bias_cached_shared_and_rebuilt_for_new_sizes():
    enc = load_encoder(TINY_MODEL, "random")
    retrofit(enc, "alibi")
    alibi = enc.model.alibi
    seen = []
    hook = enc.model.blocks[3].register_forward_pre_hook(lambda mod, a, kw: seen.append(kw["attn_mask"]),
                                                         with_kwargs=True)
    try:
        _tokens(enc, torch.randn(1, 3, 32, 32))
        _tokens(enc, torch.randn(2, 3, 32, 32))
        assert seen[0] is seen[1]  # built once, the same tensor for every call and block
        assert seen[0].shape == (1, 1, 5, 5)
        _tokens(enc, torch.randn(1, 3, 48, 80))  # 3 × 5 grid
        assert seen[2].shape == (1, 1, 16, 16)
        assert torch.equal(seen[2][0, 0], alibi_bias(3, 5, 1))
    finally:
        hook.remove()
    assert len(alibi._cache) <= 4


def test_learned_slopes_get_gradients_and_are_saved(tmp_path):
    enc = load_encoder(TINY_MODEL, "random")
    retrofit(enc, "alibi", {"slopes": "learned", "slope": 0.5})
    m = enc.model
    assert "alibi.slopes" in m.state_dict()
    out = m.forward_features(torch.randn(1, 3, 32, 48))
    out.square().sum().backward()
    assert m.alibi.slopes.grad is not None and m.alibi.slopes.grad.abs().sum() > 0
    with torch.no_grad():
        m.alibi.slopes.copy_(torch.tensor([0.25, 3.0]))
    ck = save_encoder_checkpoint(tmp_path / "l.safetensors", enc)
    back = load_encoder(None, ck)
    assert torch.equal(back.model.alibi.slopes.detach(), torch.tensor([0.25, 3.0]))
    x = torch.randn(1, 3, 32, 48)
    assert torch.allclose(_tokens(back, x), _tokens(enc, x), atol=1e-6)


def test_deepcopy_of_retrofitted_model_is_independent():
    enc = load_encoder(TINY_MODEL, "random")
    retrofit(enc, "alibi")
    cp = copy.deepcopy(enc)
    x = torch.randn(1, 3, 32, 64)
    assert torch.equal(_tokens(cp, x), _tokens(enc, x))
    hooks = list(cp.model.blocks[0]._forward_pre_hooks.values())
    assert len(hooks) == 1 and hooks[0].__self__ is cp.model.alibi is not enc.model.alibi


def test_nope_removes_position_information():
    enc = load_encoder(TINY_MODEL, "random")
    retrofit(enc, "nope")
    assert enc.model.pos_embed is None and getattr(enc.model, "alibi", None) is None
    assert "pos_embed" not in enc.model.state_dict()
    x = torch.randn(1, 3, 48, 48)
    f, fr = _tokens(enc, x), _tokens(enc, torch.roll(x, (16, 32), (2, 3)))
    assert torch.allclose(torch.roll(f, (1, 2), (1, 2)), fr, atol=1e-5)


def test_dinov3_style_eva_rope_is_removed():
    import timm

    net = timm.create_model("vit_small_patch16_dinov3", pretrained=False, num_classes=0, depth=2, embed_dim=64,
                            num_heads=2)
    from posvit_cli.core.features.alibi import _apply

    assert net.rope is not None
    _apply(net, "alibi", {}, "dinov3-tiny")
    assert net.rope is None and net.alibi.num_prefix_tokens == 5
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        f = net.forward_features(x)[:, 5:].reshape(1, 4, 4, -1)
        fr = net.forward_features(torch.roll(x, (16, 16), (2, 3)))[:, 5:].reshape(1, 4, 4, -1)
    assert torch.allclose(torch.roll(f, (1, 1), (1, 2)), fr, atol=1e-5)


@pytest.mark.parametrize("arch", [
    "vit_small_patch14_reg4_dinov2",    # DINOv2 with registers (5 prefix tokens)
    "vit_base_patch16_clip_224",        # CLIP image tower (pre-norm)
    "deit_tiny_distilled_patch16_224",  # distilled DeiT: own token layout, zero-frozen embedding
    "eva02_tiny_patch14_224",           # EVA-02: absolute embedding and RoPE
])
def test_timm_vit_families_become_roll_equivariant(arch):
    import timm

    from posvit_cli.core.features.alibi import _apply

    net = timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True, depth=1, embed_dim=64,
                            num_heads=2).eval()
    _apply(net, "alibi", {}, arch)
    assert getattr(net, "rope", None) is None
    p, ps = net.num_prefix_tokens, net.patch_embed.patch_size[0]
    x = torch.randn(1, 3, 3 * ps, 5 * ps)
    with torch.no_grad():
        f = net.forward_features(x)[:, p:].reshape(1, 3, 5, -1)
        fr = net.forward_features(torch.roll(x, (ps, 2 * ps), (2, 3)))[:, p:].reshape(1, 3, 5, -1)
    assert torch.allclose(torch.roll(f, (1, 2), (1, 2)), fr, atol=1e-4)


def test_non_vit_and_already_retrofitted_are_refused():
    import timm

    from posvit_cli.core.features.alibi import check_retrofittable

    with pytest.raises(PosvitError, match="not a Vision Transformer"):
        check_retrofittable(timm.create_model("test_resnet", pretrained=False), "test_resnet")
    with pytest.raises(PosvitError, match="does not take an attention mask"):
        check_retrofittable(timm.create_model("test_vit_relpos", pretrained=False), "test_vit_relpos")
    enc = load_encoder(TINY_MODEL, "random")
    retrofit(enc, "alibi")
    with pytest.raises(PosvitError, match="already retrofitted"):
        retrofit(enc, "nope")


# --------------------------------------------------------------------------------------------------------------
# Checkpoints


def test_posvit_checkpoint_reloads_alone_and_through_extract(tmp_path, image_dir, cli):
    enc = load_encoder(TINY_MODEL, "random", seed=3)
    retrofit(enc, "alibi", {"distance": "manhattan"})
    ck = save_encoder_checkpoint(tmp_path / "a.safetensors", enc)
    back = load_encoder(None, ck)
    assert back.modifications == [{"name": "alibi", "config": AlibiConfig(distance="manhattan").to_dict()}]
    assert back.model.alibi.config.distance == "manhattan"
    x = torch.randn(1, 3, 64, 48)
    assert torch.equal(_tokens(back, x), _tokens(enc, x))
    # NoPE checkpoints reload through the `nope` modifier module.
    enc2 = load_encoder(TINY_MODEL, "random", seed=3)
    retrofit(enc2, "nope")
    ck2 = save_encoder_checkpoint(tmp_path / "n.safetensors", enc2)
    assert torch.equal(_tokens(load_encoder(None, ck2), x), _tokens(enc2, x))

    out = tmp_path / "f.h5"
    r = cli(["extract", image_dir / "grey0.png", "--weights", ck, "-o", out, "--size", "64", "-q"])
    assert r.exit_code == 0, r.output
    from posvit_cli.core.features.store import FeatureStore

    with FeatureStore(out) as fs:
        assert fs.provenance["modifications"][0]["name"] == "alibi"
        assert fs.features(0).shape == (4, 4, 64)


def test_published_style_plain_state_dict_loads_with_method(tmp_path, image_dir, cli):
    """The reference's checkpoints: plain timm state dicts without pos_embed (constant slopes are not saved)."""
    enc = load_encoder(TINY_MODEL, "random", seed=5)
    retrofit(enc, "alibi")
    sd = {k: v for k, v in enc.model.state_dict().items()}
    assert "pos_embed" not in sd and not any(k.startswith("alibi") for k in sd)
    path = tmp_path / "alibi_plain.pth"
    torch.save(sd, path)
    back = load_encoder(TINY_MODEL, path, modifications=[{"name": "alibi", "config": {}}])
    x = torch.randn(1, 3, 48, 48)
    assert torch.equal(_tokens(back, x), _tokens(enc, x))
    with pytest.raises(PosvitError, match="--method alibi"):
        load_encoder(TINY_MODEL, path)

    out = tmp_path / "g.h5"
    args = ["extract", image_dir / "grey1.png", "--model", TINY_MODEL, "--weights", path, "-o", out, "--size", "64",
            "-q"]
    r = cli(args)
    assert r.exit_code == 2 and "--method alibi" in r.output
    r = cli(args + ["--method", "alibi"])
    assert r.exit_code == 0, r.output
    r = cli(args + ["--method", "sideways", "--overwrite"])
    assert r.exit_code == 2 and "'--method': 'sideways' is not one of" in r.output


def test_reference_per_block_learned_slopes_load_and_round_trip(tmp_path, image_dir, cli):
    """The reference's learned-slope checkpoints: a timm state dict without pos_embed, one `blocks.{i}.attn.m`
    of shape (heads, 1, 1) per block. Each block's attention must use its own slopes."""
    enc = load_encoder(TINY_MODEL, "random", seed=7)
    sd = {k: v for k, v in enc.model.state_dict().items() if k != "pos_embed"}
    heads, depth = enc.model.blocks[0].attn.num_heads, len(enc.model.blocks)
    slopes = torch.rand(depth, heads, 1, 1, generator=torch.Generator().manual_seed(0)) * 4 + 0.5
    sd.update({f"blocks.{i}.attn.m": slopes[i].clone() for i in range(depth)})
    path = tmp_path / "alibi_ms_learned.pth"
    torch.save(sd, path)
    with pytest.raises(PosvitError, match=r"unexpected: blocks.0.attn.m.*per-block ALiBi slopes: pass --method alibi"):
        load_encoder(TINY_MODEL, path)  # without --method: the slopes belong to no module
    # What `extract --method alibi` passes: the default (constant, shared) settings.
    back = load_encoder(TINY_MODEL, path, modifications=[{"name": "alibi", "config": AlibiConfig().to_dict()}])
    cfg = back.modifications[0]["config"]
    assert cfg["per_block"] is True and cfg["slopes"] == "learned"
    m = back.model
    assert all(torch.equal(m.blocks[i].attn.m.detach(), slopes[i]) for i in range(depth))
    x = torch.randn(2, 3, 48, 64)  # 3 x 4 grid
    unit = alibi_bias(3, 4, m.num_prefix_tokens)  # -d / d_max, zero rows/columns for the prefix tokens
    biases = [(slopes[i] * unit)[None] for i in range(depth)]  # -m_i * d / d_max, per block and head
    with torch.no_grad():
        fused = m.forward_features(x)
        explicit = _explicit_alibi_forward(m, x, biases)
        shared = _explicit_alibi_forward(m, x, biases[0])
    assert torch.allclose(fused, explicit, atol=1e-5)
    assert (fused - shared).abs().max() > 1e-3  # block 0's slopes everywhere would not do
    m.forward_features(x).square().sum().backward()  # learned: every block's slopes get a gradient
    assert all(blk.attn.m.grad is not None and blk.attn.m.grad.abs().sum() > 0 for blk in m.blocks)
    assert "alibi.slopes" not in m.state_dict()

    ck = save_encoder_checkpoint(tmp_path / "pb.safetensors", back)
    again = load_encoder(None, ck)
    assert again.modifications == back.modifications
    assert all(torch.equal(again.model.blocks[i].attn.m.detach(), slopes[i]) for i in range(depth))
    assert torch.allclose(_tokens(again, x), _tokens(back, x), atol=1e-6)
    out = tmp_path / "pb.h5"
    r = cli(["extract", image_dir / "grey0.png", "--model", TINY_MODEL, "--weights", path, "--method", "alibi",
             "-o", out, "--size", "64", "-q"])
    assert r.exit_code == 0, r.output


def test_per_block_constant_slopes_are_saved_buffers(tmp_path):
    enc = load_encoder(TINY_MODEL, "random", seed=2)
    retrofit(enc, "alibi", {"per_block": True, "slope": 2.0})
    m = enc.model
    assert not any(p is blk.attn.m for blk in m.blocks for p in m.parameters())
    assert torch.equal(m.state_dict()["blocks.1.attn.m"], torch.full((m.blocks[0].attn.num_heads, 1, 1), 2.0))
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        m.blocks[1].attn.m.mul_(3.0)
        explicit = _explicit_alibi_forward(m, x, [b.attn.m[None] * alibi_bias(2, 3, m.num_prefix_tokens)
                                                  for b in m.blocks])
        assert torch.allclose(m.forward_features(x), explicit, atol=1e-5)
    back = load_encoder(None, save_encoder_checkpoint(tmp_path / "c.safetensors", enc))
    assert torch.equal(back.model.blocks[1].attn.m, m.blocks[1].attn.m)
    assert torch.allclose(_tokens(back, x), _tokens(enc, x), atol=1e-6)


def _zero_pos_embed_checkpoint(tmp_path, method, value=0.0):
    """The reference's older layout: the retrofitted model's weights plus its pos_embed, zeroed (and frozen)."""
    enc = load_encoder(TINY_MODEL, "random", seed=5)
    shape = enc.model.pos_embed.shape
    retrofit(enc, method)
    sd = dict(enc.model.state_dict())
    assert "pos_embed" not in sd
    sd["pos_embed"] = torch.full(shape, value)
    path = tmp_path / f"{method}_zero_pe.pth"
    torch.save(sd, path)
    return enc, path


@pytest.mark.parametrize("method", ["alibi", "nope"])
def test_zeroed_pos_embed_is_dropped_with_method(tmp_path, method, image_dir, cli):
    enc, path = _zero_pos_embed_checkpoint(tmp_path, method)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        back = load_encoder(TINY_MODEL, path, modifications=[{"name": method, "config": {}}])
    ours = [str(w.message) for w in caught if issubclass(w.category, PosvitWarning)]
    assert len(ours) == 1 and "dropped its all-zero pos_embed" in ours[0], ours
    x = torch.randn(1, 3, 48, 64)
    assert torch.equal(_tokens(back, x), _tokens(enc, x))
    r = cli(["extract", image_dir / "grey0.png", "--model", TINY_MODEL, "--weights", path, "--method", method,
             "-o", tmp_path / "z.h5", "--size", "64", "-q"])
    assert r.exit_code == 0 and "dropped its all-zero pos_embed" in r.output, r.output


def test_zeroed_pos_embed_without_method_warns_and_nonzero_with_method_is_refused(tmp_path):
    _, path = _zero_pos_embed_checkpoint(tmp_path, "alibi")
    with pytest.warns(PosvitWarning, match=r"all-zero position embedding.*--method alibi or --method nope"):
        plain = load_encoder(TINY_MODEL, path)
    assert plain.modifications == [] and not plain.model.pos_embed.any()
    (tmp_path / "nz").mkdir()
    _, nonzero = _zero_pos_embed_checkpoint(tmp_path / "nz", "alibi", value=0.01)
    with pytest.raises(PosvitError, match="unexpected: pos_embed.*not zero.*drop --method"):
        load_encoder(TINY_MODEL, nonzero, modifications=[{"name": "alibi", "config": {}}])
