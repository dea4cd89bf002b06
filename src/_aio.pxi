# AsyncKeyedExecutor's hot paths (included at the end of _core.pyx).
#
# keyedexec/aio.py keeps the scheduler's logic; this is the twin of its _PyCore:
# queueing a job (submit/execute, one C call each) and running, one after
# another, the jobs that finish without suspending: each job's first step runs
# in its own context (PyContext_Enter/Exit, as Context.run does) and is taken
# with PyIter_Send, so a job that returns at once costs no task, no frame of
# ours and no StopIteration. A job that suspends goes back to aio.py, which
# drives it from there. Everything here runs on the event loop's thread.

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

from asyncio import get_running_loop as _aio_get_running_loop
from collections import deque as _aio_deque
from types import CoroutineType as _aio_CoroutineType

# Set by keyedexec.aio (AsyncCore._setup): what the core shares with the facade.
cdef object _aio_job_var = None       # aio._current_job
cdef object _aio_as_coroutine = None  # aio._as_coroutine: any awaitable -> coroutine
cdef object _aio_not_callable = None  # aio._not_callable: the TypeError's text
cdef str _aio_closed = ""             # aio._CLOSED
cdef object _aio_YIELD = None, _aio_STOP = None


cdef int _aio_raise_set_error() except -1:
    return -1   # the error PyIter_Send set propagates from here


cdef class AioKey:
    """A key with queued or running jobs (aio._KeyState)."""
    cdef public object key
    cdef public object jobs      # deque of jobs: (coro_fn, args, kwargs, future, context)
    cdef public int serving      # aio._QUEUED or aio._SERVED

    def __init__(self, key):
        self.key = key
        self.jobs = _aio_deque()
        self.serving = 0


cdef class AioState:
    """A runner's place in the work (aio._State)."""
    cdef public object ks
    cdef public int served, unyielded, stops
    cdef public object job, drive

    def __init__(self):
        self.ks = self.job = self.drive = None


cdef class AsyncCore:
    """AsyncKeyedExecutor's hot paths: see keyedexec/aio.py (_PyCore)."""
    cdef public object owner        # weak reference to the AsyncKeyedExecutor
    cdef public object loop
    cdef public bint closed
    cdef public int concurrency, batch
    cdef public dict keys
    cdef public object ready
    cdef public set runners
    cdef public Py_ssize_t running, pending
    cdef public unsigned long long submitted, completed, failed, cancelled

    def __init__(self, owner, int concurrency, int batch):
        if _aio_job_var is None:   # first use: take what keyedexec.aio shares with the core
            from keyedexec import aio
            AsyncCore._setup(aio._current_job, aio._as_coroutine, aio._not_callable, aio._CLOSED,
                             aio.YIELD, aio.STOP)
        self.owner = owner
        self.concurrency = concurrency
        self.batch = batch
        self.loop = None
        self.keys = {}
        self.ready = _aio_deque()
        self.runners = set()

    @staticmethod
    def _setup(job_var, as_coroutine, not_callable, str closed, yield_, stop):
        global _aio_job_var, _aio_as_coroutine, _aio_not_callable, _aio_closed
        global _aio_YIELD, _aio_STOP
        _aio_job_var, _aio_as_coroutine, _aio_not_callable = job_var, as_coroutine, not_callable
        _aio_closed, _aio_YIELD, _aio_STOP = closed, yield_, stop

    @staticmethod
    def new_state():
        return AioState()

    def _fast_methods(self):
        """(submit, execute) bound to this core, taking their arguments as a vector."""
        return tuple(PyCFunction_NewEx(&_AIO_FAST_DEFS[i], self, __name__) for i in range(2))

    cdef object _loop_for_call(self):
        try:
            loop = _aio_get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or loop is not self.loop:
            loop = self.owner()._bind()   # adopts the loop, or raises why not
        return loop

    cpdef push(self, key, fn, args, kwargs, fut, ctx):
        cdef AioKey ks
        if not PyCallable_Check(fn):
            raise TypeError(_aio_not_callable(fn))
        try:
            found = self.keys.get(key)
        except TypeError as exc:
            raise TypeError(f"key must be hashable, got {type(key).__name__}") from exc
        if self.closed:
            raise RuntimeError(_aio_closed)
        job = (fn, args, kwargs, fut, ctx)
        if found is None:
            ks = AioKey(key)
            self.keys[key] = ks
            self.ready.append(ks)
            ks.jobs.append(job)
            self.pending += 1
            self.submitted += 1
            if len(self.runners) < self.concurrency:
                self.owner()._spawn()
            return
        (<AioKey>found).jobs.append(job)
        self.pending += 1
        self.submitted += 1

    cpdef release(self, AioKey ks):
        """A runner lets go of a key: back in line if it has work, else freed."""
        ks.serving = 0
        if ks.jobs:
            self.ready.append(ks)
        elif self.keys.get(ks.key) is ks:
            del self.keys[ks.key]

    def run(self, AioState st):
        """Run ready jobs until one suspends: returns (coroutine, its context,
        what it awaits, its future). Or YIELD, STOP, None: see aio._PyCore.run."""
        cdef AioKey ks
        cdef tuple job
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
            jobs = ks.jobs
            if st.stops or not jobs or st.served >= self.batch:
                st.ks = None
                self.release(ks)
                if st.stops:
                    return _aio_STOP
                continue
            if st.unyielded >= self.batch:
                st.unyielded = 0
                return _aio_YIELD
            st.served += 1
            job = jobs.popleft()
            self.pending -= 1
            fut = job[3]
            if fut is not None and fut.done():   # cancelled before its turn
                self.cancelled += 1
                continue
            self.running += 1
            st.job = mark = object()   # not the job: see aio._current_job
            ctx = job[4]
            coro = None
            try:
                PyContext_Enter(ctx)
                try:
                    coro = _aio_call(job, mark)
                    sent = PyIter_Send(<PyObject *>coro, <PyObject *>None, &res)
                    if sent == PYGEN_ERROR:
                        _aio_raise_set_error()
                finally:
                    PyContext_Exit(ctx)
            except BaseException as exc:
                st.unyielded += 1
                self.running -= 1
                st.job = None
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
            if fut is not None and not fut.done():
                fut.set_result(step)


