"""`extract --compile`: compiled features match eager within cosine 0.99999, provenance says so, failures fall back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY_MODEL
from posvit_cli.core.errors import PosvitWarning
from posvit_cli.core.features.compiled import COSINE_TOLERANCE, CompiledForward, min_token_cosine
from posvit_cli.core.features.encoders import load_encoder
from posvit_cli.core.features.store import FeatureStore


def _three_images(image_dir):
    return [image_dir / "grey0.png", image_dir / "grey1.png", image_dir / "colour.png"]


def _extract(cli, paths, out, *extra):
    """Extract through the CLI: (provenance, features per image, the CLI's output with its warning lines)."""
    res = cli(["extract", *paths, "-m", TINY_MODEL, "-w", "random", "-o", out, "--dtype", "float32", "-q",
               "--device", "cpu", "--batch-size", "2", *extra])
    assert res.exit_code == 0, res.output
    with FeatureStore(out) as st:
        return st.provenance, [st.features(r.index) for r in st.records], res.output


def _cosines(a, b):
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_min_token_cosine_finds_the_one_rotated_token():
    x = torch.randn(2, 3, 4, 8)
    y = x.clone()
    y[1, 2, 3] = -y[1, 2, 3]  # one token reversed: cosine -1
    assert min_token_cosine({"final": x}, {"final": x.clone()}) == pytest.approx(1.0, abs=1e-6)
    assert min_token_cosine({"final": x}, {"final": y}) == pytest.approx(-1.0, abs=1e-6)


def test_failed_compile_falls_back_to_eager_with_one_warning(tmp_path, image_dir, cli, monkeypatch, one_torch_thread):
    paths = _three_images(image_dir)
    prov_eager, eager, _ = _extract(cli, paths, tmp_path / "eager.h5")
    assert prov_eager["compile"] == {"requested": False, "used": False}

    def no_compiler(*a, **k):
        raise RuntimeError("no C compiler found")

    monkeypatch.setattr(torch, "compile", no_compiler)
    prov, feats, output = _extract(cli, paths, tmp_path / "fallback.h5", "--compile")
    ours = [line for line in output.splitlines() if line.startswith("warning:") and "torch.compile" in line]
    assert len(ours) == 1 and "no C compiler found" in ours[0], output
    assert prov["compile"]["requested"] is True and prov["compile"]["used"] is False
    assert "no C compiler found" in prov["compile"]["fallback"]
    assert len(feats) == len(eager) == 3
    for f, e in zip(feats, eager):
        np.testing.assert_array_equal(f, e)


def test_compiled_output_far_from_eager_is_refused(monkeypatch, one_torch_thread):
    """A compiled graph whose tokens drift beyond the tolerance is not used: that shape runs eagerly."""
    enc = load_encoder(TINY_MODEL, "random")
    x = torch.randn(2, 3, 32, 48)

    def drifting(fn, **kw):
        def run(x, layers, keep_prefix=False):
            tokens, prefix = fn(x, layers, keep_prefix)
            return {k: v + 0.05 * v.abs().mean() * torch.randn_like(v) for k, v in tokens.items()}, prefix
        return run

    monkeypatch.setattr(torch, "compile", drifting)
    fwd = CompiledForward(enc)
    with torch.inference_mode(), pytest.warns(PosvitWarning, match="differ from eager"):
        tokens, _ = fwd(x, ["final"])
    with torch.inference_mode():
        reference, _ = enc.forward_tokens(x, ["final"])
        again, _ = fwd(x, ["final"])
    torch.testing.assert_close(tokens["final"], reference["final"], rtol=0, atol=0)
    torch.testing.assert_close(again["final"], reference["final"], rtol=0, atol=0)
    assert not fwd.used and fwd.provenance()["grids_compiled"] == []


@pytest.mark.slow
def test_compiled_features_match_eager_per_token(tmp_path, image_dir, cli):
    paths = _three_images(image_dir)
    _, eager, _ = _extract(cli, paths, tmp_path / "eager.h5")
    prov, feats, output = _extract(cli, paths, tmp_path / "compiled.h5", "--compile")
    assert "warning:" not in output  # neither a fallback nor a refused shape
    assert prov["compile"]["requested"] is True and prov["compile"]["used"] is True
    assert prov["compile"]["fallback"] is None
    assert sorted(map(tuple, prov["compile"]["grids_compiled"])) == [(4, 4), (6, 8)]
    for f, e in zip(feats, eager):
        assert f.shape == e.shape
        assert _cosines(f, e).min() >= COSINE_TOLERANCE
