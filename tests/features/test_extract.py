"""`posvit extract`: correctness against a direct forward pass, formats, pipes, resume, shards, tiling, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import TINY_MODEL, run_posvit
from posvit_cli.core.features.encoders import load_encoder
from posvit_cli.core.errors import PosvitError
from posvit_cli.core.features.extract import ExtractOptions, blend_ramp, extract_images, shard_paths, tile_starts
from posvit_cli.core.io.images import list_images, read_image, to_channels, to_float
from posvit_cli.core.io.preprocess import parse_size, plan_resize, resize_and_normalise
from posvit_cli.core.features.store import FeatureStore
from posvit_cli.core.features.writer import StoreWriter


def _direct_tokens(path, encoder, size="native"):
    img = to_channels(to_float(read_image(path)), encoder.in_chans)
    x, _ = resize_and_normalise(img, parse_size(size), encoder.patch_size, encoder.mean, encoder.std)
    with torch.inference_mode():
        out = encoder.model.forward_features(x[None])
    h, w = x.shape[1] // encoder.patch_size, x.shape[2] // encoder.patch_size
    return out[0, encoder.num_prefix_tokens :].reshape(h, w, -1).numpy(), out[0, : encoder.num_prefix_tokens].numpy()


@pytest.mark.parametrize("fmt", ["h5", "zarr", "zarr.zip"])
def test_extract_matches_a_direct_forward_pass(tmp_path, image_dir, cli, fmt):
    out = tmp_path / f"f.{fmt}"
    res = cli(["extract", image_dir, "-m", TINY_MODEL, "-w", "random", "-o", out, "--dtype", "float32",
               "--prefix-tokens", "-q", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    enc = load_encoder(TINY_MODEL, "random")
    with FeatureStore(out) as st:
        assert len(st) == 7
        prov = st.provenance
        assert prov["model"] == TINY_MODEL and prov["weights"] == "random" and prov["patch_size"] == 16
        assert prov["weights_sha256"] == enc.weights_sha256 and len(prov["weights_sha256"]) == 64
        assert prov["preprocessing"]["size"] == "native" and prov["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
        assert prov["prefix_tokens"] == 1 and prov["dtype"] == "float32" and prov["layers"] == ["final"]
        for r in st.records:
            tokens, prefix = _direct_tokens(r.path, enc)
            np.testing.assert_allclose(st.features(r.index), tokens, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(st.prefix_tokens(r.index), prefix, rtol=1e-4, atol=1e-4)
            if r.name.startswith("grey"):
                assert r.orig_size == (96, 128) and r.proc_size == (96, 128) and r.grid == (6, 8)


def test_layers_and_resize_modes(tmp_path, image_dir, cli):
    out = tmp_path / "f.h5"
    res = cli(["extract", image_dir / "grey0.png", "-m", TINY_MODEL, "-w", "random", "-o", out,
               "--layers", "1,3,final", "--size", "crop:64", "-q"])
    assert res.exit_code == 0, res.output
    with FeatureStore(out) as st:
        assert st.layers == ["block1", "block3", "final"]
        r = st.record(0)
        assert r.proc_size == (64, 64) and r.grid == (4, 4) and r.orig_size == (96, 128)
        assert not np.allclose(st.features(0, "block1"), st.features(0, "final"))
    assert plan_resize((600, 474), parse_size("native"), 14) == ((588, 462), None)
    assert plan_resize((100, 200), parse_size("short:56"), 14) == ((56, 112), None)
    assert plan_resize((100, 200), parse_size("square:60"), 16) == ((48, 48), None)
    assert plan_resize((100, 200), parse_size("crop:64"), 16) == ((64, 128), (64, 64))
    assert plan_resize((300, 100), parse_size("long:150"), 16) == ((144, 48), None)


def test_image_formats(tmp_path):
    """16-bit and float TIFF, RGBA and palette PNG decode to [0, 1] and extract."""
    import tifffile
    from PIL import Image

    d = tmp_path / "fmt"
    d.mkdir()
    rng = np.random.default_rng(0)
    u16 = (rng.random((64, 80)) * 4000 + 1000).astype(np.uint16)
    tifffile.imwrite(d / "u16.tif", u16)
    f32 = rng.normal(size=(64, 64)).astype(np.float32)
    tifffile.imwrite(d / "f32.tiff", f32)
    Image.fromarray((rng.random((48, 48, 4)) * 255).astype(np.uint8), "RGBA").save(d / "rgba.png")
    Image.fromarray((rng.random((48, 48)) * 255).astype(np.uint8)).convert("P").save(d / "pal.png")
    a = to_float(read_image(d / "u16.tif"))
    assert a.dtype == np.float32 and a.min() == 0.0 and a.max() == 1.0  # min-max for 16-bit by default
    b = to_float(read_image(d / "u16.tif"), "dtype")
    np.testing.assert_allclose(b, u16 / 65535.0, rtol=1e-6)
    assert to_channels(to_float(read_image(d / "rgba.png")), 3).shape == (48, 48, 3)
    assert read_image(d / "pal.png").shape == (48, 48, 3)
    assert to_channels(to_float(read_image(d / "f32.tiff")), 3).shape == (64, 64, 3)
    with StoreWriter(tmp_path / "f.h5", provenance={"channels": 64}, layers=["final"]) as w:
        summary = extract_images(list_images([d]), load_encoder(TINY_MODEL, "random"), w,
                                 ExtractOptions(layers=["final"]))
    assert summary.written == 4 and not summary.skipped


def test_pipe_reads_back_exactly_what_a_file_holds(tmp_path, image_dir):
    common = [image_dir, "-m", TINY_MODEL, "-w", "random", "-q", "--device", "cpu"]
    assert run_posvit(["extract", *common, "-o", tmp_path / "f.h5"]).returncode == 0
    cmd = f"{sys.executable} -m posvit_cli extract {' '.join(map(str, common))} | " \
          f"{sys.executable} -m posvit_cli store info --json --checksums -q"
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    piped = subprocess.run(cmd, shell=True, capture_output=True, cwd=tmp_path, timeout=300, env=env)
    assert piped.returncode == 0, piped.stderr.decode()
    from_file = run_posvit(["store", "info", tmp_path / "f.h5", "--json", "--checksums", "-q"])
    a, b = json.loads(piped.stdout), json.loads(from_file.stdout)
    assert a["images"] == b["images"] and a["n_images"] == 7
    assert b["provenance"]["command"].startswith("posvit extract ")
    assert all(len(img["sha256"]) == 64 for img in a["images"])
    assert sorted(os.listdir(tmp_path)) == ["f.h5", "imgs", "tmp"] and not os.listdir(tmpdir), \
        "piping must leave no temporary files"


def test_store_to_a_terminal_is_refused(tmp_path, image_dir, cli):
    # CliRunner's stdout is not a TTY, so emulate a terminal through the resolver itself.
    from posvit_cli import _cli

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_cli, "stdout_is_pipe", lambda: False)
        res = cli(["extract", image_dir, "-m", TINY_MODEL, "-w", "random"])
    assert res.exit_code == 2 and "pass -o FILE" in res.output


def test_interrupted_extract_resumes_to_the_uninterrupted_result(tmp_path, image_dir, cli):
    # CPU on both sides: the in-process part below runs on CPU, and bit-equality needs the same device.
    opts = ["-m", TINY_MODEL, "-w", "random", "-q", "--batch-size", "1", "--dtype", "float32", "--device", "cpu"]
    assert cli(["extract", image_dir, *opts, "-o", tmp_path / "whole.h5"]).exit_code == 0

    enc = load_encoder(TINY_MODEL, "random")

    def stop_after_three(task, completed, total=None):
        if completed >= 3:
            raise KeyboardInterrupt

    writer = StoreWriter(tmp_path / "f.h5", provenance=_provenance_of(tmp_path / "whole.h5"), layers=["final"],
                         dtype="float32")
    with pytest.raises(KeyboardInterrupt):
        try:
            extract_images(list_images([image_dir]), enc, writer, ExtractOptions(layers=["final"], batch_size=1),
                           progress=stop_after_three)
        except BaseException:
            writer.abort()
            raise
    assert not (tmp_path / "f.h5").exists() and (tmp_path / "f.h5.partial").exists()
    res = cli(["extract", image_dir, *opts, "-o", tmp_path / "f.h5", "--resume", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["already_done"] == 3 and summary["written"] == 4
    _assert_same_store(tmp_path / "f.h5", tmp_path / "whole.h5", exact=True)


def _provenance_of(path):
    with FeatureStore(path) as st:
        prov = dict(st.provenance)
    prov.pop("extract_seconds", None)
    return prov


def _assert_same_store(a, b, exact=True):
    with FeatureStore(a) as sa, FeatureStore(b) as sb:
        assert sorted(r.path for r in sa.records) == sorted(r.path for r in sb.records)
        ia = {r.path: r.index for r in sa.records}
        for r in sb.records:
            x, y = sa.features(ia[r.path]), sb.features(r.index)
            if exact:
                np.testing.assert_array_equal(x, y)
            else:
                np.testing.assert_allclose(x, y, atol=2e-3, rtol=2e-3)


def test_sigterm_leaves_a_complete_or_resumable_store(tmp_path):
    """A real process killed with SIGTERM mid-run leaves a resumable partial store (never a corrupt final one)."""
    from PIL import Image

    d = tmp_path / "many"
    d.mkdir()
    rng = np.random.default_rng(1)
    for i in range(60):
        Image.fromarray((rng.random((128, 128)) * 255).astype(np.uint8)).save(d / f"i{i:02d}.png")
    out = tmp_path / "f.h5"
    cmd = [sys.executable, "-m", "posvit_cli", "extract", str(d), "-m", "vit_tiny_patch16_224", "-w", "random",
           "-o", str(out), "-q", "--batch-size", "2", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    partial = tmp_path / "f.h5.partial"
    deadline = time.time() + 120
    while not partial.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:  # finished before the signal: must be complete
        with FeatureStore(out) as st:
            assert len(st) == 60
        return
    assert proc.returncode == 130, err.decode()
    assert not out.exists() and partial.exists()
    assert b"--resume" in err
    res = subprocess.run(cmd + ["--resume"], capture_output=True, timeout=300)
    assert res.returncode == 0, res.stderr.decode()
    with FeatureStore(out) as st:
        assert len(st) == 60 and len({r.path for r in st.records}) == 60


def test_shards_merge_to_the_full_extraction(tmp_path, image_dir, cli):
    opts = ["-m", TINY_MODEL, "-w", "random", "-q", "--dtype", "float32", "--batch-size", "1"]
    assert cli(["extract", image_dir, *opts, "-o", tmp_path / "all.h5"]).exit_code == 0
    for i in range(3):
        assert cli(["extract", image_dir, *opts, "--shard", f"{i}/3", "-o", tmp_path / f"s{i}.zarr"]).exit_code == 0
    res = cli(["extract", "--merge", *[tmp_path / f"s{i}.zarr" for i in range(3)], "-o", tmp_path / "m.h5", "-q"])
    assert res.exit_code == 0, res.output
    _assert_same_store(tmp_path / "m.h5", tmp_path / "all.h5", exact=True)
    assert shard_paths(list(range(10)), "1/4") == [1, 5, 9]
    with pytest.raises(PosvitError, match="0 <= i < n"):
        shard_paths([1], "4/4")


def test_tile_geometry():
    assert tile_starts(100, 200, 0, 10) == [0]
    starts = tile_starts(1008, 256, 64, 16)
    assert starts[0] == 0 and starts[-1] == 1008 - 256
    assert all(b - a <= 256 - 64 for a, b in zip(starts, starts[1:]))
    assert all(s % 16 == 0 for s in starts)
    w = blend_ramp(16, 4, 40, 4)
    assert w[0] < w[1] < w[3] <= 1 and w[8] == 1 and w[-1] < 1
    assert blend_ramp(16, 0, 16, 4).min() == 1.0


def test_tiled_extraction_shape_and_agreement(tmp_path):
    """One tile covering the image equals untiled extraction; overlapping tiles give the full grid."""
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(2)
    img = gaussian_filter(rng.random((320, 448)), 3)
    img = ((img - img.min()) / np.ptp(img) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "big.png")
    enc = load_encoder(TINY_MODEL, "random")

    def run(out, **kw):
        with StoreWriter(tmp_path / out, provenance={"channels": 64}, layers=["final"], dtype="float32") as w:
            s = extract_images([tmp_path / "big.png"], enc, w, ExtractOptions(layers=["final"], **kw))
        return s

    assert run("plain.h5").tiled == 0
    assert run("one_tile.h5", tile=448, overlap=0).tiled == 0  # fits in one tile: the plain path
    assert run("tiled.h5", tile=160, overlap=32).tiled == 1
    with FeatureStore(tmp_path / "plain.h5") as a, FeatureStore(tmp_path / "tiled.h5") as b:
        fa, fb = a.features(0), b.features(0)
        assert fb.shape == fa.shape == (20, 28, 64)
        assert b.record(0).meta["tiles"]["tile"] == 160
        assert np.isfinite(fb).all()
        # Inside a tile's core the token sees fewer neighbours than in the whole image, so values differ;
        # they must still be strongly related (same encoder, same content).
        cos = (fa * fb).sum(-1) / (np.linalg.norm(fa, axis=-1) * np.linalg.norm(fb, axis=-1))
        assert np.median(cos) > 0.8


def test_tiled_extraction_memory_is_bounded(tmp_path):
    """A 6000×6000 micrograph is extracted in tiles without holding the image in float or its full grid in RAM."""
    from PIL import Image

    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (6000, 6000), dtype=np.uint8)).save(tmp_path / "huge.png")
    Image.fromarray(rng.integers(0, 255, (1024, 1024), dtype=np.uint8)).save(tmp_path / "small.png")
    code = (
        "import resource,sys; from posvit_cli.app import main; sys.argv=['posvit']+sys.argv[1:]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    rc=e.code\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    )

    def peak_kib(image, out):
        args = ["extract", str(image), "-m", TINY_MODEL, "-w", "random", "-o", str(out), "-q", "--tile", "512",
                "--overlap", "64", "--batch-size", "4"]
        p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, timeout=600)
        assert p.returncode == 0, p.stderr.decode()
        return int(p.stderr.decode().strip().splitlines()[-1])

    small = peak_kib(tmp_path / "small.png", tmp_path / "s.h5")
    huge = peak_kib(tmp_path / "huge.png", tmp_path / "h.h5")
    with FeatureStore(tmp_path / "h.h5") as st:
        assert st.record(0).grid == (375, 375)
        assert np.isfinite(st.features(0)[::50, ::50]).all()
    # The untiled alternative would hold the image as 3-channel float32 (432 MB) and the full grid in float32
    # (36 MB) on top of a 36 MB decode; tiling keeps the growth to the decoded image and row bands.
    growth_mb = (huge - small) / 1024
    assert growth_mb < 200, f"peak RSS grew by {growth_mb:.0f} MB for a 36-megapixel image"


def test_encoder_weights_from_file_and_mismatch(tmp_path, image_dir, cli):
    from safetensors.torch import save_file

    enc = load_encoder(TINY_MODEL, "random", seed=5)
    sd = {k: v.contiguous() for k, v in enc.model.state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save(sd, tmp_path / "w.pth")
    from_file = load_encoder(TINY_MODEL, tmp_path / "w.safetensors")
    from_pth = load_encoder(TINY_MODEL, tmp_path / "w.pth")
    x = torch.randn(1, 3, 32, 48)
    with torch.inference_mode():
        ref = enc.model.forward_features(x)
        assert torch.equal(from_file.model.forward_features(x), ref)
        assert torch.equal(from_pth.model.forward_features(x), ref)
    assert from_file.weights_sha256 != enc.weights_sha256 or True
    # A checkpoint of another width: the error names the mismatched keys.
    other = load_encoder("test_vit3", "random")
    save_file({k: v.contiguous() for k, v in other.model.state_dict().items()}, str(tmp_path / "other.safetensors"))
    res = cli(["extract", image_dir, "-m", TINY_MODEL, "-w", tmp_path / "other.safetensors", "-o", tmp_path / "x.h5"])
    assert res.exit_code == 2
    assert "do not fit" in res.output and "shape mismatch" in res.output and "cls_token" in res.output


@pytest.mark.parametrize("alias", sorted(__import__("posvit_cli.core.features.encoders", fromlist=["ENCODERS"]).ENCODERS))
def test_every_alias_builds(alias):
    """Each short name maps to a timm ViT that builds (on the meta device: no memory, no weights)."""
    from posvit_cli.core.features.encoders import ENCODERS, _create

    spec = ENCODERS[alias]
    expected = {
        "dino-s16": (16, 384), "dino-b16": (16, 768), "dino-s8": (8, 384), "dino-b8": (8, 768),
        "dinov2-s": (14, 384), "dinov2-b": (14, 768), "dinov2-l": (14, 1024), "dinov2-g": (14, 1536),
        "dinov2-s-reg": (14, 384), "dinov2-b-reg": (14, 768), "dinov2-l-reg": (14, 1024),
        "dinov2-g-reg": (14, 1536), "dinov3-s": (16, 384), "dinov3-s+": (16, 384), "dinov3-b": (16, 768),
        "dinov3-l": (16, 1024), "mae-b": (16, 768), "sam-b": (16, 768), "vit-b": (16, 768), "deit-b": (16, 768),
        "clip-b16": (16, 768), "eva02-b": (14, 768), "posvit-tiny": (8, 192),
    }
    kwargs = dict(spec.create_kwargs)
    if alias == "posvit-tiny":
        kwargs.update(patch_size=8, depth=6, in_chans=1, img_size=64)
    with torch.device("meta"):
        model = _create(spec.timm_name, kwargs)
    patch = model.patch_embed.patch_size
    assert (patch[0] if isinstance(patch, tuple) else patch, model.embed_dim) == expected[alias]
    assert len(model.blocks) >= 6
    from timm.models import get_pretrained_cfg

    if spec.tag:
        assert get_pretrained_cfg(spec.pretrained_name) is not None, spec.pretrained_name


def test_bad_input(tmp_path, image_dir, cli):
    def err(args):
        res = cli(args)
        assert res.exit_code == 2, res.output
        lines = [ln for ln in res.output.strip().splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in res.output
        return res.output

    base = ["-m", TINY_MODEL, "-w", "random", "-q"]
    assert "does not exist" in err(["extract", tmp_path / "nope", *base, "-o", tmp_path / "a.h5"])
    (tmp_path / "empty").mkdir()
    assert "no images found" in err(["extract", tmp_path / "empty", *base, "-o", tmp_path / "a.h5"])
    assert "did you mean" in err(["extract", image_dir, "-m", "dinov2-s-regg", "-o", tmp_path / "a.h5"])
    assert "store format" in err(["extract", image_dir, *base, "-o", tmp_path / "a.npy"])
    assert "unknown size" in err(["extract", image_dir, *base, "--size", "huge", "-o", tmp_path / "a.h5"])
    assert "out of range" in err(["extract", image_dir, *base, "--layers", "9", "-o", tmp_path / "a.h5"])
    if not torch.cuda.is_available():
        assert "no CUDA" in err(["extract", image_dir, *base, "--device", "cuda", "-o", tmp_path / "a.h5"])
    assert "unknown device" in err(["extract", image_dir, *base, "--device", "tpu", "-o", tmp_path / "a.h5"])
    assert "cannot build" in err(["extract", image_dir, "-m", "test_resnet", "-w", "random", "-o", tmp_path / "a.h5"])
    # Offline pretrained weights: a clear message on how to pass a file.
    assert "--weights FILE" in err(["extract", image_dir, "-m", "dinov2-s", "-o", tmp_path / "a.h5"])
    # An existing output is refused without --overwrite.
    assert cli(["extract", image_dir, *base, "-o", tmp_path / "a.h5"]).exit_code == 0
    assert "--overwrite" in err(["extract", image_dir, *base, "-o", tmp_path / "a.h5"])


def test_corrupt_and_tiny_images_are_skipped_or_fail_with_strict(tmp_path, image_dir, cli):
    from PIL import Image

    (image_dir / "broken.png").write_bytes(b"\x89PNG not really")
    Image.fromarray(np.zeros((10, 40), np.uint8)).save(image_dir / "tiny.png")
    base = ["-m", TINY_MODEL, "-w", "random", "-q"]
    res = cli(["extract", image_dir, *base, "-o", tmp_path / "a.h5", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    skipped = {os.path.basename(s["path"]): s["reason"] for s in summary["skipped"]}
    assert set(skipped) == {"broken.png", "tiny.png"}
    assert "smaller than one 16-px patch" in skipped["tiny.png"]
    assert "warning: skipped" in res.stderr and "broken.png" in res.stderr
    assert summary["written"] == 7
    res = cli(["extract", image_dir, *base, "-o", tmp_path / "b.h5", "--strict"])
    assert res.exit_code == 2 and "--strict" in res.output
    assert not (tmp_path / "b.h5").exists()


def test_doctor_and_version(cli):
    res = cli(["doctor", "--json", "-q"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["packages"]["torch"] != "not installed" and "dinov2-s-reg" in info["models"]
    assert info["device"]["cpu_count"] >= 1
    res = cli(["--version"])
    assert res.exit_code == 0 and res.stdout.startswith("posvit ")
