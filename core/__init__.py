"""The posvit library: feature stores, encoders, probes, debiasing, clustering and segmentation.

Everything here works on NumPy arrays and torch tensors, reports progress through a callback
(:mod:`posvit_cli.core.progress`), raises :class:`~posvit_cli.core.errors.PosvitError` for user mistakes and
warns with :class:`~posvit_cli.core.errors.PosvitWarning`; it never prints.
"""
