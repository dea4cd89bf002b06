# AsyncKeyedExecutor's hot paths (included at the end of _core.pyx).
#
# keyedexec/aio.py keeps the scheduler's logic; this is the twin of its _PyCore:
# queueing a job (AsyncKeyedExecutor.submit/execute are method descriptors of
# ours: one C call from the caller to the queue) and running, one after another,
# the jobs that finish without suspending: each job's first step runs in its own
# context (PyContext_Enter/Exit, as Context.run does) and is taken with
# PyIter_Send, so a job that returns at once costs no task, no frame of ours and
# no StopIteration. A job that suspends goes back to aio.py, which drives it
# from there. Everything here runs on the event loop's thread.
#
# A queued job is no Python object: its references wait in its key's C ring
# (AioJob), and its context is untracked by the cycle collector until the job is
# taken off the ring. Thousands of queued jobs would otherwise be thousands of
# containers that every collection walks (as the threaded core, the rings are
# not traversed: a cycle through a queued job lives until the job runs or is
# dropped).

cdef extern from "Python.h":
    int PyContext_Enter(object ctx) except -1
    int PyContext_Exit(object ctx) except -1
    object PyContext_CopyCurrent()
    object PyContextVar_Set(object var, object value)
    ctypedef enum PySendResult:
        PYGEN_RETURN
        PYGEN_ERROR
        PYGEN_NEXT
    PySendResult PyIter_Send(PyObject *iter, PyObject *arg, PyObject **presult)
    void PyObject_GC_Track(void *o)
    void PyObject_GC_UnTrack(void *o)
    int PyObject_GC_IsTracked(PyObject *o)
    object PyObject_Call(object fn, object args, object kwargs)
    PyObject *PyObject_Vectorcall(PyObject *fn, PyObject **args, size_t nargsf,
                                  PyObject *kwnames) except NULL

cdef extern from *:
    """
    static PyObject *ke_method_descriptor(PyObject *type, PyMethodDef *def) {
        return PyDescr_NewMethod((PyTypeObject *)type, def);
    }
    """
    object ke_method_descriptor(object type, PyMethodDef *meth)

from asyncio import BaseEventLoop as _aio_BaseEventLoop, futures as _aio_futures
from asyncio import CancelledError as _aio_CancelledError
from asyncio import get_running_loop as _aio_get_running_loop
from collections import deque as _aio_deque
from inspect import cleandoc as _aio_cleandoc
from types import CoroutineType as _aio_CoroutineType

# Set by keyedexec.aio (AsyncCore._setup): what the core shares with the facade.
cdef object _aio_job_var = None       # aio._current_job
cdef object _aio_as_coroutine = None  # aio._as_coroutine: any awaitable -> coroutine
cdef object _aio_not_callable = None  # aio._not_callable: the TypeError's text
cdef str _aio_closed = ""             # aio._CLOSED
cdef object _aio_base_create_future = _aio_BaseEventLoop.create_future
cdef object _aio_YIELD = None, _aio_STOP = None


cdef int _aio_raise_set_error() except -1:
    return -1   # the error PyIter_Send set propagates from here


ctypedef struct AioJob:
    PyObject *fn
    PyObject *args
    PyObject *kwargs     # NULL: no keyword arguments
    PyObject *fut        # NULL: execute (no future)
    PyObject *ctx        # a copy of the submitter's context
    uint64_t stamp       # submit time (ns; the coarse clock unless timed)
    bint timed           # its wait and run go into the timings (sample_timings)


cdef inline void _aio_track(PyObject *ctx) noexcept:
    # Before the context leaves the ring (to run, or to be released: a Context's
    # dealloc expects to be tracked).
    if not PyObject_GC_IsTracked(ctx):
        PyObject_GC_Track(ctx)


cdef inline void _aio_release(AioJob *job) noexcept:
    _aio_track(job.ctx)
    Py_DECREF_raw(job.fn)
    Py_DECREF_raw(job.args)
    Py_XDECREF_raw(job.kwargs)
    Py_XDECREF_raw(job.fut)
    Py_DECREF_raw(job.ctx)


