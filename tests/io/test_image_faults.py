"""Image reading faults: a TIFF decompression bomb, multi-page stacks, NaN pixels, tile sizes off the patch grid."""

from __future__ import annotations

import os
import tracemalloc
import types
import zlib

import numpy as np
import pytest
import tifffile

from conftest import TINY_MODEL
from posvit_cli.core.errors import PosvitError, PosvitWarning
from posvit_cli.core.features.encoders import load_encoder
from posvit_cli.core.features.extract import ExtractOptions, extract_images
from posvit_cli.core.features.store import FeatureStore
from posvit_cli.core.features.writer import StoreWriter
from posvit_cli.core.io.images import image_size, list_images, read_image, to_float
from posvit_cli.core.io.preprocess import nearest_patch_multiples, suggested_tile


def _bomb_tiff(path, side=30000, tile=1024):
    """A ~1 MB zlib TIFF declaring ``side``×``side`` uint8 pixels (all zero), written without holding them."""
    chunk = zlib.compress(bytes(tile * tile))
    n = -(-side // tile)
    with tifffile.TiffWriter(str(path)) as tw:
        tw.write((chunk for _ in range(n * n)), shape=(side, side), dtype=np.uint8, tile=(tile, tile),
                 compression="zlib")
    return path


@pytest.fixture
def no_tiff_decoding(monkeypatch):
    """Record (and refuse) any decoding of TIFF pixels."""
    calls = []

    def refuse(*a, **k):
        calls.append(a)
        raise AssertionError("TIFF pixels decoded")

    for owner, name in ((tifffile, "imread"), (tifffile.TiffFile, "asarray"), (tifffile.TiffPage, "asarray"),
                        (tifffile.TiffFrame, "asarray"), (tifffile.TiffPageSeries, "asarray")):
        monkeypatch.setattr(owner, name, refuse)
    return calls


_ENCODER = []


def _tiny():
    if not _ENCODER:
        _ENCODER.append(load_encoder(TINY_MODEL, "random"))
    return _ENCODER[0]


def _stub_encoder(patch):
    """What extraction reads of an encoder before the first forward pass (an 8-px-patch model)."""
    return types.SimpleNamespace(patch_size=patch, name=f"stub{patch}", in_chans=3, embed_dim=8,
                                 mean=(0.5,) * 3, std=(0.25,) * 3)


def _extract(paths, out, encoder=None, **opts):
    enc = encoder or _tiny()
    with StoreWriter(out, provenance={"channels": enc.embed_dim}, layers=["final"], dtype="float32") as w:
        return extract_images(paths, enc, w, ExtractOptions(layers=["final"], workers=0, **opts))


def test_huge_tiff_is_refused_from_its_header_without_decoding(tmp_path, no_tiff_decoding):
    bomb = _bomb_tiff(tmp_path / "bomb.tif")
    assert os.path.getsize(bomb) < 2_000_000
    assert image_size(bomb) == (30000, 30000)
    with pytest.raises(PosvitError, match=r"30000×30000 px exceeds --max-side 2048"):
        _extract([bomb], tmp_path / "g.h5", _stub_encoder(8), strict=True)  # imports before measuring
    tracemalloc.start()
    try:
        with pytest.warns(PosvitWarning, match="skipped"):
            summary = _extract([bomb], tmp_path / "f.h5", _stub_encoder(8))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert no_tiff_decoding == []
    assert summary.written == 0 and len(summary.skipped) == 1
    reason = summary.skipped[0][1]
    assert "30000×30000 px" in reason and "--max-side 2048" in reason and "not decoded" in reason
    # The model's patch is 8 px: the hint names a tile on its grid, not DINOv2's 518.
    assert "--tile 512" in reason
    assert peak < 50 * 2**20  # the decoded image would be 900 MB


def test_max_side_hint_follows_the_patch_size():
    assert suggested_tile(14) == 518 and suggested_tile(16) == 512 and suggested_tile(8) == 512
    assert suggested_tile(16) % 16 == 0 and suggested_tile(8) % 8 == 0
    assert nearest_patch_multiples(518, 8) == [512, 520] and nearest_patch_multiples(5, 8) == [8]


def test_tile_off_the_patch_grid_is_refused(tmp_path, image_dir, cli):
    paths = list_images([image_dir])
    with pytest.raises(PosvitError, match=r"--tile 200: 200 px is not a multiple of the 16-px patch of test_vit "
                                          r"\(use 192 or 208\)"):
        _extract(paths, tmp_path / "a.h5", tile=200, overlap=32)
    with pytest.raises(PosvitError, match=r"--overlap 20: .*\(use 16 or 32\)"):
        _extract(paths, tmp_path / "b.h5", tile=64, overlap=20)
    res = cli(["extract", image_dir, "-m", TINY_MODEL, "-w", "random", "-o", tmp_path / "c.h5", "-q",
               "--tile", "518"])
    assert res.exit_code == 2 and "use 512 or 528" in res.output, res.output
    assert not (tmp_path / "c.h5").exists()
    # A tile on the grid is used as given (provenance records it).
    assert _extract(paths, tmp_path / "d.h5", tile=64, overlap=16).tiled == 6
    with FeatureStore(tmp_path / "d.h5") as st:
        assert st.record(0).meta["tiles"]["tile"] == 64


def test_nan_pixels_are_replaced_with_a_warning(tmp_path):
    img = np.linspace(0.25, 0.75, 40 * 48, dtype=np.float32).reshape(40, 48)
    img[3, 4] = img[10, 11] = img[20, 30] = np.nan
    img[5, 5] = np.inf
    tifffile.imwrite(tmp_path / "nan.tif", img)
    with pytest.warns(PosvitWarning, match=r"nan\.tif': 3 NaN and 1 infinite of 1920 pixel values replaced with "
                                           r"the image's lowest finite value 0\.25") as rec:
        arr = read_image(tmp_path / "nan.tif")
    assert len([w for w in rec if issubclass(w.category, PosvitWarning)]) == 1
    assert np.isfinite(arr).all() and arr[3, 4] == np.float32(0.25) and arr[0, 1] == img[0, 1]
    # The dtype rule clips floats: a NaN would have passed through it to the encoder.
    assert np.isfinite(to_float(arr, "dtype")).all()
    tifffile.imwrite(tmp_path / "ok.tif", np.nan_to_num(img))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_image(tmp_path / "ok.tif")


@pytest.fixture
def stack_tif(tmp_path):
    rng = np.random.default_rng(0)
    stack = (rng.random((3, 48, 64)) * 255).astype(np.uint8)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack, photometric="minisblack")  # three pages, not one RGB page
    return path, stack


