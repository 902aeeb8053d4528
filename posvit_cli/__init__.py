"""posvit: measure and remove positional bias in self-supervised Vision Transformer features.

The science lives in :mod:`posvit_cli.core` (a plain library: no printing, progress through callbacks);
the command-line interface in :mod:`posvit_cli.commands` and :mod:`posvit_cli.app`.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
