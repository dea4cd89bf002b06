"""The key type variable of the generic facades.

Its default (PEP 696) is ``Any``: an unannotated ``KeyedExecutor(workers=8)``
type-checks as ``KeyedExecutor[Any]`` instead of asking for an annotation,
while ``KeyedExecutor[str](...)`` still checks its keys. ``typing.TypeVar``
takes ``default`` only from Python 3.13, so type checkers read the
``typing_extensions`` declaration (its stub ships with them) and the runtime
keeps a plain TypeVar: no runtime dependency.
"""

from typing import TYPE_CHECKING, Any

__all__ = ["K"]

if TYPE_CHECKING:
    from typing_extensions import TypeVar

    K = TypeVar("K", default=Any)
else:
    from typing import TypeVar

    K = TypeVar("K")