cdef class AioKey:
    """A key with queued or running jobs (aio._KeyState). Its queued jobs wait,
    in order, in a ring of C structs (capacity a power of two)."""
    cdef public object key
    cdef public int serving      # aio._QUEUED or aio._SERVED
    cdef readonly Py_ssize_t queued
    # The oldest queued job's stamp, or 0 (hot_keys): a copy, so that another
    # thread reads it without touching the ring, which the loop may reallocate.
    cdef readonly uint64_t oldest
    cdef AioJob *ring
    cdef Py_ssize_t cap, head

    def __init__(self, key):
        self.key = key

    def __dealloc__(self):
        self._clear()

    cdef int put(self, fn, args, kwargs, fut, ctx, uint64_t stamp, bint timed) except -1:
        cdef AioJob *job
        if self.queued == self.cap:
            self._grow()
        job = &self.ring[(self.head + self.queued) & (self.cap - 1)]
        job.fn, job.args, job.ctx = <PyObject *>fn, <PyObject *>args, <PyObject *>ctx
        job.kwargs = <PyObject *>NULL if kwargs is None else <PyObject *>kwargs
        job.fut = <PyObject *>NULL if fut is None else <PyObject *>fut
        job.stamp, job.timed = stamp, timed
        Py_INCREF_raw(job.fn)
        Py_INCREF_raw(job.args)
        Py_INCREF_raw(job.ctx)
        if job.kwargs is not NULL:
            Py_INCREF_raw(job.kwargs)
        if job.fut is not NULL:
            Py_INCREF_raw(job.fut)
        PyObject_GC_UnTrack(job.ctx)   # nothing but this ring refers to it until it runs
        if not self.queued:
            self.oldest = stamp
        self.queued += 1
        return 0

    cdef int _grow(self) except -1:
        cdef Py_ssize_t cap = self.cap * 2 if self.cap else 4
        cdef AioJob *ring = <AioJob *>PyMem_Malloc(cap * sizeof(AioJob))
        cdef Py_ssize_t i
        if ring is NULL:
            raise MemoryError()
        for i in range(self.queued):
            ring[i] = self.ring[(self.head + i) & (self.cap - 1)]
        PyMem_Free(self.ring)
        self.ring, self.cap, self.head = ring, cap, 0
        return 0

    cdef AioJob take(self) noexcept:
        """The oldest queued job (queued > 0); the caller owns its references."""
        cdef AioJob job = self.ring[self.head]
        self.head = (self.head + 1) & (self.cap - 1)
        self.queued -= 1
        self.oldest = self.ring[self.head].stamp if self.queued else 0
        _aio_track(job.ctx)
        return job

    def drop(self):
        """Take every queued job off; returns their futures (execute's have none)."""
        cdef Py_ssize_t i
        cdef AioJob *job
        futures = []   # filled before anything is released: a MemoryError drops nothing
        for i in range(self.queued):
            job = &self.ring[(self.head + i) & (self.cap - 1)]
            if job.fut is not NULL:
                futures.append(<object>job.fut)
        self._clear()
        return futures

    cdef void _clear(self) noexcept:
        # Detached first: releasing a reference may run code that submits here again.
        cdef AioJob *ring = self.ring
        cdef Py_ssize_t cap = self.cap, head = self.head, n = self.queued, i
        self.ring = NULL
        self.cap = self.head = self.queued = 0
        self.oldest = 0
        for i in range(n):
            _aio_release(&ring[(head + i) & (cap - 1)])
        PyMem_Free(ring)


cdef class AioState:
    """A runner's place in the work (aio._State)."""
    cdef public object ks
    cdef public int served, unyielded, stops
    cdef public object job, drive
    cdef public unsigned long long seq       # jobs started (the slow-job check)
    cdef public unsigned long long stamp     # the running job's submit stamp (ns), if timed
    cdef public unsigned long long started   # its start (ns) if it is timed, else 0

    def __init__(self):
        self.ks = self.job = self.drive = None


