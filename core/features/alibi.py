"""2-D ALiBi attention for timm Vision Transformers, and the position-free ("NoPE") retrofit.

The absolute position embedding of a ViT (and the RoPE of DINOv3/EVA-02) is removed, and every block's attention
logits get an additive bias that depends only on the *relative* position of two patch tokens::

    logit(i, j) = q_i · k_j / √d  −  m_h · d(i, j) / d_max

with ``d`` the distance between the tokens' grid positions, by default Euclidean on a torus (wrap-around in both
axes), ``d_max`` its maximum over the grid (so the bias lies in ``[−m_h, 0]`` whatever the resolution), and
``m_h`` a slope per head. CLS and register tokens get zero bias to and from every token. On a torus the bias is
invariant under rolling the grid, so a retrofitted model without prefix-dependent position information is exactly
roll-equivariant: it cannot tell where a patch is, only what surrounds it.

The bias is passed as an additive float mask to timm's fused attention (``F.scaled_dot_product_attention``),
never through an explicit softmax. It is built once per grid size, cached, and shared by all blocks: a forward
pre-hook on ``patch_embed`` reads the input size of each call and picks (or builds) the bias; a pre-hook on every
block hands it over as ``attn_mask``. Any input size works, non-square included. With per-block slopes (the
reference's learned-slope checkpoints keep one ``blocks.{i}.attn.m`` per block) the unit bias is shared and each
block's hook scales it by that block's own slopes.

Registered as encoder modifiers ``"alibi"`` and ``"nope"`` (see :func:`posvit_cli.core.features.encoders.register_modifier`),
so a posvit checkpoint that lists them reloads with ``load_encoder(None, weights=CKPT)``.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import math
import re
from typing import Any

import torch
from torch import nn

from posvit_cli.core.features.encoders import Encoder, register_checkpoint_adapter, register_modifier
from posvit_cli.core.errors import PosvitError

__all__ = [
    "DISTANCES",
    "METHODS",
    "SLOPE_KINDS",
    "Alibi2d",
    "AlibiConfig",
    "add_block_slopes",
    "alibi_bias",
    "alibi_slopes",
    "check_retrofittable",
    "grid_distances",
    "remove_position_encoding",
    "retrofit",
]

#: Distance between token grid positions.
DISTANCES = ("euclidean", "manhattan")
#: ``constant``: one slope ``m`` for all heads (the published models); ``geometric``: the classic ALiBi slopes
#: 2^(−8(h+1)/H); ``learned``: one trainable slope per head, initialised to ``m``.
SLOPE_KINDS = ("constant", "geometric", "learned")
#: Position-encoding retrofits: ALiBi bias, or no position information at all.
METHODS = ("alibi", "nope")
# A block's own slopes in a state dict (the reference's learned-slope layout).
_BLOCK_SLOPE_KEY = re.compile(r"^blocks\.\d+\.attn\.m$")
# Bias matrices kept per model (different input sizes in one run: training stages, validation, monitor images).
_CACHE_SIZE = 4


@dataclasses.dataclass(frozen=True)
class AlibiConfig:
    """How the ALiBi bias is built.

    Attributes
    ----------
    slopes : {"constant", "geometric", "learned"}
        Slope per head (see :data:`SLOPE_KINDS`).
    slope : float
        The constant slope ``m`` (``constant``), or the initial value of every learned slope (``learned``).
        Ignored by ``geometric``.
    distance : {"euclidean", "manhattan"}
    wrap : bool
        Distances on a torus (wrap-around in both axes); without it, plain grid distances.
    normalize : bool
        Divide distances by their maximum over the grid, so the bias spans ``[−m, 0]`` at every resolution.
    per_block : bool
        Each block has its own slopes, ``blocks.{i}.attn.m`` of shape (heads, 1, 1) in the state dict (a parameter
        when learned, else a saved buffer): the layout of the reference's learned-slope checkpoints. Without it
        all blocks share one slope set (``alibi.slopes`` when learned, not saved otherwise).
    """

    slopes: str = "constant"
    slope: float = 1.0
    distance: str = "euclidean"
    wrap: bool = True
    normalize: bool = True
    per_block: bool = False

    def __post_init__(self) -> None:
        if self.slopes not in SLOPE_KINDS:
            raise PosvitError(f"unknown ALiBi slopes '{self.slopes}': use {', '.join(SLOPE_KINDS)}")
        if self.distance not in DISTANCES:
            raise PosvitError(f"unknown ALiBi distance '{self.distance}': use {', '.join(DISTANCES)}")
        if not math.isfinite(self.slope):
            raise PosvitError(f"ALiBi slope must be a finite number, got {self.slope}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if not self.per_block:  # written only when set: checkpoints with shared slopes stay readable by older posvit
            del d["per_block"]
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> AlibiConfig:
        d = dict(d or {})
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise PosvitError(f"unknown ALiBi settings {unknown} (newer posvit checkpoint?)")
        return cls(**d)


# --------------------------------------------------------------------------------------------------------------
# The bias


def grid_distances(h: int, w: int, *, distance: str = "euclidean", wrap: bool = True, device=None) -> torch.Tensor:
    """Distances between all pairs of tokens of an ``h × w`` grid (row-major token order).

    Parameters
    ----------
    h, w : int
        Grid rows and columns.
    distance : {"euclidean", "manhattan"}
    wrap : bool
        Torus distances: along each axis ``min(|Δ|, n − |Δ|)``.

    Returns
    -------
    torch.Tensor of float32, shape (h·w, h·w)
        In patch units.
    """
    if h < 1 or w < 1:
        raise PosvitError(f"a {h}×{w} token grid has no tokens")
    if distance not in DISTANCES:
        raise PosvitError(f"unknown distance '{distance}': use {', '.join(DISTANCES)}")

    def axis(n: int) -> torch.Tensor:
        c = torch.arange(n, dtype=torch.float32, device=device)
        d = (c[:, None] - c[None, :]).abs()
        return torch.minimum(d, n - d) if wrap else d

    # Separable in rows and columns: token (r, c) ↔ (r', c') has Δ = (dy[r, r'], dx[c, c']).
    dy = axis(h)[:, None, :, None]
    dx = axis(w)[None, :, None, :]
    d = torch.sqrt(dy * dy + dx * dx) if distance == "euclidean" else dy + dx
    return d.reshape(h * w, h * w)


def alibi_bias(
    h: int,
    w: int,
    num_prefix_tokens: int = 0,
    *,
    distance: str = "euclidean",
    wrap: bool = True,
    normalize: bool = True,
    device=None,
) -> torch.Tensor:
    """The unit-slope ALiBi bias ``−d(i, j) / d_max`` of an ``h × w`` grid, with zero rows/columns for prefix tokens.

    Parameters
    ----------
    h, w : int
        Token grid.
    num_prefix_tokens : int
        CLS/register tokens in front of the patch tokens: their rows and columns are 0.
    distance, wrap : see :func:`grid_distances`
    normalize : bool
        Divide by the largest distance on the grid (a 1×1 grid stays 0).

    Returns
    -------
    torch.Tensor of float32, shape (P + h·w, P + h·w)
        Symmetric, 0 on the diagonal, −1 at the farthest pair when normalised.
    """
    d = grid_distances(h, w, distance=distance, wrap=wrap, device=device)
    if normalize:
        d_max = d.max()
        if d_max > 0:
            d = d / d_max
    n = num_prefix_tokens + h * w
    out = torch.zeros(n, n, dtype=torch.float32, device=device)
    out[num_prefix_tokens:, num_prefix_tokens:].sub_(d)  # 0 − d: no negative zeros on the diagonal
    return out


def alibi_slopes(kind: str, num_heads: int, value: float = 1.0) -> torch.Tensor:
    """Slope per head, shape (num_heads,): ``value`` for constant/learned, 2^(−8(h+1)/H) for geometric."""
    if kind == "geometric":
        return torch.tensor([2.0 ** (-8.0 * (i + 1) / num_heads) for i in range(num_heads)], dtype=torch.float32)
    if kind in ("constant", "learned"):
        return torch.full((num_heads,), float(value), dtype=torch.float32)
    raise PosvitError(f"unknown ALiBi slopes '{kind}': use {', '.join(SLOPE_KINDS)}")


class Alibi2d(nn.Module):
    """The ALiBi bias of one model: slopes, the bias cache, and the hooks that feed the bias to every block.

    Attached to the timm model as ``model.alibi``. Learned slopes are a parameter (``alibi.slopes`` in the state
    dict); fixed slopes are a non-persistent buffer, so a checkpoint with constant slopes holds exactly the timm
    model's weights without ``pos_embed`` (the layout of the published ALiBi checkpoints). With
    ``config.per_block`` the slopes live on each block's attention (``attn.m``, see :func:`add_block_slopes`) and
    ``alibi.slopes`` is an unsaved buffer that only sets the bias dtype.

    Parameters
    ----------
    num_heads : int
    num_prefix_tokens : int
    config : AlibiConfig
    """

    def __init__(self, num_heads: int, num_prefix_tokens: int, config: AlibiConfig):
        super().__init__()
        self.config = config
        self.num_heads = int(num_heads)
        self.num_prefix_tokens = int(num_prefix_tokens)
        slopes = alibi_slopes(config.slopes, self.num_heads, config.slope)
        if config.slopes == "learned" and not config.per_block:
            self.slopes = nn.Parameter(slopes)
        else:
            self.register_buffer("slopes", slopes, persistent=False)
        # One slope for every head: one (N, N) bias broadcast over heads, H times less memory.
        self._uniform = config.slopes == "constant" and not config.per_block
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._grid: tuple[int, int] | None = None
        self._active: torch.Tensor | None = None
        self._handles: list = []

    def extra_repr(self) -> str:
        c = self.config
        return (f"heads={self.num_heads}, prefix={self.num_prefix_tokens}, slopes={c.slopes}, m={c.slope}, "
                f"distance={c.distance}, wrap={c.wrap}, normalize={c.normalize}, per_block={c.per_block}")

    # -- the bias -------------------------------------------------------------------------------------------
    def _unit_bias(self, h: int, w: int, device) -> torch.Tensor:
        key = ("unit", h, w, str(device))
        hit = self._cache.get(key)
        if hit is None:
            c = self.config
            hit = alibi_bias(h, w, self.num_prefix_tokens, distance=c.distance, wrap=c.wrap, normalize=c.normalize,
                             device=device)
            self._remember(key, hit)
        else:
            self._cache.move_to_end(key)
        return hit

    def _remember(self, key, value) -> None:
        self._cache[key] = value
        while len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)

    def bias(self, h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """The attention bias for an ``h × w`` grid, shape (1, 1 or heads, N, N) with N = prefix + h·w.

        Fixed slopes: built once per (grid, device, dtype) and cached. Learned slopes: the slope product is taken
        each call (the unit bias is cached) so gradients reach the slopes. Per-block slopes: the unit bias
        (1, 1, N, N); each block scales it by its own slopes.
        """
        device = torch.device(device) if device is not None else self.slopes.device
        if self.config.per_block:
            return self._unit_bias(h, w, device).to(dtype)[None, None]
        if self.config.slopes == "learned":
            unit = self._unit_bias(h, w, device)
            return (self.slopes.to(device=device, dtype=dtype)[:, None, None] * unit.to(dtype))[None]
        key = ("bias", h, w, str(device), dtype)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        unit = self._unit_bias(h, w, device)
        if self._uniform:
            # The configured constant, not a tensor read: no device sync and no graph break under torch.compile.
            b = (float(self.config.slope) * unit)[None, None]
        else:
            b = self.slopes.to(device)[:, None, None] * unit[None]
            b = b[None]
        b = b.to(dtype).contiguous()
        self._remember(key, b)
        # The float32 unit bias is not needed again for this grid unless the dtype changes.
        return b

    def clear_cache(self) -> None:
        self._cache.clear()
        self._active = None

    # -- hooks ----------------------------------------------------------------------------------------------
    def _before_patch_embed(self, module, args):
        x = args[0]
        H, W = int(x.shape[-2]), int(x.shape[-1])
        if hasattr(module, "dynamic_feat_size"):  # rounds up when timm pads inputs (dynamic_img_pad)
            grid = module.dynamic_feat_size((H, W))
        else:
            ps = module.patch_size
            ph, pw = (ps, ps) if isinstance(ps, int) else ps
            grid = (H // ph, W // pw)
        self._grid = (int(grid[0]), int(grid[1]))
        # Built (or fetched) once per forward pass, in the parameters' dtype; every block shares it.
        self._active = self.bias(*self._grid, device=x.device, dtype=self.slopes.dtype)
        return None

    def _before_block(self, module, args, kwargs):
        bias = self._active
        if bias is None:
            return None
        if self.config.per_block:
            # This block's own slopes, (H, 1, 1), times the shared unit bias (1, 1, N, N); taken every call so
            # that learned slopes get gradients.
            bias = module.attn.m.to(bias.dtype)[None] * bias
        x = args[0] if args else kwargs["x"]
        n = x.shape[1]
        if bias.shape[-1] != n:
            raise RuntimeError(
                f"ALiBi bias was built for {bias.shape[-1]} tokens ({self._grid} grid + {self.num_prefix_tokens} "
                f"prefix) but a block received {n}; patch dropout and token pruning cannot be combined with ALiBi"
            )
        if bias.dtype != x.dtype and x.dtype in (torch.float16, torch.bfloat16):
            # A model cast to half precision needs the mask in its own dtype (autocast handles fp32 models).
            bias = bias.to(x.dtype)
        mask = kwargs.get("attn_mask")
        if mask is not None:
            if mask.dtype == torch.bool:  # SDPA convention: True = may attend
                mask = torch.zeros_like(mask, dtype=bias.dtype).masked_fill(~mask, float("-inf"))
            bias = bias + mask
        kwargs = dict(kwargs)
        kwargs["attn_mask"] = bias
        return args, kwargs

    def attach(self, model: nn.Module) -> None:
        """Register the hooks on ``model.patch_embed`` and every block of ``model.blocks``."""
        self.detach()
        self._handles.append(model.patch_embed.register_forward_pre_hook(self._before_patch_embed))
        for blk in model.blocks:
            self._handles.append(blk.register_forward_pre_hook(self._before_block, with_kwargs=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __deepcopy__(self, memo):
        # Copying a retrofitted model copies its hook tables, whose entries are bound methods of this module:
        # deepcopy rebinds them to the copy made here (through `memo`), so the copied model works as is. The
        # cache and the handles (which point into the original model's hook tables) are not copied.
        new = Alibi2d(self.num_heads, self.num_prefix_tokens, self.config)
        memo[id(self)] = new
        new.train(self.training)
        with torch.no_grad():
            if isinstance(self.slopes, nn.Parameter):
                new.slopes = nn.Parameter(self.slopes.detach().clone(), requires_grad=self.slopes.requires_grad)
            else:
                new.slopes = self.slopes.detach().clone()
        return new

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.clear_cache()


# --------------------------------------------------------------------------------------------------------------
# Retrofitting a model


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [getattr(blk, "attn", None) for blk in model.blocks]


def check_retrofittable(model: nn.Module, name: str = "model") -> None:
    """Raise a :class:`PosvitError` unless ``model`` is a timm ViT with global attention that accepts ``attn_mask``.

    Supported: ``VisionTransformer`` (DINO, DINOv2 with/without registers, MAE, DeiT, CLIP, supervised ViTs) and
    ``Eva`` (DINOv3, EVA-02) models.
    """
    if not (hasattr(model, "blocks") and hasattr(model, "patch_embed")):
        raise PosvitError(f"'{name}' is not a Vision Transformer (no patch embedding and blocks): ALiBi needs a timm ViT")
    kind = type(model).__name__
    if kind == "VisionTransformerSAM":
        raise PosvitError(f"'{name}' uses windowed attention with relative positions (SAM): ALiBi needs global attention")
    for i, blk in enumerate(model.blocks):
        try:
            params = inspect.signature(blk.forward).parameters
        except (TypeError, ValueError):
            params = {}
        attn = getattr(blk, "attn", None)
        if "attn_mask" not in params or attn is None or not hasattr(attn, "fused_attn"):
            raise PosvitError(
                f"'{name}' ({kind}) block {i} does not take an attention mask: ALiBi supports timm "
                "VisionTransformer and Eva models (DINO, DINOv2, DINOv3, MAE, DeiT, CLIP, EVA-02)"
            )
        if getattr(attn, "rel_pos", None) is not None or getattr(attn, "rel_pos_bias", None) is not None:
            raise PosvitError(f"'{name}' has relative position biases in its attention: not supported by the retrofit")


def remove_position_encoding(model: nn.Module) -> list[str]:
    """Remove the absolute position embedding and RoPE of a timm ViT in place.

    ``pos_embed`` is deleted (``None``) where timm's ViT/Eva token assembly allows it, else zeroed and frozen.

    Returns
    -------
    list of str
        What was removed (``pos_embed``, ``rope``).
    """
    removed = []
    if getattr(model, "pos_embed", None) is not None:
        handler = getattr(getattr(type(model), "_pos_embed", None), "__qualname__", "")
        if handler in ("VisionTransformer._pos_embed", "Eva._pos_embed"):
            model.pos_embed = None
        else:
            # Subclasses with their own token layout (distilled DeiT) cannot run without the tensor: a frozen zero
            # embedding carries no position either (it stays in the state dict, as zeros).
            with torch.no_grad():
                model.pos_embed.zero_()
            model.pos_embed.requires_grad_(False)
        removed.append("pos_embed")
    if getattr(model, "rope", None) is not None:
        model.rope = None
        removed.append("rope")
    return removed


def _num_heads(model: nn.Module) -> int:
    attn = model.blocks[0].attn
    heads = getattr(attn, "num_heads", None)
    if heads is None:
        raise PosvitError("cannot find the number of attention heads of this model")
    return int(heads)


def add_block_slopes(model: nn.Module, config: AlibiConfig) -> None:
    """Give every block's attention its own slopes ``attn.m``, shape (heads, 1, 1), initialised from ``config``.

    The reference's learned-slope layout (``blocks.{i}.attn.m`` in the state dict): a parameter when the slopes
    are learned, else a buffer that is saved and loaded (the values may come from such a checkpoint).
    """
    p = next(model.parameters())
    for i, attn in enumerate(_attention_modules(model)):
        if hasattr(attn, "m"):
            raise PosvitError(f"block {i} attention already has an attribute 'm': cannot add per-block ALiBi slopes")
        m = alibi_slopes(config.slopes, int(attn.num_heads), config.slope).reshape(-1, 1, 1).to(p.device)
        if config.slopes == "learned":
            attn.m = nn.Parameter(m)
        else:
            attn.register_buffer("m", m)


def _apply(model: nn.Module, method: str, config: dict, name: str) -> None:
    check_retrofittable(model, name)
    if getattr(model, "alibi", None) is not None:
        raise PosvitError(f"'{name}' already has ALiBi attention")
    remove_position_encoding(model)
    for attn in _attention_modules(model):
        # The bias goes through the fused kernel; the explicit softmax path is several times slower at 518 px.
        attn.fused_attn = True
    if method == "nope":
        if config:
            raise PosvitError(f"the 'nope' retrofit takes no settings, got {sorted(config)}")
        return
    cfg = AlibiConfig.from_dict(config)
    model.alibi = Alibi2d(_num_heads(model), int(getattr(model, "num_prefix_tokens", 0)), cfg)
    p = next(model.parameters())
    model.alibi.to(p.device)
    if cfg.per_block:
        add_block_slopes(model, cfg)
    model.alibi.attach(model)


@register_modifier("alibi")
def _alibi_modifier(encoder: Encoder, config: dict) -> None:
    """Encoder modifier ``alibi``: remove the position encoding, add 2-D ALiBi attention bias."""
    _apply(encoder.model, "alibi", config, encoder.name)


@register_checkpoint_adapter("alibi")
def _alibi_settings_for(config: dict, state_dict: dict) -> dict:
    """Per-block slopes when the weights have them (``blocks.{i}.attn.m``: the reference's learned slopes)."""
    cfg = AlibiConfig.from_dict(config)
    if cfg.per_block or not any(_BLOCK_SLOPE_KEY.match(k) for k in state_dict):
        return config
    # The reference saves slopes only when they are learned (constant ones are not persistent).
    return dataclasses.replace(cfg, per_block=True, slopes="learned").to_dict()


@register_modifier("nope")
def _nope_modifier(encoder: Encoder, config: dict) -> None:
    """Encoder modifier ``nope``: remove the position encoding (no position information at all)."""
    _apply(encoder.model, "nope", config, encoder.name)


def retrofit(encoder: Encoder, method: str, config: AlibiConfig | dict | None = None) -> Encoder:
    """Retrofit an encoder in place with ALiBi (``method="alibi"``) or no position encoding (``"nope"``).

    The change is recorded in ``encoder.modifications``, so :func:`~posvit_cli.core.features.encoders.save_encoder_checkpoint`
    writes a checkpoint that reloads alone.

    Parameters
    ----------
    encoder : Encoder
    method : {"alibi", "nope"}
    config : AlibiConfig or dict, optional
        ALiBi settings (ignored for ``nope``).

    Returns
    -------
    Encoder
        The same object.
    """
    if method not in METHODS:
        raise PosvitError(f"unknown retrofit '{method}': use {', '.join(METHODS)}")
    if any(m.get("name") in METHODS for m in encoder.modifications):
        raise PosvitError(f"'{encoder.name}' is already retrofitted ({encoder.modifications[0]['name']})")
    if method == "alibi":
        cfg = config if isinstance(config, AlibiConfig) else AlibiConfig.from_dict(config)
        cfg_dict: dict[str, Any] = cfg.to_dict()
    else:
        cfg_dict = {}
    _apply(encoder.model, method, cfg_dict, encoder.name)
    encoder.modifications.append({"name": method, "config": cfg_dict})
    return encoder
