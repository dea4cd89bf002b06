# KeyedFuture's native half (included by _core.pyx).
#
# ``keyedexec._future.KeyedFuture`` derives from ``FutureBase`` (this C type)
# and from ``concurrent.futures.Future``. FutureBase keeps the state every
# stdlib function reads (``_state``, ``_result``, ``_exception``,
# ``_condition``, ``_waiters``, ``_done_callbacks``) in C fields behind
# properties, and implements the hot methods in C:
#
# * A new future is one small object: ``Future.__init__`` is not run, nothing
#   else is built. Its condition (``_Condition``, a C reentrant lock with a
#   condition variable), waiter list and callback list are made when someone
#   first looks at them while it is not final, and never for a future that is
#   final already: it answers with a shared no-op condition and waiter list
#   (a final future's state never changes, so there is nothing to guard).
# * The worker claims (PENDING -> RUNNING) and completes in C. A future that
#   nobody watches (no condition, no callback) is completed by two field
#   writes; a watched one by ``_finish``: FINISHED under its condition, the
#   stdlib waiters told (``add_result``/``add_exception``), the condition's
#   waiters woken, then the callbacks run, all with the GIL and none under the
#   scheduler's mutex.
#
# What this relies on in CPython (tests/test_future_paths.py checks each, on
# every CPython of the CI matrix):
#
# 1. A class may derive from one extension type with C fields and from a
#    plain Python class (``class KeyedFuture(FutureBase, Future)``): at most
#    one base has an instance layout. Its properties (data descriptors) win
#    over the instance dict, so the stdlib's ``self._state = ...`` lands here.
# 2. ``Future.__init__`` sets exactly the six attributes above (we skip it).
# 3. The stdlib's futures code uses a future's ``_condition`` only through
#    acquire/release/with/wait/wait_for/notify/notify_all, its ``_waiters``
#    only through append/remove/iteration, and a waiter only through
#    add_result/add_exception/add_cancelled.
# 4. With the GIL, C code that calls no Python code and allocates no object
#    the cyclic GC tracks runs without another thread in between: that makes
#    "check the state, then write it" atomic here (the claim against cancel(),
#    completion against someone starting to watch). On a free-threaded build
#    the same sections take a lock striped by address instead (_seal).

import copyreg as _copyreg
import os as _os
from concurrent.futures import Future as _StdFuture
from concurrent.futures._base import (
    CANCELLED as _CANCELLED_STR,
    CANCELLED_AND_NOTIFIED as _NOTIFIED_STR,
    LOGGER as _FUTURES_LOGGER,
)

cimport cython


cdef extern from *:
    """
    #include <chrono>
    static inline double ke_now(void) {
        return std::chrono::duration<double>(
            std::chrono::steady_clock::now().time_since_epoch()).count();
    }
    """
    double ke_now() nogil

cdef object _CANCELLED = _CANCELLED_STR
cdef object _NOTIFIED = _NOTIFIED_STR     # CANCELLED_AND_NOTIFIED
cdef object _LOGGER = _FUTURES_LOGGER
cdef object _std_result = _StdFuture.result
cdef object _std_exception = _StdFuture.exception
cdef object _future_class = None          # keyedexec._future.KeyedFuture, once defined

# Bumped in a forked child: conditions made before it start over there (_Condition._lock).
cdef unsigned long _fork_generation = 0

# Free-threaded builds only: the locks that make a future's check-then-write atomic.
DEF SEAL_STRIPES = 64
cdef ke_mutex *_seals[SEAL_STRIPES]


cdef inline ke_mutex *_seal_of(object fut) noexcept:
    return _seals[(<size_t><void *>fut >> 4) & (SEAL_STRIPES - 1)]


cdef inline void _seal(object fut) noexcept:
    if KE_FREE_THREADED:
        _acquire(_seal_of(fut))


cdef inline void _unseal(object fut) noexcept:
    if KE_FREE_THREADED:
        ke_unlock(_seal_of(fut))


def _seals_before_fork():
    if KE_FREE_THREADED:
        for i in range(SEAL_STRIPES):
            _acquire(_seals[i])


def _seals_after_fork_parent():
    if KE_FREE_THREADED:
        for i in range(SEAL_STRIPES):
            ke_unlock(_seals[i])


