"""Go-style ``context.Context``: cancellation, deadlines and request values.

A :class:`Context` is an immutable node in a tree rooted at :func:`background`.
Deriving a child never changes the parent:

* :meth:`Context.with_value` adds one key/value pair;
* :meth:`Context.with_cancel` adds a cancel function;
* :meth:`Context.with_timeout` / :meth:`Context.with_deadline` add a deadline
  (an absolute :func:`time.monotonic` value) as well.

Cancelling a context cancels all its descendants, never its parent or siblings.

Design notes (why it looks the way it does):

* Cancellation state lives in a separate :class:`_CancelState`, created only by
  ``with_cancel``/``with_timeout``/``with_deadline``. A ``with_value`` child
  shares its parent's state, so value-only contexts are four slots and checking
  them costs the same as checking their nearest cancellable ancestor. Contexts
  below :func:`background` with no cancellable ancestor have no state at all:
  ``err()`` is two attribute reads.
* No per-context lock: each state uses one of a fixed pool of striped locks,
  picked by identity. A lock is never held while taking another, nor while
  allocating container objects (which could start the cyclic GC and run
  arbitrary finalizers), nor while running user code, so striping cannot
  deadlock between threads.
* Signal handlers and finalizers may use contexts. CPython runs them on the
  current thread around any call, possibly while that thread holds a stripe,
  and such a handler may take the same stripe again (same state or a
  neighbour). So the stripes are reentrant locks, and a locked section makes
  at most one call (a ``set.add`` or ``list.append``) and re-reads the state
  after it, so that a nested section works as if it ran before or after the
  interrupted one. Done callbacks are an immutable chain swapped in with plain
  attribute access, since exactly-once could not survive a re-entered append.
  Waiting uses a private lock per waiter, which cancel releases: that never
  blocks, where ``threading.Event.set`` would deadlock in a handler that
  interrupted a wait on the same event.
* No timer threads: deadlines are checked lazily, by ``err()``, ``cancelled``
  and ``wait()`` (which sleeps no longer than the time left). The first
  observation that a deadline passed cancels, with :class:`DeadlineExceeded`,
  the context that owns that deadline, and hence its whole subtree. Done
  callbacks of a context that expires therefore run when someone next looks at
  it or at a context sharing its deadline (or when a callback is added in its
  tree, see ``_anchored`` below), not at the exact instant.
* A parent holds its cancellable children through weak references, removed when
  a child is garbage-collected or cancelled, so a long-lived parent never
  accumulates dead children. A state with done callbacks still to run must
  outlive its last outside reference, though: an ancestor's cancel has to reach
  it. While it has some, the root of its tree (the topmost state) holds it
  strongly, in ``_anchored``; that keeps its ancestors alive too (children
  hold their parents strongly). Cancelling it releases it. Each anchoring
  also looks at two anchored states and expires those past their deadline,
  so dropped contexts with deadlines cannot pile up under a long-lived root.
* A cancel is a loop, never a recursion: it marks the subtree (each step can
  be repeated, so an exception that a signal handler raises into it, Ctrl-C,
  is held until the loop has finished, then raised), then runs the callbacks
  from a per-thread queue. A cancel made while another runs on the same thread
  (by a done callback, a handler, a finalizer) marks at once and queues its
  callbacks there, so callbacks that cancel other contexts cannot recurse.
* ``err()`` returns a new exception each call: raising an exception appends the
  raiser's frames to its ``__traceback__``, so one shared instance, raised by
  every skipped task's future, would keep all those frames alive.
"""

from __future__ import annotations

import math
import sys
import threading
import time
import weakref
from collections import deque
from types import FrameType
from typing import Any, Callable, Optional, Union

from ._report import logger
from .errors import Cancelled, DeadlineExceeded

__all__ = ["Context", "background"]

_MSG: dict[type[Cancelled], str] = {
    Cancelled: "context canceled",
    DeadlineExceeded: "context deadline exceeded",
}

# Striped locks: a fixed pool shared by all states, so creating a context
# allocates no lock. 64 stripes keep false sharing between unrelated contexts
# rare; correctness never depends on two states having different stripes.
# Reentrant, for signal handlers and finalizers (see the module notes).
_NSTRIPES = 64
_LOCKS = tuple(threading.RLock() for _ in range(_NSTRIPES))