cdef class AsyncCore:
    """AsyncKeyedExecutor's hot paths: see keyedexec/aio.py (_PyCore)."""
    cdef public object owner        # weak reference to the AsyncKeyedExecutor
    cdef object _loop
    cdef bint loop_has_thread_id    # _loop is an asyncio.BaseEventLoop (_loop_for_call)
    cdef dict future_kwargs         # {"loop": _loop} if it keeps BaseEventLoop.create_future
    cdef public bint closed
    cdef public int concurrency, batch
    cdef public dict keys
    cdef public object ready
    cdef public set runners
    cdef public Py_ssize_t running, pending
    cdef public unsigned long long submitted, completed, failed, cancelled
    cdef Timing timing

    def __init__(self, owner, int concurrency, int batch, uint32_t sample_timings=32):
        if _aio_job_var is None:   # first use: take what keyedexec.aio shares with the core
            from keyedexec import aio
            AsyncCore._setup(aio._current_job, aio._as_coroutine, aio._not_callable, aio._CLOSED,
                             aio.YIELD, aio.STOP)
        self.owner = owner
        self.concurrency = concurrency
        self.batch = batch
        self.keys = {}
        self.ready = _aio_deque()
        self.runners = set()
        _timing_init(&self.timing, sample_timings)

    @property
    def loop(self):
        return self._loop

    @loop.setter
    def loop(self, loop):
        self._loop = loop
        self.loop_has_thread_id = isinstance(loop, _aio_BaseEventLoop)
        self.future_kwargs = None
        if self.loop_has_thread_id and type(loop).create_future is _aio_base_create_future:
            self.future_kwargs = {"loop": loop}

    cdef object new_future(self, loop):
        if self.future_kwargs is not None and loop is self._loop:
            # What BaseEventLoop.create_future does, without its Python frame.
            return PyObject_Call(_aio_futures.Future, (), self.future_kwargs)
        return loop.create_future()

    @staticmethod
    def _setup(job_var, as_coroutine, not_callable, str closed, yield_, stop):
        global _aio_job_var, _aio_as_coroutine, _aio_not_callable, _aio_closed
        global _aio_YIELD, _aio_STOP
        _aio_job_var, _aio_as_coroutine, _aio_not_callable = job_var, as_coroutine, not_callable
        _aio_closed, _aio_YIELD, _aio_STOP = closed, yield_, stop

    @staticmethod
    def new_state():
        return AioState()

    @staticmethod
    def executor_methods(cls):
        """AsyncKeyedExecutor's (submit, execute): method descriptors of ``cls``,
        called with the executor and the interpreter's argument vector."""
        for i, name in enumerate(("submit", "execute")):
            doc = getattr(cls, name).__doc__
            if doc:   # the Python method's docstring, after the signature C needs
                _aio_docs[i] = _AIO_SIGNATURES[i] + b"\n--\n\n" + _aio_cleandoc(doc).encode()
                _AIO_FAST_DEFS[i].ml_doc = _aio_docs[i]
        return tuple(ke_method_descriptor(cls, &_AIO_FAST_DEFS[i]) for i in range(2))

    # What the facade's Python methods call when this core is swapped into a
    # pure-Python build (tests); executor_methods() is the way in otherwise.
    def submit(self, key, fn, /, *args, **kwargs):
        return _aio_submit(self, self.owner(), key, fn, args, kwargs)

    def execute(self, key, fn, /, *args, **kwargs):
        _aio_execute(self, self.owner(), key, fn, args, kwargs)

    cdef object _loop_for_call(self, executor):
        """The executor's loop, if it runs this call; else ``executor._bind()``
        adopts the running loop or raises why not."""
        loop = self._loop
        if self.loop_has_thread_id:
            # An asyncio.BaseEventLoop keeps in ``_thread_id`` the thread that runs
            # it, None when stopped: a private attribute, in every CPython we support
            # (pinned by tests/test_aio.py). On 3.10/3.11 get_running_loop() calls
            # getpid(), a system call, every time; this read is a dict lookup.
            thread_id = getattr(loop, "_thread_id", None)
            if thread_id is not None and <unsigned long>thread_id == PyThread_get_thread_ident():
                return loop
        try:
            running = _aio_get_running_loop()
        except RuntimeError:
            running = None
        if running is None or running is not loop:
            running = executor._bind()
        return running

    def timings(self):
        """See Scheduler.timings."""
        return _timing_tuple(&self.timing)

    cpdef record(self, uint64_t stamp, uint64_t started, uint64_t ended):
        """A timed job that suspended has ended (returned or raised)."""
        _timing_record(&self.timing, stamp, started, ended)

    @staticmethod
    def now_ns():
        """The clock of the jobs' stamps."""
        return ke_now_ns()

    cpdef push(self, key, fn, args, kwargs, fut, ctx):
        cdef AioKey ks
        cdef uint64_t stamp
        cdef bint timed = False
        if not PyCallable_Check(fn):
            raise TypeError(_aio_not_callable(fn))
        try:
            found = self.keys.get(key)
        except TypeError as exc:
            raise TypeError(f"key must be hashable, got {type(key).__name__}") from exc
        if self.closed:
            raise RuntimeError(_aio_closed)
        if not kwargs:
            kwargs = None
        if self.timing.every and _timing_take(&self.timing):
            timed = True
            stamp = ke_now_ns()
        else:
            stamp = ke_coarse_ns()   # for hot_keys
        if found is None:
            ks = AioKey(key)
            ks.put(fn, args, kwargs, fut, ctx, stamp, timed)
            self.keys[key] = ks
            self.ready.append(ks)
            self.pending += 1
            self.submitted += 1
            if len(self.runners) < self.concurrency:
                self.owner()._spawn()
            return
        (<AioKey>found).put(fn, args, kwargs, fut, ctx, stamp, timed)
        self.pending += 1
        self.submitted += 1

    cpdef release(self, AioKey ks):
        """A runner lets go of a key: back in line if it has work, else freed."""
        ks.serving = 0
        if ks.queued:
            self.ready.append(ks)
        elif self.keys.get(ks.key) is ks:
            del self.keys[ks.key]

    def run(self, AioState st):
        """Run ready jobs until one suspends: returns (coroutine, its context,
        what it awaits, its future). Or YIELD, STOP, None: see aio._PyCore.run."""
        cdef AioKey ks
        cdef AioJob job
        cdef PyObject *res = NULL
        cdef PySendResult sent
        ready = self.ready
        while True:
            if st.ks is None:
                if not ready:
                    return None
                ks = ready.popleft()
                ks.serving = 1
                st.ks = ks
                st.served = 0
            else:
                ks = st.ks
            if st.stops or not ks.queued or st.served >= self.batch:
                st.ks = None
                self.release(ks)
                if st.stops:
                    return _aio_STOP
                continue
            if st.unyielded >= self.batch:
                st.unyielded = 0
                return _aio_YIELD
            st.served += 1
            job = ks.take()
            self.pending -= 1
            # The ring's references become these variables'.
            fn, args, ctx = <object>job.fn, <object>job.args, <object>job.ctx
            kwargs = None if job.kwargs is NULL else <object>job.kwargs
            fut = None if job.fut is NULL else <object>job.fut
            _aio_release(&job)
            if fut is not None and fut.done():   # cancelled before its turn
                self.cancelled += 1
                continue
            self.running += 1
            st.job = mark = object()   # not the job: see aio._current_job
            st.seq += 1
            if job.timed:
                st.stamp = job.stamp
                st.started = ke_now_ns()
            else:
                st.started = 0
            coro = None
            try:
                PyContext_Enter(ctx)
                try:
                    coro = _aio_call(fn, args, kwargs, mark)
                    sent = PyIter_Send(<PyObject *>coro, <PyObject *>None, &res)
                    if sent == PYGEN_ERROR:
                        _aio_raise_set_error()
                finally:
                    PyContext_Exit(ctx)
            except BaseException as exc:
                st.unyielded += 1
                self.running -= 1
                st.job = None
                if job.timed and not isinstance(exc, _aio_CancelledError):
                    _timing_record(&self.timing, job.stamp, st.started, ke_now_ns())
                self.owner()._failed_or_cancelled(ks.key, fut, exc)
                continue
            step = <object>res
            Py_DECREF_raw(res)
            res = NULL
            if sent == PYGEN_NEXT:
                st.unyielded = 0
                return coro, ctx, step, fut
            # Done without suspending: the fast path.
            st.unyielded += 1
            self.running -= 1
            st.job = None
            self.completed += 1
            if job.timed:
                _timing_record(&self.timing, job.stamp, st.started, ke_now_ns())
            if fut is not None and not fut.done():
                fut.set_result(step)