def _seals_after_fork_child():
    global _fork_generation
    _fork_generation += 1
    if KE_FREE_THREADED:
        for i in range(SEAL_STRIPES):   # held by this thread since the fork: fresh ones
            _seals[i] = ke_mutex_new()


cdef int _init_seals() except -1:
    if KE_FREE_THREADED:
        for i in range(SEAL_STRIPES):
            _seals[i] = ke_mutex_new()
            if _seals[i] is NULL:
                raise MemoryError()
    return 0


_init_seals()
if hasattr(_os, "register_at_fork"):
    _os.register_at_fork(before=_seals_before_fork, after_in_parent=_seals_after_fork_parent,
                         after_in_child=_seals_after_fork_child)


cdef inline bint _is_final(object st) noexcept:
    """FINISHED or CANCELLED_AND_NOTIFIED: nothing about the future changes any more."""
    return st is _FINISHED or st is _NOTIFIED


cdef inline bint _is_done(object st) noexcept:
    return st is _FINISHED or st is _CANCELLED or st is _NOTIFIED


# -- the condition ----------------------------------------------------------------------

ctypedef struct _WaitNode:
    _WaitNode *next
    bint signalled


@cython.final
@cython.auto_pickle(False)
cdef class _Condition:
    """A future's condition: what ``threading.Condition()`` (over an RLock)
    does for concurrent.futures and asyncio, in C. Blocking calls release the
    GIL and wake every 50 ms to run signal handlers (Ctrl-C) until done."""

    cdef ke_mutex *mu            # guards the fields below; never held while blocking with the GIL
    cdef ke_cond *cv             # lock hand-over and notifications
    cdef unsigned long owner     # thread ident, 0: unlocked
    cdef Py_ssize_t count        # reentrant depth
    cdef int blocked             # threads waiting for the lock
    cdef _WaitNode *head         # threads in wait(), oldest first (nodes on their stacks)
    cdef _WaitNode *tail
    cdef unsigned long generation

    def __cinit__(self):
        self.mu = ke_mutex_new()
        self.cv = ke_cond_new()
        self.generation = _fork_generation
        if self.mu is NULL or self.cv is NULL:
            raise MemoryError()

    def __dealloc__(self):
        ke_cond_free(self.cv)
        ke_mutex_free(self.mu)

    cdef inline void _lock(self) noexcept:
        if self.generation != _fork_generation:
            self._after_fork()
        _acquire(self.mu)

    cdef void _after_fork(self) noexcept:
        # Only the forking thread lives on: the other threads' holds and waits
        # are gone, and the mutex may have been held at the fork (leaked).
        cdef unsigned long me = PyThread_get_thread_ident()
        self.mu = ke_mutex_new()
        self.cv = ke_cond_new()
        if self.owner != me:
            self.owner = 0
            self.count = 0
        self.blocked = 0
        self.head = self.tail = NULL
        self.generation = _fork_generation

    cdef bint _take(self, bint blocking, double timeout, bint interruptible) except -1:
        """acquire(); ``timeout`` < 0: no limit."""
        cdef unsigned long me = PyThread_get_thread_ident()
        cdef double deadline = 0.0, slice_
        cdef bint got = False
        if timeout >= 0:
            deadline = ke_now() + timeout
        self._lock()
        while True:
            if self.owner == me:
                self.count += 1
                got = True
            elif self.owner == 0:
                self.owner = me
                self.count = 1
                got = True
            if got or not blocking:
                ke_unlock(self.mu)
                return got
            slice_ = 0.05
            if timeout >= 0:
                slice_ = min(slice_, deadline - ke_now())
                if slice_ <= 0:
                    ke_unlock(self.mu)
                    return False
            self.blocked += 1
            with nogil:
                ke_wait(self.cv, self.mu, slice_)
                self.blocked -= 1
                ke_unlock(self.mu)
            if interruptible:
                PyErr_CheckSignals()
            self._lock()

    cdef int _give(self) except -1:
        """release()"""
        cdef bint wake = False
        self._lock()
        if self.owner != PyThread_get_thread_ident():
            ke_unlock(self.mu)
            raise RuntimeError("cannot release un-acquired lock")
        self.count -= 1
        if self.count == 0:
            self.owner = 0
            wake = self.blocked > 0
        ke_unlock(self.mu)
        if wake:
            ke_notify_all(self.cv)
        return 0

    cdef int _notify(self, Py_ssize_t n) except -1:
        """Wake up to ``n`` threads in wait() (all if n < 0); the lock must be held."""
        cdef _WaitNode *node
        cdef Py_ssize_t woken = 0
        self._lock()
        if self.owner != PyThread_get_thread_ident():
            ke_unlock(self.mu)
            raise RuntimeError("cannot notify on un-acquired lock")
        while self.head is not NULL and (n < 0 or woken < n):
            node = self.head
            self.head = node.next
            node.signalled = True
            woken += 1
        if self.head is NULL:
            self.tail = NULL
        ke_unlock(self.mu)
        if woken:
            ke_notify_all(self.cv)
        return 0

    cdef bint _wait(self, double timeout) except -1:
        """wait(); ``timeout`` < 0: no limit. True unless it timed out."""
        cdef _WaitNode node
        cdef _WaitNode *p
        cdef unsigned long me = PyThread_get_thread_ident()
        cdef Py_ssize_t saved
        cdef double deadline = 0.0, slice_
        cdef bint signalled = False, wake
        if timeout >= 0:
            deadline = ke_now() + timeout
        self._lock()
        if self.owner != me:
            ke_unlock(self.mu)
            raise RuntimeError("cannot wait on un-acquired lock")
        node.next = NULL
        node.signalled = False
        if self.tail is NULL:
            self.head = &node
        else:
            self.tail.next = &node
        self.tail = &node
        saved = self.count   # release every level, as RLock's _release_save
        self.owner = 0
        self.count = 0
        wake = self.blocked > 0
        ke_unlock(self.mu)
        if wake:
            ke_notify_all(self.cv)
        try:
            while True:
                slice_ = 0.05
                if timeout >= 0:
                    slice_ = min(slice_, deadline - ke_now())
                    if slice_ <= 0:
                        break
                with nogil:
                    ke_lock(self.mu)
                    if not node.signalled:
                        ke_wait(self.cv, self.mu, slice_)
                    signalled = node.signalled
                    ke_unlock(self.mu)
                if signalled:
                    break
                PyErr_CheckSignals()
        finally:
            # Take the lock back (uninterruptibly, as Condition.wait does) and
            # leave the list if nobody took us off it.
            self._lock()
            signalled = node.signalled
            if not signalled:
                if self.head is &node:
                    self.head = node.next
                    if self.tail is &node:
                        self.tail = NULL
                else:
                    p = self.head
                    while p is not NULL and p.next is not &node:
                        p = p.next
                    if p is not NULL:
                        p.next = node.next
                        if self.tail is &node:
                            self.tail = p
            while self.owner != 0:
                self.blocked += 1
                with nogil:
                    ke_wait(self.cv, self.mu, 0.05)
                    self.blocked -= 1
                    ke_unlock(self.mu)
                self._lock()
            self.owner = me
            self.count = saved
            ke_unlock(self.mu)
        return signalled

    # -- threading.Condition's API ---------------------------------------------------------

    def acquire(self, blocking=True, timeout=-1):
        if not blocking and timeout != -1:
            raise ValueError("can't specify a timeout for a non-blocking call")
        if timeout < 0 and timeout != -1:
            raise ValueError("timeout value must be a non-negative number")
        return self._take(blocking, timeout, True)

    def __enter__(self):
        return self._take(True, -1.0, True)

    def release(self):
        self._give()

    def __exit__(self, *exc_info):
        self._give()

    def wait(self, timeout=None):
        return self._wait(-1.0 if timeout is None else max(0.0, <double>timeout))

    def wait_for(self, predicate, timeout=None):
        endtime = None
        waittime = timeout
        result = predicate()
        while not result:
            if waittime is not None:
                if endtime is None:
                    endtime = ke_now() + waittime
                else:
                    waittime = endtime - ke_now()
                    if waittime <= 0:
                        break
            self.wait(waittime)
            result = predicate()
        return result

    def notify(self, n=1):
        self._notify(n)

    def notify_all(self):
        self._notify(-1)

    def _is_owned(self):
        return self.owner == PyThread_get_thread_ident()

    def __repr__(self):
        return f"<keyedexec future condition, {'locked' if self.owner else 'unlocked'}>"


