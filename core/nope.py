"""The ``nope`` encoder modifier (no position encoding); it lives with ALiBi in :mod:`posvit_cli.core.alibi`.

:func:`posvit_cli.core.encoders.load_encoder` imports ``posvit_cli.core.<name>`` to find a checkpoint's
modifier; importing this module registers both ``alibi`` and ``nope``.
"""

from posvit_cli.core import alibi as _alibi  # noqa: F401  (registers the modifiers)