cdef object _aio_call(tuple job, mark):
    """In the job's context: mark it as the job's, call coro_fn, return a coroutine."""
    PyContextVar_Set(_aio_job_var, mark)
    fn = job[0]
    kwargs = job[2]
    try:
        if kwargs:
            aw = fn(*<tuple>job[1], **kwargs)
        else:
            aw = fn(*<tuple>job[1])
    except StopIteration as exc:   # not a coroutine's return: a failure of the call
        raise RuntimeError(f"coro_fn raised {exc!r}") from None
    if type(aw) is not _aio_CoroutineType:
        aw = _aio_as_coroutine(aw)
    return aw


cdef PyObject *_aio_submit_vc(PyObject *self, PyObject **args, Py_ssize_t nargs,
                              PyObject *kwnames) except NULL:
    _check_call(b"submit", nargs)
    core = <AsyncCore>self
    fut = core._loop_for_call().create_future()
    core.push(<object>args[0], <object>args[1], _rest(args, nargs),
              _kwargs(args, nargs, kwnames), fut, PyContext_CopyCurrent())
    Py_INCREF_raw(<PyObject *>fut)   # the caller's reference
    return <PyObject *>fut


cdef PyObject *_aio_execute_vc(PyObject *self, PyObject **args, Py_ssize_t nargs,
                               PyObject *kwnames) except NULL:
    _check_call(b"execute", nargs)
    core = <AsyncCore>self
    core._loop_for_call()
    core.push(<object>args[0], <object>args[1], _rest(args, nargs),
              _kwargs(args, nargs, kwnames), None, PyContext_CopyCurrent())
    Py_INCREF_raw(<PyObject *>None)
    return <PyObject *>None


cdef PyMethodDef _AIO_FAST_DEFS[2]
_AIO_FAST_DEFS[0].ml_name = b"submit"
_AIO_FAST_DEFS[0].ml_meth = <PyCFunction><void *>_aio_submit_vc
_AIO_FAST_DEFS[0].ml_flags = METH_FASTCALL | METH_KEYWORDS
_AIO_FAST_DEFS[0].ml_doc = (b"submit(key, coro_fn, /, *args, **kwargs)\n--\n\n"
                            b"Run await coro_fn(*args, **kwargs) after key's queued jobs; "
                            b"return an asyncio.Future of its result.")
_AIO_FAST_DEFS[1].ml_name = b"execute"
_AIO_FAST_DEFS[1].ml_meth = <PyCFunction><void *>_aio_execute_vc
_AIO_FAST_DEFS[1].ml_flags = METH_FASTCALL | METH_KEYWORDS
_AIO_FAST_DEFS[1].ml_doc = (b"execute(key, coro_fn, /, *args, **kwargs)\n--\n\n"
                            b"Like submit, fire and forget: an exception goes to on_error.")