@cython.final
@cython.auto_pickle(False)
cdef class _FinalCondition:
    """The condition of a future that is final (FINISHED, or cancelled and
    notified) and never had one: its state can no longer change, so there is
    nothing to lock. ``wait`` returns at once: nobody waits for a final future."""

    def acquire(self, blocking=True, timeout=-1):
        return True

    def __enter__(self):
        return True

    def release(self):
        pass

    def __exit__(self, *exc_info):
        pass

    def wait(self, timeout=None):
        return True

    def wait_for(self, predicate, timeout=None):
        return predicate()

    def notify(self, n=1):
        pass

    def notify_all(self):
        pass


@cython.final
@cython.auto_pickle(False)
cdef class _FinalWaiters:
    """The waiter list of a final future that never had one: wait() and
    as_completed() add their waiter to every future and remove it after, but
    nothing would ever notify a final future's waiters."""

    def append(self, waiter):
        pass

    def remove(self, waiter):
        pass

    def __iter__(self):
        return iter(())

    def __len__(self):
        return 0


cdef object _FINAL_CONDITION = _FinalCondition()
cdef object _FINAL_WAITERS = _FinalWaiters()


cdef int _lock_condition(object cond, bint interruptible) except -1:
    if type(cond) is _Condition:
        (<_Condition>cond)._take(True, -1.0, interruptible)
    else:   # a threading.Condition that Future.__init__ made (a subclass that runs it)
        cond.acquire()
    return 0


