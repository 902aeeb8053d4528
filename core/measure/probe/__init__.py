"""Positional linear probes: how much of a token's grid position is linearly decodable from its features.

Targets are ramps on the ``h × w`` token grid scaled to [0, 1] (:func:`ramp_targets`): ``lr`` (x), ``ud`` (y),
``diag``, ``radial`` (1 at the centre), the joint ``xy`` (x and y together, scored as the mean of the two R²) and
two controls, ``random`` (uniform noise, a fresh draw per fit: must score about 0 or below) and ``raster``
(row-major token index). For every image, a linear regressor is fitted on a sample of its tokens after
standardising each channel on those tokens, and R² is measured on the other tokens (``protocol="holdout"``,
the default) or on all tokens (``protocol="dino-saw"``, the published setting of "What DINO saw", whose
training tokens are part of its evaluation set).

Everything is closed form and batched: for one image, all repeats (fresh sampling masks), all targets and, for
the per-channel scores, all channels are solved at once with a handful of float64 matrix products (torch). The
stack regressor uses the dual (kernel) form of ridge when there are fewer training tokens than channels, the
primal form otherwise; ordinary least squares is the minimum-norm solution (``gelsd``), as scikit-learn's
``LinearRegression`` gives.

Dataset level (:func:`probe_dataset`, :func:`probe_store`): mean ± std over images × repeats, per layer, the
per-channel R² of every channel for every target, the most positional channels (top-k per ramp of the
dataset-mean per-channel R² and their union), the RMSE of a 2-D coordinate regressor in patch units and the
accuracy of a linear classifier of the exact token index. Images extracted in tiles are also probed in their tile frame (ramps
within each tile) with a tile-phase periodicity score (:mod:`~posvit_cli.core.measure.probe.tiles`). :func:`write_probe_result`,
:func:`read_probe_result` and :func:`positional_channels` let other commands read results back.
"""

# The package is split by concern: settings (targets, protocols, sampling masks), solver (closed-form fits of one
# image), dataset (the loop over a store and its summaries) and results (the JSON document and its readers). This
# module re-exports the public names so that `from posvit_cli.core.measure.probe import X` keeps working.

from __future__ import annotations

from posvit_cli.core.measure.probe.dataset import FeatureReader, probe_dataset, probe_store
from posvit_cli.core.measure.probe.results import (
    channel_r2_table, fingerprint, positional_channels, probe_result_json, read_probe_result, write_channel_csv,
    write_probe_result,
)
from posvit_cli.core.measure.probe.settings import (
    ALL_TARGETS, CONTROL_TARGETS, POSITIONAL_RAMPS, PROBE_SCHEMA, PROBE_SCHEMA_VERSION, PROTOCOLS, RAMP_TARGETS,
    REGRESSORS, SAMPLINGS, ProbeSettings, SamplingPlan, check_targets, make_settings, ramp_targets, sampling_plan,
)
from posvit_cli.core.measure.probe.solver import ImageProbe, probe_image, stack_r2
from posvit_cli.core.measure.probe.tiles import TileFrame, phase_periodicity, tile_frame

__all__ = [
    "CONTROL_TARGETS",
    "POSITIONAL_RAMPS",
    "PROBE_SCHEMA",
    "PROTOCOLS",
    "PROBE_SCHEMA_VERSION",
    "RAMP_TARGETS",
    "REGRESSORS",
    "SAMPLINGS",
    "ALL_TARGETS",
    "FeatureReader",
    "ImageProbe",
    "ProbeSettings",
    "SamplingPlan",
    "TileFrame",
    "channel_r2_table",
    "check_targets",
    "fingerprint",
    "make_settings",
    "phase_periodicity",
    "positional_channels",
    "probe_dataset",
    "probe_image",
    "probe_result_json",
    "probe_store",
    "ramp_targets",
    "read_probe_result",
    "sampling_plan",
    "stack_r2",
    "tile_frame",
    "write_channel_csv",
    "write_probe_result",
]
