"""Workaround for Triton 3.6's CPU interpreter under numpy >= 2.4 (only used with TRITON_INTERPRET=1).

The interpreter holds scalars as 1-element 1-d arrays and converts them with `int(array)`, which
numpy 2.4 rejects, so `range(0, runtime_bound, step)` fails inside interpreted kernels.
"""

from __future__ import annotations

import functools


def patch_interpreter() -> None:
    """Make interpreted scalars usable as loop bounds (`__index__` through `.item()`); idempotent."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_quantattn_patched", False):
        return

    @functools.wraps(original)
    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._quantattn_patched = True
    interpreter._patch_lang_tensor = patched