cdef int _unlock_condition(object cond) except -1:
    if type(cond) is _Condition:
        (<_Condition>cond)._give()
    else:
        cond.release()
    return 0


cdef int _notify_all(object cond) except -1:
    if type(cond) is _Condition:
        (<_Condition>cond)._notify(-1)
    else:
        cond.notify_all()
    return 0


# -- the future -------------------------------------------------------------------------


@cython.auto_pickle(False)
cdef class FutureBase:
    """The C half of KeyedFuture (see keyedexec/_future.py)."""

    cdef object st        # one of concurrent.futures._base's state strings
    cdef object res
    cdef object exc
    cdef object cond      # _Condition (or what a subclass assigned), None until watched
    cdef object waiters   # list, None until first used
    cdef object callbacks # list, None until first used; taken when they run

    def __cinit__(self):
        self.st = _PENDING

    def __init__(self):
        pass   # instead of Future.__init__: everything it builds is made on demand

    # -- the attributes the stdlib's code reads and writes ------------------------------

    @property
    def _state(self):
        return self.st

    @_state.setter
    def _state(self, value):
        self.st = value

    @property
    def _result(self):
        return self.res

    @_result.setter
    def _result(self, value):
        self.res = value

    @property
    def _exception(self):
        return self.exc

    @_exception.setter
    def _exception(self, value):
        self.exc = value

    @property
    def _condition(self):
        return self._get_condition()

    @_condition.setter
    def _condition(self, value):
        self.cond = value

    @property
    def _waiters(self):
        if self.waiters is not None:
            return self.waiters
        if _is_final(self.st):
            return _FINAL_WAITERS
        fresh = []
        _seal(self)
        if self.waiters is None:
            self.waiters = fresh
        fresh = self.waiters
        _unseal(self)
        return fresh

    @_waiters.setter
    def _waiters(self, value):
        self.waiters = value

    @property
    def _done_callbacks(self):
        fresh = []
        _seal(self)
        if self.callbacks is None:
            self.callbacks = fresh
        fresh = self.callbacks
        _unseal(self)
        return fresh

    @_done_callbacks.setter
    def _done_callbacks(self, value):
        self.callbacks = value

    cdef object _get_condition(self):
        """The condition; made now unless the future is final already."""
        if self.cond is not None:
            return self.cond
        if _is_final(self.st):
            return _FINAL_CONDITION
        fresh = _Condition()   # allocated first: nothing runs between the check and the write below
        _seal(self)
        if self.cond is None:
            if _is_final(self.st):
                fresh = _FINAL_CONDITION
            else:
                self.cond = fresh
        if self.cond is not None:
            fresh = self.cond
        _unseal(self)
        return fresh

    # -- reads -----------------------------------------------------------------------

    def done(self):
        st = self.st
        return _is_done(st) or (type(st) is str and st in (_FINISHED, _CANCELLED, _NOTIFIED))

    def cancelled(self):
        st = self.st
        return st is _CANCELLED or st is _NOTIFIED or (type(st) is str and st in (_CANCELLED, _NOTIFIED))

    def running(self):
        return self.st == _RUNNING

    def result(self, timeout=None):
        if KE_FREE_THREADED:
            _seal(self)   # the outcome written before FINISHED is seen with it
            st, res, exc = self.st, self.res, self.exc
            _unseal(self)
        else:
            st, res, exc = self.st, self.res, self.exc
        if st is _FINISHED:
            if exc is None:
                return res
            raise exc
        return _std_result(self, timeout)

    def exception(self, timeout=None):
        if KE_FREE_THREADED:
            _seal(self)
            st, exc = self.st, self.exc
            _unseal(self)
        else:
            st, exc = self.st, self.exc
        if st is _FINISHED:
            return exc
        return _std_exception(self, timeout)

    # -- transitions -----------------------------------------------------------------

    def _claim(self):
        """PENDING -> RUNNING unless cancel() came first: the worker's claim."""
        return _claim_future(self)

    def cancel(self):
        cdef bint cancelled
        st = self.st
        if st is _FINISHED or st is _RUNNING:
            return False
        if st is _CANCELLED or st is _NOTIFIED:
            return True
        _seal(self)
        cond = self.cond
        if cond is None:
            # Nobody watches (no condition): nobody can be waiting to be told.
            cancelled = self._cancel_if_pending()
            _unseal(self)
        else:
            _unseal(self)
            _lock_condition(cond, True)
            try:
                _seal(self)
                cancelled = self._cancel_if_pending()
                _unseal(self)
                if cancelled:
                    _notify_all(cond)
            finally:
                _unlock_condition(cond)
        if not cancelled:
            return self.cancelled()   # already cancelled: True; started or done: False
        self._invoke_callbacks()
        return True

    cdef bint _cancel_if_pending(self) noexcept:
        """(sealed) PENDING -> CANCELLED."""
        if self.st is _PENDING or self.st == _PENDING:
            self.st = _CANCELLED
            return True
        return False

    def set_running_or_notify_cancel(self):
        if _claim_future(self):
            return True
        _seal(self)
        st = self.st
        cond = self.cond
        if st is _CANCELLED and cond is None:
            self.st = _NOTIFIED   # no condition: no waiter was ever added
            _unseal(self)
            return False
        _unseal(self)
        if st != _CANCELLED:
            raise RuntimeError(f"Future in unexpected state: {st}")
        _lock_condition(cond, True)
        try:
            self.st = _NOTIFIED
            waiters = self.waiters
            if waiters:
                for waiter in list(waiters):
                    waiter.add_cancelled(self)
        finally:
            _unlock_condition(cond)
        return False

    def _set_outcome(self, result, exception):
        """Complete a claimed (RUNNING) future; callbacks run as on a worker."""
        _finish(self, result, exception)

    def _invoke_callbacks(self, *, on_worker=False):
        """Run the done-callbacks, once each (see _run_callbacks)."""
        _run_callbacks(self, self._take_callbacks(), on_worker)

    cdef object _take_callbacks(self):
        _seal(self)
        callbacks = self.callbacks
        self.callbacks = None
        _unseal(self)
        return callbacks

    def add_done_callback(self, fn):
        fresh = [] if self.callbacks is None else None   # made before the check (GC)
        while True:
            _seal(self)
            if _is_done(self.st):
                _unseal(self)
                break
            if self.callbacks is None:
                if fresh is None:   # taken since we looked: look again
                    _unseal(self)
                    fresh = []
                    continue
                self.callbacks = fresh
            self.callbacks.append(fn)
            _unseal(self)
            return
        try:
            fn(self)
        except Exception:
            _LOGGER.exception("exception calling callback for %r", self)

    def __copy__(self):
        """A snapshot: a new future in the same state (a final one's outcome).
        As copy.copy of the stdlib's Future, ``__init__`` is not called and a
        subclass's own attributes (instance dict, slots) are copied shallowly."""
        cls = type(self)
        copy = cls.__new__(cls)
        if cls is not _future_class:   # KeyedFuture itself has none of its own
            state = getattr(self, "__dict__", None)
            if state:
                copy.__dict__.update(state)
            for name in _copyreg._slotnames(cls):
                if hasattr(self, name):
                    setattr(copy, name, getattr(self, name))
        st = self.st
        (<FutureBase>copy).st = _NOTIFIED if st is _CANCELLED else st
        (<FutureBase>copy).res = self.res
        (<FutureBase>copy).exc = self.exc
        return copy

    def __reduce_ex__(self, protocol):
        raise TypeError(f"cannot pickle {type(self).__name__!r} object: a future is a handle "
                        "on a task of this process")