def test_multi_page_tiff_warns_and_can_be_split_into_pages(stack_tif, tmp_path):
    path, stack = stack_tif
    with pytest.warns(PosvitWarning, match=r"stack\.tif' is a stack of 3 pages \(shape \(3, 48, 64\)\); only the "
                                           r"first page is read"):
        first = read_image(path)
    np.testing.assert_array_equal(first, stack[0])
    assert list_images([path]) == [path]
    pages = list_images([path], tiff_pages="all")
    assert [str(p) for p in pages] == [f"{path}#page={i}" for i in range(3)]
    for i, p in enumerate(pages):
        np.testing.assert_array_equal(read_image(p), stack[i])
        assert image_size(p) == (48, 64)
    with pytest.raises(PosvitError, match="has 3 pages"):
        read_image(f"{path}#page=3")
    (tmp_path / "list.txt").write_text("stack.tif#page=2  # the last page\n")
    assert [str(p) for p in list_images([tmp_path / "list.txt"])] == [f"{path}#page=2"]
    with pytest.raises(PosvitError, match="first or all"):
        list_images([path], tiff_pages="some")


def test_extract_tiff_pages_all(stack_tif, tmp_path, cli):
    path, stack = stack_tif
    out = tmp_path / "f.h5"
    res = cli(["extract", path, "-m", TINY_MODEL, "-w", "random", "-o", out, "-q", "--tiff-pages", "all"])
    assert res.exit_code == 0, res.output
    with FeatureStore(out) as st:
        assert len(st) == 3
        assert sorted(r.path for r in st.records) == [f"{path}#page={i}" for i in range(3)]
        assert sorted(r.name for r in st.records) == ["stack_page0", "stack_page1", "stack_page2"]
    res = cli(["extract", path, "-m", TINY_MODEL, "-w", "random", "-o", tmp_path / "g.h5"])
    assert res.exit_code == 0 and "is a stack of 3 pages" in res.output, res.output
    with FeatureStore(tmp_path / "g.h5") as st:
        assert len(st) == 1
