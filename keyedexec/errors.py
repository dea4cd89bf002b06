"""Exceptions raised by keyedexec."""

from __future__ import annotations

from concurrent.futures.thread import BrokenThreadPool

__all__ = ["BrokenThreadPool", "Cancelled", "DeadlineExceeded", "QueueFull", "ShardLost"]

# BrokenThreadPool (re-exported, it is the stdlib's own class): a worker's
# initializer raised; the executor takes no more tasks and fails the queued ones.


class Cancelled(Exception):
    """A context was cancelled (Go's ``context.Canceled``).

    Returned by :meth:`Context.err` and reported by tasks that were skipped
    because their context was cancelled before their turn came.
    """


class DeadlineExceeded(Cancelled, TimeoutError):
    """A context's deadline passed (Go's ``context.DeadlineExceeded``).

    A subclass of :class:`Cancelled` (``except Cancelled`` sees both) and of
    :class:`TimeoutError`.
    """


class QueueFull(Exception):
    """A key's queue is at its capacity and the submit could not wait.

    Raised by ``TaskPool.submit`` when its ``timeout`` passes, and at once when a
    job submits to its *own* key while that key's queue is full (waiting would
    deadlock: the queue only drains once the submitting job returns).
    """


class ShardLost(Exception):
    """The process (or actor) that ran a task died before reporting the task's outcome.

    The task may or may not have run, in part or in full: it was sent and never
    acknowledged. Raised by the futures of the process and Ray executors
    (``keyedexec.process``, ``keyedexec.ray``) under their default
    ``on_loss="fail"`` (at most once).
    """