cdef inline bint _claim_future(FutureBase fut) noexcept:
    """PENDING -> RUNNING, unless cancel() got there first."""
    cdef bint ok
    _seal(fut)
    st = fut.st
    # (equality: a PENDING that a test or subclass assigned from another string object)
    ok = st is _PENDING or (type(st) is str and st == _PENDING)
    if ok:
        fut.st = _RUNNING
    _unseal(fut)
    return ok


cdef int _finish(FutureBase fut, object result, object exc) except -1:
    """Outcome, then FINISHED; waiters told and callbacks run if anyone watches.
    User code that completed the running future itself (set_result, which
    takes the condition) came first: its outcome stands, this one is dropped."""
    _seal(fut)
    cond = fut.cond
    if cond is None:
        # Nobody watches, and nobody can start before this write: no waiter
        # has seen the future unfinished (see _get_condition).
        if exc is None:
            fut.res = result
        else:
            fut.exc = exc
        fut.st = _FINISHED
        callbacks = fut.callbacks
        fut.callbacks = None
        _unseal(fut)
        if callbacks is not None:
            _run_callbacks(fut, callbacks, True)
        return 0
    _unseal(fut)
    # As Future.set_result: FINISHED under the condition, so a waiter that saw
    # the future unfinished is told once, and one that saw it finished is not.
    _lock_condition(cond, False)
    try:
        _seal(fut)
        if fut.st is _FINISHED:
            _unseal(fut)
            return 0
        if exc is None:
            fut.res = result
        else:
            fut.exc = exc
        fut.st = _FINISHED
        _unseal(fut)
        waiters = fut.waiters
        if waiters:
            for waiter in list(waiters):
                try:
                    if exc is None:
                        waiter.add_result(fut)
                    else:
                        waiter.add_exception(fut)
                except BaseException:
                    _LOGGER.exception("exception notifying a waiter of %r", fut)
        _notify_all(cond)
    finally:
        _unlock_condition(cond)
    _run_callbacks(fut, fut._take_callbacks(), True)
    return 0


