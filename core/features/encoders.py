"""Encoders: a registry of named ViTs (timm architectures), weight loading, and patch-token extraction.

Short names such as ``dinov2-s-reg`` map to a timm architecture and pretrained tag (:data:`ENCODERS`); any other
timm model name works too. Weights come from timm's pretrained source (``weights="pretrained"``; online or from
the local Hugging Face cache), from a local ``.safetensors``/``.pth`` file, from a posvit encoder checkpoint
(which also names its base model and any modification such as ALiBi attention), or are random (``"random"``,
seeded, for tests and smoke runs).

The :class:`Encoder` returns, for a batch of normalised images, the patch-token grid ``(B, h, w, C)`` of each
requested layer (final normed tokens, or normed outputs of intermediate blocks) and optionally the prefix tokens.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from posvit_cli.core.errors import PosvitError, PosvitWarning
from posvit_cli.core.fileio import atomic_path, json_text, sha256_file

__all__ = [
    "ENCODERS",
    "Encoder",
    "EncoderSpec",
    "MODIFIERS",
    "bundled_weights_path",
    "load_encoder",
    "read_checkpoint_meta",
    "register_checkpoint_adapter",
    "register_modifier",
    "resolve_spec",
    "save_encoder_checkpoint",
    "weights_available_offline",
]

CHECKPOINT_FORMAT = "posvit-encoder"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """A named encoder: the timm architecture, its pretrained weights tag and how to build it.

    Attributes
    ----------
    name : str
        The posvit name (``dinov2-s-reg``) or the timm name for models outside the registry.
    timm_name : str
        timm architecture name without tag (``vit_small_patch14_reg4_dinov2``).
    tag : str or None
        timm pretrained tag (``lvd142m``); ``None`` for the architecture's default.
    description : str
        One line for listings.
    create_kwargs : dict
        Extra keyword arguments for :func:`timm.create_model` (architecture overrides).
    bundled : str or None
        File name of weights shipped with posvit (``posvit_cli.models``).
    """

    name: str
    timm_name: str
    tag: str | None = None
    description: str = ""
    create_kwargs: dict = dataclasses.field(default_factory=dict)
    bundled: str | None = None

    @property
    def pretrained_name(self) -> str:
        return f"{self.timm_name}.{self.tag}" if self.tag else self.timm_name


def _spec(name, timm_name, tag, description, **kw) -> EncoderSpec:
    return EncoderSpec(name=name, timm_name=timm_name, tag=tag, description=description, **kw)


#: The encoders the references compare, by short name.
ENCODERS: dict[str, EncoderSpec] = {
    s.name: s
    for s in [
        _spec("dino-s16", "vit_small_patch16_224", "dino", "DINO ViT-S/16 (Caron et al. 2021)"),
        _spec("dino-b16", "vit_base_patch16_224", "dino", "DINO ViT-B/16"),
        _spec("dino-s8", "vit_small_patch8_224", "dino", "DINO ViT-S/8"),
        _spec("dino-b8", "vit_base_patch8_224", "dino", "DINO ViT-B/8"),
        _spec("dinov2-s", "vit_small_patch14_dinov2", "lvd142m", "DINOv2 ViT-S/14"),
        _spec("dinov2-b", "vit_base_patch14_dinov2", "lvd142m", "DINOv2 ViT-B/14"),
        _spec("dinov2-l", "vit_large_patch14_dinov2", "lvd142m", "DINOv2 ViT-L/14"),
        _spec("dinov2-g", "vit_giant_patch14_dinov2", "lvd142m", "DINOv2 ViT-g/14"),
        _spec("dinov2-s-reg", "vit_small_patch14_reg4_dinov2", "lvd142m", "DINOv2 ViT-S/14 with 4 registers"),
        _spec("dinov2-b-reg", "vit_base_patch14_reg4_dinov2", "lvd142m", "DINOv2 ViT-B/14 with 4 registers"),
        _spec("dinov2-l-reg", "vit_large_patch14_reg4_dinov2", "lvd142m", "DINOv2 ViT-L/14 with 4 registers"),
        _spec("dinov2-g-reg", "vit_giant_patch14_reg4_dinov2", "lvd142m", "DINOv2 ViT-g/14 with 4 registers"),
        _spec("dinov3-s", "vit_small_patch16_dinov3", "lvd1689m", "DINOv3 ViT-S/16 (RoPE, 4 storage tokens)"),
        _spec("dinov3-s+", "vit_small_plus_patch16_dinov3", "lvd1689m", "DINOv3 ViT-S+/16"),
        _spec("dinov3-b", "vit_base_patch16_dinov3", "lvd1689m", "DINOv3 ViT-B/16"),
        _spec("dinov3-l", "vit_large_patch16_dinov3", "lvd1689m", "DINOv3 ViT-L/16"),
        _spec("mae-b", "vit_base_patch16_224", "mae", "MAE ViT-B/16 (He et al. 2022)"),
        _spec("sam-b", "samvit_base_patch16", "sa1b", "SAM ViT-B/16 image encoder (last block, no neck)"),
        _spec("vit-b", "vit_base_patch16_224", "augreg2_in21k_ft_in1k", "supervised ViT-B/16 (ImageNet-21k/1k)"),
        _spec("deit-b", "deit_base_patch16_224", "fb_in1k", "DeiT ViT-B/16 (supervised, ImageNet-1k)"),
        _spec("clip-b16", "vit_base_patch16_clip_224", "openai", "CLIP ViT-B/16 image tower (OpenAI)"),
        _spec("eva02-b", "eva02_base_patch14_224", "mim_in22k", "EVA-02 ViT-B/14 (MIM, ImageNet-22k)"),
        _spec(
            "posvit-tiny",
            "vit_tiny_patch16_224",
            None,
            "posvit's own MAE-trained ViT (width 192, depth 6, patch 8, greyscale), shipped with posvit",
            # The architecture is stated here too (the checkpoint repeats it), so `--weights random` builds the
            # same network: the untrained control of the model card.
            create_kwargs=dict(patch_size=8, depth=6, num_heads=3, in_chans=1, img_size=64),
            bundled="posvit-tiny.safetensors",
        ),
    ]
}


def _suggest(name: str) -> str:
    import timm

    candidates = list(ENCODERS) + timm.list_models()
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else "; `posvit doctor --models` lists the short names"


def resolve_spec(name: str) -> EncoderSpec:
    """Return the spec for a posvit short name or any timm model name (``arch`` or ``arch.tag``).

    Raises
    ------
    PosvitError
        If the name is neither a registered short name nor a timm architecture; close names are suggested.
    """
    import timm

    if name in ENCODERS:
        return ENCODERS[name]
    arch, _, tag = name.partition(".")
    if timm.is_model(arch):
        return EncoderSpec(name=name, timm_name=arch, tag=tag or None, description="timm model")
    raise PosvitError(f"unknown model '{name}'{_suggest(name)}")


# --------------------------------------------------------------------------------------------------------------
# Checkpoint files


def state_dict_sha256(state_dict: dict) -> str:
    """SHA-256 over sorted key names, dtypes, shapes and raw bytes of a state dict (weights from no file)."""
    import torch

    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_checkpoint_meta(path: str | os.PathLike) -> dict | None:
    """The posvit metadata of a ``.safetensors`` encoder checkpoint, or None for a plain weights file."""
    p = Path(path)
    if p.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise PosvitError(f"'{path}' is not a readable .safetensors file ({exc})") from exc
    raw = meta.get("posvit")
    if not raw:
        return None
    info = json.loads(raw)
    return info if info.get("format") == CHECKPOINT_FORMAT else None


def load_weights_file(path: str | os.PathLike) -> dict:
    """Load a state dict from ``.safetensors`` or a ``.pth``/``.pt`` file, safely (no pickle code execution).

    Common wrappers are unpacked: ``{"model": ...}``, ``{"state_dict": ...}``, ``{"teacher": ...}`` and key
    prefixes ``module.``, ``backbone.``, ``model.``.
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise PosvitError(f"weights file '{path}' does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(p))
        except Exception as exc:
            raise PosvitError(f"'{path}' is not a readable .safetensors file ({exc})") from exc
    else:
        try:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise PosvitError(
                f"cannot load '{path}' safely as a weights file ({type(exc).__name__}); "
                "convert it to .safetensors or save a plain state dict"
            ) from exc
    for key in ("model", "state_dict", "teacher", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict):
        raise PosvitError(f"'{path}' does not hold a state dict")
    for prefix in ("module.", "backbone.", "model."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def save_encoder_checkpoint(path: str | os.PathLike, encoder: Encoder, extra: dict | None = None,
                            dtype=None) -> Path:
    """Write an encoder's weights with posvit metadata, so ``load_encoder(weights=path)`` rebuilds it alone.

    The file is written to a temporary name and renamed, so it is either complete or absent.

    Parameters
    ----------
    dtype : torch.dtype, optional
        Store floating-point tensors in this dtype (``torch.float16`` halves a shipped file); loading casts
        them back to the model's dtype. Default: as they are.
    """
    from safetensors.torch import save_file

    meta = dict(encoder.checkpoint_meta())
    meta.update(extra or {})
    path = Path(path)
    sd = {k: v.detach().cpu().contiguous() for k, v in encoder.model.state_dict().items()}
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    with atomic_path(path, keep_suffix=True) as tmp:
        save_file(sd, tmp, metadata={"posvit": json_text(meta, indent=None)})
    return path


def bundled_weights_path(filename: str) -> Path:
    """Path of a weights file shipped in ``posvit_cli.models`` (the repository's ``examples/models``)."""
    try:
        ref = resources.files("posvit_cli.models") / filename
    except ModuleNotFoundError as exc:
        raise PosvitError("posvit's bundled models are not installed (reinstall posvit)") from exc
    path = Path(str(ref))
    if not path.is_file():
        raise PosvitError(f"the bundled weights '{filename}' are missing from this installation")
    return path


def weights_available_offline(spec: EncoderSpec) -> str | None:
    """Where the encoder's pretrained weights can be loaded from without a network, or None."""
    if spec.bundled:
        try:
            return str(bundled_weights_path(spec.bundled))
        except PosvitError:
            return None
    try:
        from huggingface_hub import try_to_load_from_cache
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(spec.pretrained_name)
    except Exception:
        return None
    if cfg is None or not getattr(cfg, "hf_hub_id", None):
        return None
    for filename in ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(cfg.hf_hub_id, filename)
        if isinstance(hit, str):
            return hit
    return None


# --------------------------------------------------------------------------------------------------------------
# Modifiers (ALiBi attention and friends register here)

#: Functions that change a built model in place, by name: ``fn(encoder, config) -> None``. A posvit checkpoint
#: lists the modifications to replay (``"modifications": [{"name": ..., "config": {...}}]``).
MODIFIERS: dict[str, Callable[[Encoder, dict], None]] = {}


def register_modifier(name: str) -> Callable:
    def deco(fn: Callable[[Encoder, dict], None]) -> Callable:
        MODIFIERS[name] = fn
        return fn

    return deco


#: Functions that fit a modification's settings to the weights it will load, by modifier name:
#: ``fn(config, state_dict) -> config``. They let a weights file in another program's layout (e.g. ALiBi slopes
#: stored per block) load with the plain ``--method`` settings.
CHECKPOINT_ADAPTERS: dict[str, Callable[[dict, dict], dict]] = {}


def register_checkpoint_adapter(name: str) -> Callable:
    def deco(fn: Callable[[dict, dict], dict]) -> Callable:
        CHECKPOINT_ADAPTERS[name] = fn
        return fn

    return deco


#: Where each known modifier is defined. Importing that module registers it; the table is explicit so that a name
#: read from a checkpoint can only ever select one of these, never build a module path.
_MODIFIER_MODULES = {
    "alibi": "posvit_cli.core.features.alibi",
    "nope": "posvit_cli.core.features.alibi",
}


def _load_modifier(name: str) -> Callable[[Encoder, dict], None]:
    if name not in MODIFIERS and name in _MODIFIER_MODULES:
        importlib.import_module(_MODIFIER_MODULES[name])
    if name not in MODIFIERS:
        raise PosvitError(f"this checkpoint needs the '{name}' modification, which this posvit does not know")
    return MODIFIERS[name]


# --------------------------------------------------------------------------------------------------------------
# The encoder


class Encoder:
    """A ViT ready for feature extraction.

    Attributes
    ----------
    model : torch.nn.Module
        The timm model, in eval mode.
    spec : EncoderSpec
    patch_size : int
        Pixels per token side.
    embed_dim : int
        Channels per token.
    depth : int
        Number of transformer blocks.
    num_prefix_tokens : int
        CLS + register tokens in front of the patch tokens.
    in_chans : int
        Input channels the model takes (3, or 1 for greyscale encoders).
    mean, std : tuple of float
        Input normalisation, one value per input channel.
    weights : str
        ``"pretrained"``, ``"random"`` or the weights file path.
    weights_sha256 : str
        SHA-256 of the weights file, or of the state dict when the weights came from no single file.
    modifications : list of dict
        Changes applied after building (``{"name": "alibi", "config": {...}}``).
    """

    def __init__(self, model, spec: EncoderSpec, *, weights: str, weights_sha256: str, mean, std,
                 create_kwargs: dict | None = None, base_meta: dict | None = None):
        self.model = model.eval()
        self.spec = spec
        self.weights = weights
        self.weights_sha256 = weights_sha256
        self.create_kwargs = dict(create_kwargs or {})
        self.modifications: list[dict] = []
        self.base_meta = dict(base_meta or {})
        pe = model.patch_embed
        ps = pe.patch_size
        self.patch_size = int(ps[0] if isinstance(ps, (tuple, list)) else ps)
        self.embed_dim = int(getattr(model, "embed_dim", None) or model.num_features)
        self.depth = len(model.blocks)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        self.in_chans = int(pe.proj.in_channels)
        self.mean = tuple(float(x) for x in mean)[: self.in_chans]
        self.std = tuple(float(x) for x in std)[: self.in_chans]
        if len(self.mean) < self.in_chans:
            self.mean = (self.mean[0],) * self.in_chans
            self.std = (self.std[0],) * self.in_chans
        self.is_sam = type(model).__name__ == "VisionTransformerSAM"

    # -- description -------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    def layer_names(self, layers: Sequence[str | int] | None) -> list[str]:
        """Canonical, de-duplicated layer names (``"final"``, ``"block{i}"``) for a request.

        ``"all"`` expands to every block. Block ``depth - 1`` is the final layer and is named ``"final"``.
        """
        if not layers:
            return ["final"]
        out: list[str] = []
        for item in layers:
            s = str(item).strip()
            if s == "all":
                names = [f"block{i}" for i in range(self.depth - 1)] + ["final"]
            elif s in ("final", "last", "-1"):
                names = ["final"]
            else:
                digits = s[5:] if s.startswith("block") else s
                try:
                    i = int(digits)
                except ValueError:
                    raise PosvitError(f"unknown layer '{item}': use 'final', 'all' or block indices") from None
                if i < 0:
                    i += self.depth
                if not 0 <= i < self.depth:
                    raise PosvitError(f"layer {item} is out of range: {self.name} has blocks 0..{self.depth - 1}")
                names = ["final" if i == self.depth - 1 else f"block{i}"]
            out.extend(n for n in names if n not in out)
        return sorted(out, key=lambda n: self.depth if n == "final" else int(n[5:]))

    def checkpoint_meta(self) -> dict:
        """Metadata that lets :func:`load_encoder` rebuild this encoder from its weights alone."""
        return {
            "format": CHECKPOINT_FORMAT,
            "base_model": self.base_meta.get("base_model", self.spec.name),
            "timm_name": self.spec.timm_name,
            "create_kwargs": self.create_kwargs,
            "mean": list(self.mean),
            "std": list(self.std),
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "modifications": self.modifications,
        }

    def provenance(self) -> dict:
        return {
            "model": self.spec.name,
            "timm_name": self.spec.pretrained_name,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "patch_size": self.patch_size,
            "channels": self.embed_dim,
            "depth": self.depth,
            "num_prefix_tokens": self.num_prefix_tokens,
            "in_chans": self.in_chans,
            "modifications": self.modifications,
        }

    # -- forward -----------------------------------------------------------------------------------------------
    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Token grid ``(h, w)`` for an input of ``height × width`` pixels (multiples of the patch size)."""
        return height // self.patch_size, width // self.patch_size

    def to(self, device) -> Encoder:
        self.model.to(device)
        return self

    def forward_tokens(self, x, layers: Sequence[str], keep_prefix: bool = False):
        """Patch tokens of a batch.

        Parameters
        ----------
        x : torch.Tensor, shape (B, in_chans, H, W)
            Normalised images; H and W multiples of the patch size.
        layers : sequence of str
            Canonical layer names from :meth:`layer_names`.
        keep_prefix : bool
            Also return the CLS/register tokens.

        Returns
        -------
        tokens : dict of str to torch.Tensor (B, h, w, C)
        prefix : dict of str to torch.Tensor (B, P, C), or None
        """
        B, _, H, W = x.shape
        h, w = self.grid(H, W)
        m = self.model
        if self.is_sam:
            idx = [self.depth - 1 if n == "final" else int(n[5:]) for n in layers]
            outs = m.forward_intermediates(x, indices=idx, norm=False, output_fmt="NCHW", intermediates_only=True)
            return {n: o.permute(0, 2, 3, 1) for n, o in zip(layers, outs)}, None
        p = self.num_prefix_tokens
        if list(layers) == ["final"]:
            out = m.forward_features(x)
            tokens = {"final": out[:, p:].reshape(B, h, w, -1)}
            prefix = {"final": out[:, :p]} if keep_prefix and p else None
            return tokens, prefix
        idx = [self.depth - 1 if n == "final" else int(n[5:]) for n in layers]
        outs = m.forward_intermediates(
            x, indices=idx, norm=True, return_prefix_tokens=True, output_fmt="NLC", intermediates_only=True
        )
        tokens, prefix = {}, {}
        for n, o in zip(layers, outs):
            spatial, pre = o if isinstance(o, tuple) else (o, None)
            tokens[n] = spatial.reshape(B, h, w, -1)
            if keep_prefix and pre is not None and p:
                prefix[n] = pre
        return tokens, (prefix or None)


def _checkpoint_filter(model) -> Callable | None:
    module = importlib.import_module(type(model).__module__)
    return getattr(module, "checkpoint_filter_fn", None)


def _load_state_dict_checked(model, state_dict: dict, source: str) -> None:
    """Load weights strictly, naming the keys that do not match instead of dumping a torch traceback."""
    filt = _checkpoint_filter(model)
    if filt is not None:
        try:
            state_dict = filt(state_dict, model)
        except Exception:
            # A filter written for another layout can fail on a plain timm state dict; the key check below
            # then reports what really does not fit.
            pass
    if type(getattr(model, "head", None)).__name__ == "Identity":
        # Encoders are built without a classifier; a checkpoint's classifier weights are not needed.
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in own)
    mismatched = sorted(
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"shape mismatch: {', '.join(mismatched[:4])}" + (" ..." if len(mismatched) > 4 else ""))
        if missing:
            parts.append(f"missing: {', '.join(missing[:4])}" + (f" (+{len(missing) - 4})" if len(missing) > 4 else ""))
        if unexpected:
            parts.append(
                f"unexpected: {', '.join(unexpected[:4])}" + (f" (+{len(unexpected) - 4})" if len(unexpected) > 4 else "")
            )
        hint = ""
        if set(missing) <= {"pos_embed"} and missing and not unexpected and not mismatched:
            hint = "; a checkpoint without position embedding (ALiBi or NoPE)? pass --method alibi or --method nope"
        elif unexpected == ["pos_embed"] and not missing and not mismatched:
            hint = "; its position embedding is not zero, so it is no position-free checkpoint: drop --method"
        elif any(k.startswith("blocks.") and k.endswith(".attn.m") for k in unexpected):
            hint = "; blocks.{i}.attn.m are per-block ALiBi slopes: pass --method alibi"
        raise PosvitError(f"weights '{source}' do not fit this model ({'; '.join(parts)}){hint}")
    model.load_state_dict(state_dict, strict=True)


def _create(timm_name: str, create_kwargs: dict):
    import timm

    kwargs = dict(num_classes=0)
    if not timm_name.startswith("samvit"):
        kwargs["dynamic_img_size"] = True
    kwargs.update(create_kwargs)
    try:
        return timm.create_model(timm_name, pretrained=False, **kwargs)
    except TypeError as exc:
        raise PosvitError(f"cannot build '{timm_name}' as a ViT encoder ({exc})") from exc


def _check_is_vit(model, name: str) -> None:
    if not (hasattr(model, "blocks") and hasattr(model, "patch_embed") and hasattr(model, "forward_intermediates")):
        raise PosvitError(f"'{name}' is not a Vision Transformer with patch tokens (posvit needs a timm ViT)")


def load_encoder(
    model: str | None = None,
    weights: str | os.PathLike = "pretrained",
    *,
    device: str = "cpu",
    seed: int = 0,
    modifications: Sequence[dict] | None = None,
) -> Encoder:
    """Build an encoder and load its weights.

    Parameters
    ----------
    model : str or None
        posvit short name (``dinov2-s-reg``) or timm model name. May be None when ``weights`` is a posvit
        checkpoint, which names its base model.
    weights : {"pretrained", "random"} or path
        ``"pretrained"``: timm's weights for the tag (bundled file for posvit's own models); ``"random"``: the
        architecture with random weights (seeded by ``seed``); a path: a ``.safetensors``/``.pth`` state dict
        (timm layout, or an official DINOv2/DINOv3 layout that timm converts) or a posvit checkpoint.
    device : str
        Torch device for the model.
    modifications : sequence of dict, optional
        Modifications to apply after building (``[{"name": "alibi", "config": {}}]``) when the weights are not
        a posvit checkpoint that lists its own: e.g. the published ALiBi/NoPE checkpoints, which are plain timm
        state dicts without ``pos_embed``.

    Raises
    ------
    PosvitError
        Unknown model, weights unavailable offline, or a weights file that does not fit the model.
    """
    import torch

    weights = str(weights)
    ckpt_meta = None
    if weights not in ("pretrained", "random"):
        if not Path(weights).is_file():
            raise PosvitError(f"weights file '{weights}' does not exist (or use --weights pretrained|random)")
        ckpt_meta = read_checkpoint_meta(weights)
    if model is None:
        if ckpt_meta is None:
            raise PosvitError("name a model with --model (only posvit checkpoints carry their model name)")
        model = ckpt_meta["base_model"]
    spec = resolve_spec(model)

    create_kwargs = dict(spec.create_kwargs)
    mean = std = None
    weights_path: Path | None = None
    if weights == "pretrained" and spec.bundled:
        weights_path = bundled_weights_path(spec.bundled)
        ckpt_meta = read_checkpoint_meta(weights_path)
    elif weights not in ("pretrained", "random"):
        weights_path = Path(weights)
    if ckpt_meta is not None:
        create_kwargs.update(ckpt_meta.get("create_kwargs", {}))
        mean, std = ckpt_meta.get("mean"), ckpt_meta.get("std")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _create(spec.timm_name, create_kwargs)
    _check_is_vit(net, spec.name)
    if mean is None:
        cfg = getattr(net, "pretrained_cfg", {}) or {}
        from timm.models import get_pretrained_cfg

        tagged = get_pretrained_cfg(spec.pretrained_name) if spec.tag else None
        src = tagged.to_dict() if tagged is not None else cfg
        mean = src.get("mean", IMAGENET_MEAN)
        std = src.get("std", IMAGENET_STD)

    if weights_path is not None:
        sd = load_weights_file(weights_path)
        # Modifications (ALiBi, removed position embeddings) change the parameter set: replay them first.
        enc = Encoder(net, spec, weights=str(weights_path), weights_sha256=sha256_file(weights_path),
                      mean=mean, std=std, create_kwargs=create_kwargs, base_meta=ckpt_meta)
        mods = list((ckpt_meta or {}).get("modifications", []))
        if modifications:
            if mods and [m["name"] for m in mods] != [m["name"] for m in modifications]:
                raise PosvitError(
                    f"'{weights_path}' is a posvit checkpoint with {', '.join(m['name'] for m in mods)} built in; "
                    "it needs no --method"
                )
            mods = mods or list(modifications)
        _replay_modifications(enc, _fit_modifications(mods, sd))
        sd = _zero_pos_embed(enc, sd, str(weights_path))
        _load_state_dict_checked(enc.model, sd, str(weights_path))
        if spec.bundled and weights == "pretrained":
            enc.weights = f"bundled:{spec.bundled}"
        enc.model.eval()
        return enc.to(device)

    if weights == "random":
        enc = Encoder(net, spec, weights="random", weights_sha256=state_dict_sha256(net.state_dict()),
                      mean=mean, std=std, create_kwargs=create_kwargs)
        _replay_modifications(enc, modifications or [])
        return enc.to(device)

    # Pretrained weights through timm (Hugging Face hub or its local cache).
    import timm

    if os.environ.get("HF_HUB_OFFLINE") and weights_available_offline(spec) is None:
        raise PosvitError(
            f"weights for {spec.name} ({spec.pretrained_name}) are not in the local cache and the hub is offline: "
            "download them elsewhere and pass --weights FILE.safetensors (or --weights random for a smoke test)"
        )
    try:
        kwargs = dict(num_classes=0, **create_kwargs)
        if not spec.timm_name.startswith("samvit"):
            kwargs["dynamic_img_size"] = True
        net = timm.create_model(spec.pretrained_name, pretrained=True, **kwargs)
    except RuntimeError as exc:
        if "size mismatch" in str(exc) or "Missing key" in str(exc):
            raise PosvitError(f"timm's pretrained weights do not fit {spec.name}: {str(exc).splitlines()[0]}") from exc
        raise
    except Exception as exc:  # network errors, missing cache entries, gated repositories
        raise PosvitError(
            f"cannot get pretrained weights for {spec.name} ({spec.pretrained_name}): {type(exc).__name__}; "
            "pass a local file with --weights FILE.safetensors (or --weights random for a smoke test)"
        ) from exc
    cached = weights_available_offline(spec)
    sha = sha256_file(cached) if cached else state_dict_sha256(net.state_dict())
    enc = Encoder(net, spec, weights="pretrained", weights_sha256=sha, mean=mean, std=std,
                  create_kwargs=create_kwargs)
    _replay_modifications(enc, modifications or [])
    return enc.to(device)


def _zero_pos_embed(enc: Encoder, state_dict: dict, source: str) -> dict:
    """Handle an all-zero ``pos_embed`` (the reference's older position-free layout: zeroed and frozen).

    A model whose modifications removed its position embedding drops it (one warning); an unmodified model
    keeps it, with a warning that the file looks position-free. A non-zero one is left to the key check.
    """
    pe = state_dict.get("pos_embed")
    if pe is None or pe.numel() == 0 or bool(pe.any()):
        return state_dict
    if "pos_embed" not in enc.model.state_dict() and enc.modifications:
        names = "/".join(m["name"] for m in enc.modifications)
        warnings.warn(f"'{source}': dropped its all-zero pos_embed ({names} uses no position embedding)",
                      PosvitWarning, stacklevel=3)
        return {k: v for k, v in state_dict.items() if k != "pos_embed"}
    if not enc.modifications:
        warnings.warn(f"'{source}' has an all-zero position embedding: it looks like a position-free checkpoint "
                      "(ALiBi or NoPE); loading it as a plain ViT. Pass --method alibi or --method nope if it is one",
                      PosvitWarning, stacklevel=3)
    return state_dict


def _fit_modifications(mods: Sequence[dict], state_dict: dict) -> list[dict]:
    """The modifications with their settings fitted to ``state_dict`` by the modifiers' checkpoint adapters."""
    out = []
    for mod in mods:
        _load_modifier(mod["name"])  # imports the module, which registers its adapter too
        adapt = CHECKPOINT_ADAPTERS.get(mod["name"])
        out.append({**mod, "config": adapt(dict(mod.get("config", {})), state_dict)} if adapt else mod)
    return out


def _replay_modifications(enc: Encoder, mods: Sequence[dict]) -> None:
    for mod in mods:
        _load_modifier(mod["name"])(enc, mod.get("config", {}))
        enc.modifications.append(mod)
