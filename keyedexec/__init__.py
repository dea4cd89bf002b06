"""keyedexec: per-key ordered task execution on a bounded pool of threads.

Tasks that share a key run one at a time, in submission order; tasks with
different keys run in parallel. Two facades over one scheduler:

* :class:`KeyedExecutor`: a fixed pool; ``execute``, ``submit`` (futures),
  ``map``, the ``execute_with_*`` family of the Go ``keyedexecutor``.
* :class:`TaskPool`: bounded per-key queues with backpressure and a context
  that ``stop()`` cancels, like the Go ``taskpool``.
* :class:`AsyncKeyedExecutor` (``keyedexec.aio``): the same ordering for
  coroutine functions on an asyncio event loop.
* ``keyedexec.process.ProcessKeyedExecutor``: the same ordering across child
  processes (imported on demand, not by ``import keyedexec``).
* ``keyedexec.ray.RayKeyedExecutor``: the same ordering on Ray actors (the
  ``ray`` extra; imported on demand).

``keyedexec.NATIVE`` tells whether the compiled core is in use.
"""

from ._future import KeyedFuture
from ._impl import NATIVE
from .context import Context, background
from .errors import BrokenThreadPool, Cancelled, DeadlineExceeded, QueueFull, ShardLost
from .executor import KeyedExecutor, Metrics, Stats
from .aio import AsyncKeyedExecutor
from .taskpool import PoolMetrics, TaskPool

__version__ = "0.1.0"

__all__ = [
    "NATIVE",
    "AsyncKeyedExecutor",
    "BrokenThreadPool",
    "Cancelled",
    "Context",
    "DeadlineExceeded",
    "KeyedExecutor",
    "KeyedFuture",
    "Metrics",
    "PoolMetrics",
    "QueueFull",
    "ShardLost",
    "Stats",
    "TaskPool",
    "background",
    "__version__",
]