cdef int _run_callbacks(FutureBase fut, object callbacks, bint on_worker) except -1:
    """Call the done-callbacks in order. As in the stdlib, one that raises is
    logged and the next one runs; so is one that raises a BaseException
    (``sys.exit()``) on a worker thread, where it would end the worker. On the
    caller's own thread (``cancel()``, ``set_result()``) the first such is
    raised again once every callback ran, so that Ctrl-C and ``sys.exit()``
    still work there, as in the stdlib."""
    if not callbacks:
        return 0
    first = None
    for callback in callbacks:
        try:
            callback(fut)
        except BaseException as exc:
            if on_worker or isinstance(exc, Exception):
                try:
                    _LOGGER.exception("exception calling callback for %r", fut)
                except BaseException:
                    pass   # a broken log handler must not stop the other callbacks
            elif first is None:
                first = exc
    if first is not None:
        raise first
    return 0


cdef inline object _new_future():
    return _future_class()


def _install_future_class(cls):
    """Called by keyedexec._future once KeyedFuture (a FutureBase) exists."""
    global _future_class
    if not issubclass(cls, FutureBase):
        raise TypeError(f"{cls!r} does not derive from FutureBase")
    _future_class = cls


cdef inline bint _claim(object fut) except -1:
    """The scheduler's claim of a task's future (always a KeyedFuture)."""
    return _claim_future(<FutureBase>fut)


cdef inline void _complete(object fut, object result, object exc) noexcept:
    """The scheduler's completion of a claimed future. Never raises: a
    failure here (out of memory) is reported, as a worker has nobody to tell."""
    cdef FutureBase f = <FutureBase>fut
    if f.cond is None and f.callbacks is None and not KE_FREE_THREADED:
        # The common case inline: nobody watches (atomic with the GIL: see above).
        if exc is None:
            f.res = result
        else:
            f.exc = exc
        f.st = _FINISHED
        return
    try:
        _finish(f, result, exc)
    except BaseException as error:
        report_failure("keyedexec could not complete a future", error)
