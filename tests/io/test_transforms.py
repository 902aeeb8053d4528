"""Whole-patch grid transforms: exact inverses on every grid shape, image/token consistency, transform sets and
test-time averaging that inverts before it averages."""

from __future__ import annotations

import pytest
import torch

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.io.transforms import average_over_transforms, parse_transform, parse_transform_set

SPECS = ["identity", "flip-ud", "flip-lr", "rot90", "rot180", "rot270", "rot90:5", "roll:1,2", "roll:-3,4",
         "roll:7,-9", "flip-lr+rot90", "rot90+roll:2,1+flip-ud"]
GRIDS = [(3, 3), (4, 4), (3, 5), (4, 6), (5, 2), (1, 4)]
PATCH = 4


def _patch_pool(x: torch.Tensor, patch: int) -> torch.Tensor:
    """A perfectly transform-equivariant 'encoder': each token is its patch's mean colour, (B, h, w, C)."""
    B, C, H, W = x.shape
    t = x.reshape(B, C, H // patch, patch, W // patch, patch).mean(dim=(3, 5))
    return t.permute(0, 2, 3, 1)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("spec", SPECS)
def test_inverse_of_transform_is_identity_on_every_grid(spec, grid):
    h, w = grid
    t = parse_transform(spec, patch=PATCH)
    g = torch.arange(2 * h * w * 3, dtype=torch.float32).reshape(2, h, w, 3)
    moved = t.apply_tokens(g)
    assert tuple(moved.shape[1:3]) == t.grid_after(h, w)
    assert torch.equal(t.invert_tokens(moved), g)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("spec", SPECS)
def test_image_transform_moves_patches_like_the_token_transform(spec, grid):
    h, w = grid
    t = parse_transform(spec, patch=PATCH)
    x = torch.randn(2, 3, h * PATCH, w * PATCH, generator=torch.Generator().manual_seed(0))
    tokens_of_moved = _patch_pool(t.apply(x), PATCH)
    assert torch.allclose(tokens_of_moved, t.apply_tokens(_patch_pool(x, PATCH)), atol=1e-6)
    assert torch.allclose(t.invert_tokens(tokens_of_moved), _patch_pool(x, PATCH), atol=1e-6)


def test_known_answers_on_a_2x3_grid():
    g = torch.tensor([[1, 2, 3], [4, 5, 6]]).reshape(1, 2, 3, 1)
    flat = lambda spec: parse_transform(spec).apply_tokens(g)[0, ..., 0].tolist()  # noqa: E731
    assert flat("flip-ud") == [[4, 5, 6], [1, 2, 3]]
    assert flat("flip-lr") == [[3, 2, 1], [6, 5, 4]]
    assert flat("rot90") == [[3, 6], [2, 5], [1, 4]]  # counter-clockwise, as torch.rot90
    assert flat("roll:0,1") == [[3, 1, 2], [6, 4, 5]]
    assert flat("roll:1,0") == [[4, 5, 6], [1, 2, 3]]


def test_rot90_of_a_non_square_image_gives_the_transposed_grid():
    t = parse_transform("rot90", patch=PATCH)
    x = torch.zeros(1, 3, 2 * PATCH, 5 * PATCH)
    assert t.apply(x).shape[-2:] == (5 * PATCH, 2 * PATCH)
    assert t.grid_after(2, 5) == (5, 2)


def test_canonical_specs_and_parse_errors():
    assert parse_transform("rot90:4").spec == "identity"
    assert parse_transform("ROT270").spec == "rot90:3"
    assert parse_transform("roll:0,0").spec == "identity"
    for bad in ("spin", "roll:1", "roll", "rot90:x", "flip-lr+zoom"):
        with pytest.raises(PosvitError):
            parse_transform(bad)
    with pytest.raises(PosvitError, match="whole"):
        parse_transform("roll:1,0", patch=16).apply(torch.zeros(1, 3, 40, 32))


def test_transform_sets():
    assert [t.spec for t in parse_transform_set("flips,roll:1,2")] == ["identity", "flip-lr", "flip-ud", "roll:1,2"]
    assert [t.spec for t in parse_transform_set("rolls:2")] == ["identity", "roll:0,1", "roll:1,0", "roll:1,1"]
    assert [t.spec for t in parse_transform_set("reference")] == ["identity", "flip-lr", "flip-ud", "rot90"]
    assert len(parse_transform_set("d4")) == 8
    assert [t.spec for t in parse_transform_set("identity,rot90:4,flip-ud+roll:0,4")] == ["identity",
                                                                                         "flip-ud+roll:0,4"]
    for bad in ("", "rolls:0", "rolls:x", "flips,spin"):
        with pytest.raises(PosvitError):
            parse_transform_set(bad)


@pytest.mark.parametrize("grid", [(3, 5), (4, 4)])
def test_average_over_transforms_inverts_before_averaging(grid):
    """An exactly equivariant model: averaging (inverted) equals the plain features; the reference's average
    without inversion does not."""
    h, w = grid
    transforms = parse_transform_set("d4,rolls:2", patch=PATCH)
    x = torch.randn(2, 3, h * PATCH, w * PATCH, generator=torch.Generator().manual_seed(1))

    def forward(xt):
        return {"final": _patch_pool(xt, PATCH)}, {"final": xt.mean(dim=(2, 3))[:, None, :]}

    tokens, prefix = average_over_transforms(forward, x, transforms)
    assert torch.allclose(tokens["final"], _patch_pool(x, PATCH), atol=1e-6)
    assert torch.allclose(prefix["final"], x.mean(dim=(2, 3))[:, None, :], atol=1e-6)
    # The reference's transform-average (no inversion) is spatially misaligned (and fails on rot90 of h != w).
    same_shape = [t for t in transforms if t.grid_after(h, w) == (h, w)]
    wrong = sum(_patch_pool(t.apply(x), PATCH) for t in same_shape) / len(same_shape)
    assert (wrong - _patch_pool(x, PATCH)).abs().max() > 0.1