# Marks a context node that carries no value (a cancellation node).
_NO_KEY: Any = object()

DoneCallback = Callable[["Context"], object]
# Done callbacks, newest first: ((fn, ctx), older) ... None.
_Chain = Optional[tuple[tuple[DoneCallback, "Context"], "_Chain"]]
# A cancel's callback queue: a state whose callbacks are still to be taken, its
# chain once taken, then the chain as a list being run (see _CancelState._cancel).
_Pending = Union["_CancelState", _Chain, list[tuple[DoneCallback, "Context"]]]

# Exceptions a cancel absorbs (and raises the first of at the end) before it
# gives up on a step that keeps failing.
_MAX_STRIKES = 100


class _Cascade(threading.local):
    """The outermost cancel running on this thread and its callback queue.

    Nested cancels (from its callbacks, signal handlers, finalizers) queue
    their callbacks here instead of running them, so they cannot recurse.
    A queue left by a cancel that an exception ended is run by the next.
    """

    def __init__(self) -> None:
        # The frame of the outermost running _cancel; stale after an escaped
        # exception, which _on_stack detects.
        self.runner: FrameType | None = None
        self.runq: deque[_Pending] = deque()


_cascade = _Cascade()


def _check_seconds(name: str, x: object) -> float:
    """Validate a number of seconds / a monotonic time; return it as float."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be an int or float, not {type(x).__name__}")
    try:
        f = float(x)
    except OverflowError:
        # An int beyond any float: as far as waits go, infinity (no limit).
        f = math.inf if x > 0 else -math.inf
    if math.isnan(f):
        raise ValueError(f"{name} must not be NaN")
    return f


class _CancelState:
    """The cancellation state shared by a cancellable context and its value-only descendants."""

    __slots__ = (
        "_lock",
        "_err",
        "_deadline",
        "_dl_owner",
        "_parent",
        "_root",
        "_children",
        "_anchored",
        "_waiters",
        "_callbacks",
        "__weakref__",
    )

    _lock: threading.RLock
    # The cause once cancelled: Cancelled or DeadlineExceeded (err() makes the instance).
    _err: type[Cancelled] | None
    # Effective deadline: min(own, parent's).
    _deadline: float | None
    # The ancestor whose deadline this is; None when it is our own (or none).
    # Expiry cancels the owner, so siblings sharing the deadline see it too.
    _dl_owner: _CancelState | None
    _parent: _CancelState | None
    # The topmost state of the tree; None when it is this one.
    _root: _CancelState | None
    # Weak references to registered child states. Only ever mutated with single
    # set operations (add/discard/copy/clear), which are atomic in CPython with
    # or without the GIL: weakref callbacks run from the GC in any thread at any
    # moment, so removal must not wait for a lock.
    _children: set[weakref.ref[_CancelState]] | None
    # On a root only: the descendants with done callbacks still to run, held
    # strongly so that dropping them cannot lose the callbacks. Mutated with
    # single set operations outside any lock, like _children.
    _anchored: set[_CancelState] | None
    # Locks held on behalf of blocked wait() calls; cancel releases them.
    _waiters: list[threading.Lock] | None
    _callbacks: _Chain

    def __init__(self, parent: _CancelState | None, deadline: float | None) -> None:
        self._lock = _LOCKS[(id(self) >> 4) % _NSTRIPES]
        self._err = None
        self._parent = parent
        self._root = None if parent is None else (parent if parent._root is None else parent._root)
        self._children = None
        self._anchored = None
        self._waiters = None
        self._callbacks = None
        pdl = parent._deadline if parent is not None else None
        if deadline is not None and (pdl is None or deadline < pdl):
            self._deadline = deadline
            self._dl_owner = None
        else:
            self._deadline = pdl
            if pdl is None or parent is None:
                self._dl_owner = None
            else:
                self._dl_owner = parent._dl_owner if parent._dl_owner is not None else parent
        inherited = parent._register(self) if parent is not None else None
        if inherited is not None:
            # Parent already cancelled: start cancelled with the same cause.
            self._cancel(inherited, remove=False)
        elif self._deadline is not None:
            self._check_deadline()

    def _register(self, child: _CancelState) -> type[Cancelled] | None:
        """Add ``child`` to the registry; return the err type if already cancelled."""
        while True:
            # Allocate outside the lock (see module notes). The weakref's
            # callback is bound to one particular set, so if another thread
            # installs the set first we retry with that one.
            target = self._children
            fresh: set[weakref.ref[_CancelState]] | None = (
                set() if target is None else None
            )
            if target is None:
                assert fresh is not None
                target = fresh
            ref = weakref.ref(child, target.discard)
            with self._lock:
                err = self._err
                if err is not None:
                    return err
                cur = self._children
                if cur is None and fresh is not None:
                    self._children = cur = fresh
                if cur is target:
                    cur.add(ref)
                    # A signal handler or finalizer run around add() on this
                    # thread may have cancelled us and taken the set, with or
                    # without the child in it: the child then inherits the
                    # cause (cancelling it twice is harmless).
                    return self._err

    def cancel(self) -> None:
        """The cancel function handed out by ``with_cancel`` and friends."""
        if (
            self._err is None
            # Left over by a cancel that an exception interrupted: resume it.
            or self._children
            or self._callbacks is not None
            or self._waiters
            or self._anchored
        ):
            self._cancel(Cancelled, remove=True)

    def _check_deadline(self) -> type[Cancelled] | None:
        """Slow path of ``err()``: cancel if the deadline passed; return the cause."""
        dl = self._deadline
        if dl is not None and self._err is None and time.monotonic() >= dl:
            owner = self._dl_owner
            if owner is not None:
                owner._cancel(DeadlineExceeded, remove=True)
            if self._err is None:
                # Normally reached by the owner's cascade; this covers our own
                # deadline and any race with a concurrent registration.
                self._cancel(DeadlineExceeded, remove=True)
        return self._err

    def _get_err(self) -> type[Cancelled] | None:
        err = self._err
        if err is not None or self._deadline is None:
            return err
        return self._check_deadline()

    def _cancel(self, cause: type[Cancelled], remove: bool) -> None:
        """Cancel this state and its subtree, then run their done callbacks; first cause wins.

        Marks the whole subtree first and runs callbacks afterwards, so a
        callback sees the tree cancelled. Iterative, so deep chains cannot hit
        the recursion limit.

        Survives an exception raised into it by a signal handler (Ctrl-C) or a
        finalizer: each step can be repeated, so the walk retries the step it
        was in, finishes, and only then raises the first such exception. Work
        it leaves anyway (a second interrupt) stays on the states, where a
        second ``cancel()`` resumes it.

        A cancel made on this thread while another is running here (from a
        done callback, a signal handler or a finalizer) marks its subtree at
        once but leaves the callbacks to that outer cancel: they run after the
        callback in progress returns, so chains of callbacks that cancel
        contexts do not recurse.
        """
        cas = _cascade
        runner = cas.runner
        outermost = runner is None or not _on_stack(runner)
        if outermost:
            cas.runner = sys._getframe()
        runq = cas.runq
        marks = [(self, cause)]  # to mark, in order; _mark appends children
        i = 0
        first: BaseException | None = None
        strikes = 0
        while True:
            try:
                while i < len(marks):
                    st, cls = marks[i]
                    _mark(st, cls, marks, runq)
                    i += 1
                if remove:
                    parent = self._parent
                    siblings = None if parent is None else parent._children
                    if siblings is not None:
                        # A fresh ref compares equal to the registered one.
                        siblings.discard(weakref.ref(self))
                while outermost and runq:
                    head = runq[0]
                    if isinstance(head, _CancelState):
                        head._unanchor()  # runq holds it now
                        with head._lock:  # taken in one line: exactly once
                            runq[0], head._callbacks = head._callbacks, None
                    elif isinstance(head, tuple):
                        runq[0] = _newest_first(head)
                    elif head:
                        # One line: an interrupt runs it or leaves it queued.
                        _run_callback(*head.pop())
                    else:
                        runq.popleft()  # done, or callbacks someone else took
                if outermost:
                    cas.runner = None
                break
            except BaseException as exc:
                if first is None:
                    first = exc
                strikes += 1
                if strikes > _MAX_STRIKES:  # a persistent failure, not an interrupt
                    raise
        if first is not None:
            raise first

    def _add_callback(self, fn: DoneCallback, ctx: Context) -> bool:
        """Register ``fn``; return False if already cancelled (caller runs it)."""
        item = (fn, ctx)
        while True:
            head = self._callbacks
            node = (item, head)  # allocated outside the lock
            with self._lock:
                if self._err is not None:
                    return False
                if self._callbacks is head:  # else retry on the newer chain
                    self._callbacks = node
                    break
        self._anchor()
        return True

    def _anchor(self) -> None:
        """Have the root hold this state while it has callbacks to run."""
        root = self._root
        if root is None:
            return  # nothing above can cancel a root
        anchored = root._anchored
        if anchored is None:
            fresh: set[_CancelState] = set()
            with root._lock:
                if root._err is None:
                    anchored = root._anchored
                    if anchored is None:
                        anchored = root._anchored = fresh
            if anchored is None:
                # The root is cancelled but its cascade may not have reached us
                # yet, and nothing keeps us alive till it does: finish it here,
                # with the cause of our nearest cancelled ancestor.
                up = self._parent
                while up is not None and up._err is None:
                    up = up._parent
                assert up is not None and up._err is not None
                self._cancel(up._err, remove=False)
                return
        anchored.add(self)
        if self._err is not None:
            # Cancelled meanwhile: its callbacks are taken, and the canceller
            # may have looked for us before we were added.
            anchored.discard(self)
        _sweep(anchored)

    def _unanchor(self) -> None:
        root = self._root
        if root is not None:
            anchored = root._anchored
            if anchored is not None:
                anchored.discard(self)

    def _wait(self, timeout: float | None) -> bool:
        if self._get_err() is not None:
            return True
        end = None if timeout is None else time.monotonic() + timeout
        waiter = threading.Lock()
        waiter.acquire()  # cancel releases it
        fresh: list[threading.Lock] | None = [] if self._waiters is None else None
        waiters: list[threading.Lock] | None = None
        try:
            with self._lock:
                if self._err is not None:
                    return True
                waiters = self._waiters
                if waiters is None:
                    # Only cancel resets it to None, and it sets _err first.
                    assert fresh is not None
                    waiters = self._waiters = fresh
                waiters.append(waiter)
                if self._err is not None:  # cancelled by a handler run around append()
                    return True
            while True:
                limit = self._deadline
                if end is not None and (limit is None or end < limit):
                    limit = end
                if limit is None:
                    # A plain acquire() stays interruptible by Ctrl-C.
                    if waiter.acquire():
                        return True
                    continue
                remaining = limit - time.monotonic()
                if remaining > 0 and waiter.acquire(True, min(remaining, threading.TIMEOUT_MAX)):
                    return True
                if self._get_err() is not None:
                    return True
                if end is not None and time.monotonic() >= end:
                    return False
        finally:
            if waiters is not None:
                try:
                    waiters.remove(waiter)
                except ValueError:  # not reached (a Ctrl-C), or never added
                    pass


def _run_callback(fn: DoneCallback, ctx: Context) -> None:
    """Run a done callback; log whatever it raises (BaseException included),
    so that it can neither stop the other callbacks nor escape from cancel()."""
    try:
        fn(ctx)
    except BaseException as exc:
        # Lazy %r: a callable whose repr raises is the logging handler's problem.
        logger.error(
            "context done callback %r raised", fn, exc_info=(type(exc), exc, exc.__traceback__)
        )


def _mark(
    st: _CancelState,
    cause: type[Cancelled],
    marks: list[tuple[_CancelState, type[Cancelled]]],
    runq: deque[_Pending],
) -> None:
    """One step of a cancel: mark ``st`` and pass on what it holds.

    Idempotent, so an interrupted step can be repeated: each piece of work
    leaves the state only after it has been handed on (repeats are harmless:
    a second release or mark does nothing, and callbacks are taken once).
    """
    resumed = st._err is not None
    if not resumed:
        if cause is Cancelled and st._deadline is not None and time.monotonic() >= st._deadline:
            # The deadline passed before anyone cancelled: in Go the timer
            # would have fired already, so report DeadlineExceeded.
            cause = DeadlineExceeded
        with st._lock:
            if st._err is None:
                st._err = cause
    # Whoever marked it, its subtree gets the cause that won.
    err = st._err
    assert err is not None
    waiters = st._waiters
    if waiters:
        for lock in waiters.copy():  # a waiter that timed out removes itself
            try:
                lock.release()
            except RuntimeError:  # released by an earlier, interrupted pass
                pass
        st._waiters = None
    children = st._children
    if children:
        marks.extend([(child, err) for ref in children.copy() if (child := ref()) is not None])
        st._children = None
        # Breaks the set <-> weakref-callback cycle so it is freed now.
        children.clear()
    anchored = st._anchored
    if anchored and resumed:
        # A root: all it anchors are descendants, with callbacks. Reaching them
        # directly is how a cancel resumed after an escaped interrupt finds
        # those that the lost part of the walk would have reached.
        marks.extend([(a, err) for a in anchored.copy()])
    if st._callbacks is not None:
        runq.append(st)  # taken when run: a state queued twice runs them once


def _sweep(anchored: set[_CancelState]) -> None:
    """Look at two more of a root's anchored states: expire one past its
    deadline, drop one whose callbacks were taken.

    Deadlines are checked lazily, so a context dropped with a callback and a
    deadline would otherwise stay anchored until its root is cancelled, for
    ever under a long-lived root. Anchoring calls this, so the set is swept
    at least as fast as it grows. ``pop()`` cycles through a set's table.
    """
    for _ in range(2):
        try:
            st = anchored.pop()
        except KeyError:
            return
        if st._callbacks is None:
            continue  # fired (its unanchor may have raced with this pop)
        anchored.add(st)
        if st._callbacks is None:  # fired meanwhile
            anchored.discard(st)
        elif st._deadline is not None:
            st._get_err()  # cancels it if the deadline passed


def _newest_first(chain: _Chain) -> list[tuple[DoneCallback, Context]]:
    """The callbacks of a chain as a list whose ``pop()`` gives the oldest."""
    items = []
    while chain is not None:
        items.append(chain[0])
        chain = chain[1]
    return items


def _on_stack(frame: FrameType) -> bool:
    """Whether ``frame`` is running on this thread (not left behind by an exception)."""
    f: FrameType | None = sys._getframe(1)
    while f is not None:
        if f is frame:
            return True
        f = f.f_back
    return False


class Context:
    """An immutable context carrying cancellation, a deadline and values.

    Do not construct contexts directly: start from :func:`background` and derive
    children with the ``with_*`` methods. (``Context()`` returns a fresh root
    equivalent to :func:`background`.) Contexts are safe to share between threads.
    """

    __slots__ = ("_parent", "_key", "_value", "_state")

    _parent: Context | None
    _key: Any
    _value: Any
    _state: _CancelState | None

    def __init__(
        self,
        _parent: Context | None = None,
        _key: Any = _NO_KEY,
        _value: Any = None,
        _state: _CancelState | None = None,
    ) -> None:
        self._parent = _parent
        self._key = _key
        self._value = _value
        self._state = _state

    # -- derivation --------------------------------------------------------

    def with_value(self, key: object, value: object) -> Context:
        """Return a child carrying ``key`` -> ``value`` (shadows ancestors' ``key``)."""
        return Context(self, key, value, self._state)

    def with_cancel(self) -> tuple[Context, Callable[[], None]]:
        """Return ``(child, cancel)``. ``cancel()`` is idempotent and thread-safe."""
        st = _CancelState(self._state, None)
        return Context(self, _NO_KEY, None, st), st.cancel

    def with_deadline(self, deadline: float) -> tuple[Context, Callable[[], None]]:
        """Like :meth:`with_cancel`, also expiring at ``deadline`` (a ``time.monotonic()`` value).

        The effective deadline is the earlier of ``deadline`` and the parent's.
        A deadline already in the past gives an already-expired context.
        """
        return self._derive(_check_seconds("deadline", deadline))

    def with_timeout(self, seconds: float) -> tuple[Context, Callable[[], None]]:
        """Like :meth:`with_deadline` with ``deadline = time.monotonic() + seconds``.

        ``seconds <= 0`` gives an already-expired context; ``inf`` (or an int too
        large for a float) gives none.
        """
        return self._derive(time.monotonic() + _check_seconds("seconds", seconds))

    def _derive(self, deadline: float) -> tuple[Context, Callable[[], None]]:
        st = _CancelState(self._state, None if deadline == math.inf else deadline)
        return Context(self, _NO_KEY, None, st), st.cancel

    # -- inspection --------------------------------------------------------

    def value(self, key: object, default: Any = None) -> Any:
        """Return the value of the nearest ancestor (or self) that set ``key``."""
        ctx: Context | None = self
        while ctx is not None:
            k = ctx._key
            if k is key or (k is not _NO_KEY and k == key):
                return ctx._value
            ctx = ctx._parent
        return default

    def err(self) -> Cancelled | None:
        """``None`` while live; then a :class:`Cancelled` or :class:`DeadlineExceeded`
        saying what ended it.

        Each call returns a new exception (so raising it never keeps an earlier
        raiser's frames alive): compare causes by type, e.g.
        ``isinstance(ctx.err(), DeadlineExceeded)``, not by identity. The cause
        never changes once set.
        """
        st = self._state
        if st is None:
            return None
        cause = st._err
        if cause is None:
            if st._deadline is None:
                return None
            cause = st._check_deadline()
            if cause is None:
                return None
        return cause(_MSG[cause])

    @property
    def cancelled(self) -> bool:
        """True once cancelled or past the deadline."""
        st = self._state
        if st is None:
            return False
        if st._err is not None:
            return True
        if st._deadline is None:
            return False
        return st._check_deadline() is not None

    @property
    def deadline(self) -> float | None:
        """The effective deadline (``time.monotonic()`` seconds), or None."""
        st = self._state
        return None if st is None else st._deadline

    def wait(self, timeout: float | None = None) -> bool:
        """Block until cancelled (True) or ``timeout`` seconds pass (False).

        ``timeout=None`` (or ``inf``, or an int too large for a float) waits
        forever. Wakes when the deadline passes.
        """
        t: float | None = None
        if timeout is not None:
            t = _check_seconds("timeout", timeout)
            if t < 0:
                raise ValueError("timeout must be non-negative")
            if t == math.inf:
                t = None
        st = self._state
        if st is None:
            # Never cancelled: just sleep, interruptibly.
            ev = threading.Event()
            if t is None:
                while True:
                    ev.wait()
            end = time.monotonic() + t
            while (left := end - time.monotonic()) > 0:
                ev.wait(min(left, threading.TIMEOUT_MAX))
            return False
        return st._wait(t)

    def add_done_callback(self, fn: Callable[[Context], object]) -> None:
        """Call ``fn(self)`` once when this context is cancelled.

        Runs at once, in this thread, if already cancelled; otherwise in the
        thread that cancels (or first observes the deadline). A cancel made
        inside another done callback cancels at once but runs its callbacks
        after that callback returns (with those already queued). ``fn`` runs even if
        nothing else references this context any more: until then the context is
        kept alive (by the topmost cancellable ancestor, as Go's ``AfterFunc``).
        Whatever ``fn`` raises, KeyboardInterrupt and SystemExit included, is
        logged on the ``keyedexec`` logger, never raised, and the other
        callbacks still run. On a context that can never be cancelled, ``fn`` is
        dropped without being stored.
        """
        if not callable(fn):
            raise TypeError("fn must be callable")
        st = self._state
        if st is None:
            return
        if st._get_err() is not None or not st._add_callback(fn, self):
            _run_callback(fn, self)

    def __repr__(self) -> str:
        st = self._state
        cancelled = st is not None and (
            st._err is not None
            or (st._deadline is not None and time.monotonic() >= st._deadline)
        )
        n = 0
        ctx: Context | None = self
        while ctx is not None:
            if ctx._key is not _NO_KEY:
                n += 1
            ctx = ctx._parent
        dl = self.deadline
        dls = "None" if dl is None else f"{dl:.3f}"
        return f"<Context cancelled={cancelled} deadline={dls} values={n}>"


_BACKGROUND = Context()


def background() -> Context:
    """The root context: never cancelled, no deadline, no values."""
    return _BACKGROUND