cdef object _aio_call(fn, tuple args, kwargs, mark):
    """In the job's context: mark it as the job's, call coro_fn, return a coroutine."""
    PyContextVar_Set(_aio_job_var, mark)
    try:
        if kwargs is None:
            aw = fn(*args)
        else:
            aw = fn(*args, **kwargs)
    except StopIteration as exc:   # not a coroutine's return: a failure of the call
        raise RuntimeError(f"coro_fn raised {exc!r}") from None
    if type(aw) is not _aio_CoroutineType:
        aw = _aio_as_coroutine(aw)
    return aw


cdef PyObject *_aio_forward(core, name, PyObject **args, Py_ssize_t nargs,
                            PyObject *kwnames) except NULL:
    # Another core than ours (the pure twin, swapped in by tests and benchmarks).
    meth = getattr(core, name)
    return PyObject_Vectorcall(<PyObject *>meth, args, nargs, kwnames)


cdef object _aio_submit(AsyncCore core, executor, key, fn, tuple args, kwargs):
    fut = core.new_future(core._loop_for_call(executor))
    core.push(key, fn, args, kwargs, fut, PyContext_CopyCurrent())
    return fut


cdef object _aio_execute(AsyncCore core, executor, key, fn, tuple args, kwargs):
    core._loop_for_call(executor)
    core.push(key, fn, args, kwargs, None, PyContext_CopyCurrent())


