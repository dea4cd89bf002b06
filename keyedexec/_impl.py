"""Chooses the scheduler: the compiled core, or its pure-Python twin.

* ``KEYEDEXEC_PURE_PYTHON=1`` (or an interpreter other than CPython): pure Python.
* Otherwise the compiled ``keyedexec._core``; if it cannot be imported, pure
  Python with a warning, unless ``KEYEDEXEC_REQUIRE_NATIVE=1`` makes that an
  ImportError (CI sets it, so a broken build never passes as pure Python).
"""

from __future__ import annotations

import os
import platform
import warnings
from typing import TYPE_CHECKING

__all__ = ["NATIVE", "Scheduler"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


if TYPE_CHECKING:
    from ._pure import Scheduler

    NATIVE: bool
elif _flag("KEYEDEXEC_PURE_PYTHON") or platform.python_implementation() != "CPython":
    from ._pure import Scheduler

    NATIVE = False
else:
    try:
        from ._core import Scheduler
    except ImportError as exc:
        if _flag("KEYEDEXEC_REQUIRE_NATIVE"):
            raise ImportError(
                "keyedexec: the compiled core keyedexec._core could not be imported "
                "and KEYEDEXEC_REQUIRE_NATIVE is set"
            ) from exc
        warnings.warn(
            f"keyedexec: compiled core unavailable ({exc}); using the pure-Python "
            "scheduler, which is several times slower",
            RuntimeWarning,
            stacklevel=2,
        )
        from ._pure import Scheduler

        NATIVE = False
    else:
        NATIVE = True
