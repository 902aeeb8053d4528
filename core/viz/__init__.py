"""Pictures of positional bias and its removal (``posvit viz``).

- :mod:`~posvit_cli.core.viz.maps`: the numbers behind the pictures (PCA → RGB, cosine similarity, label
  statistics, upsampling, colours), pure functions on arrays.
- :mod:`~posvit_cli.core.viz.geometry`: where tokens lie on the source image (resize rules, centre crops, tiles)
  and query points in pixels, tokens or fractions.
- :mod:`~posvit_cli.core.viz.scores`: the probe score each picture carries, from a saved result (checked against
  the store) or probed on the drawn images.
- :mod:`~posvit_cli.core.viz.layout`: pixel-exact figure grids (matplotlib, Agg), atomic PNG/SVG writing.
- :mod:`~posvit_cli.core.viz.pictures`: what every figure shares (options, image choice, row labels);
  :mod:`~posvit_cli.core.viz.pca_figure`, :mod:`~posvit_cli.core.viz.similarity`,
  :mod:`~posvit_cli.core.viz.channels`, :mod:`~posvit_cli.core.viz.norms`, :mod:`~posvit_cli.core.viz.label_maps`, :mod:`~posvit_cli.core.viz.compare`
  and :mod:`~posvit_cli.core.viz.plots`: the figures.
- :mod:`~posvit_cli.core.viz.index`: the output folder's ``index.html``.
"""

from posvit_cli.core.viz.geometry import Footprint, fit_size, parse_point, query_token, token_footprint
from posvit_cli.core.viz.index import FigureEntry, read_manifest, update_index
from posvit_cli.core.viz.maps import (
    PCABasis,
    cosine_similarity_map,
    fit_pca,
    foreground_mask,
    pca_rgb,
    position_eta_squared,
    upsample,
)

__all__ = [
    "FigureEntry",
    "Footprint",
    "PCABasis",
    "cosine_similarity_map",
    "fit_pca",
    "fit_size",
    "foreground_mask",
    "parse_point",
    "pca_rgb",
    "position_eta_squared",
    "query_token",
    "read_manifest",
    "token_footprint",
    "update_index",
    "upsample",
]