cdef PyObject *_aio_submit_vc(PyObject *self, PyObject **args, Py_ssize_t nargs,
                              PyObject *kwnames) except NULL:
    executor = <object>self
    core = executor._core
    if type(core) is not AsyncCore:
        return _aio_forward(core, "submit", args, nargs, kwnames)
    _check_call(b"submit", nargs)
    fut = _aio_submit(core, executor, <object>args[0], <object>args[1], _rest(args, nargs),
                      _kwargs(args, nargs, kwnames))
    Py_INCREF_raw(<PyObject *>fut)   # the caller's reference
    return <PyObject *>fut


cdef PyObject *_aio_execute_vc(PyObject *self, PyObject **args, Py_ssize_t nargs,
                               PyObject *kwnames) except NULL:
    executor = <object>self
    core = executor._core
    if type(core) is not AsyncCore:
        return _aio_forward(core, "execute", args, nargs, kwnames)
    _check_call(b"execute", nargs)
    _aio_execute(core, executor, <object>args[0], <object>args[1], _rest(args, nargs),
                 _kwargs(args, nargs, kwnames))
    Py_INCREF_raw(<PyObject *>None)
    return <PyObject *>None


cdef PyMethodDef _AIO_FAST_DEFS[2]
_AIO_SIGNATURES = (b"submit($self, key, coro_fn, /, *args, **kwargs)",
                   b"execute($self, key, coro_fn, /, *args, **kwargs)")
_aio_docs = list(_AIO_SIGNATURES)   # keeps alive the docs the method definitions point to
_AIO_FAST_DEFS[0].ml_name = b"submit"
_AIO_FAST_DEFS[0].ml_meth = <PyCFunction><void *>_aio_submit_vc
_AIO_FAST_DEFS[0].ml_flags = METH_FASTCALL | METH_KEYWORDS
_AIO_FAST_DEFS[0].ml_doc = _AIO_SIGNATURES[0]
_AIO_FAST_DEFS[1].ml_name = b"execute"
_AIO_FAST_DEFS[1].ml_meth = <PyCFunction><void *>_aio_execute_vc
_AIO_FAST_DEFS[1].ml_flags = METH_FASTCALL | METH_KEYWORDS
_AIO_FAST_DEFS[1].ml_doc = _AIO_SIGNATURES[1]
