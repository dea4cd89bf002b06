# cython: language_level=3, freethreading_compatible=True
# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# distutils: language = c++
"""The native scheduler: per-key FIFO rings in C memory, a ready queue of keys,
and worker threads that wait without the GIL.

One mutex guards everything below (key table, rings, ready queue, counters).
Rules that keep it deadlock-free and GIL-free:

* A thread that holds the GIL never *blocks* on the mutex: ``_acquire`` tries,
  spins briefly, then drops the GIL to block (the holder may need the GIL).
* No Python code runs while the mutex is held, so nothing can call back into
  the scheduler from inside it (a finalizer, a signal handler, a key's own
  ``__eq__``). In particular:
  - no reference is released under the mutex (``Py_DECREF`` can run
    ``__del__``): dropped tasks and keys are released after unlocking;
  - nothing that may start the cyclic GC is allocated under it (only
    PyMem/mapped blocks), and errors are raised after unlocking;
  - keys are compared under it only when their equality is plain C
    (``_plain``: str, int, tuples of them, ...). Any other key that meets a
    different key of the same hash is compared with the mutex released, and
    the answer counts only if no key of that hash came or went meanwhile
    (``_locate``).

Keys are not bound to workers: any idle worker takes the next ready key, runs
at most ``batch`` of its tasks, and puts it back at the tail of the ready queue
if more remain (fairness). A key's state is freed as soon as it has no queued
task and no running one.
"""

from cpython.object cimport PyObject
from cpython.pythread cimport PyThread_get_thread_ident
from libc.stdint cimport int64_t, uint32_t, uint64_t
# Python's allocator (GIL/thread state held at every call): small blocks come from
# pymalloc arenas, which go back to the OS once a burst of keys has drained, and
# tracemalloc sees them. Large blocks are mapped directly (_block_alloc).
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.string cimport memcpy, memset

import threading

from keyedexec import _watchdog
from keyedexec._report import report_failure
from keyedexec.context import Context
from keyedexec.errors import BrokenThreadPool, QueueFull

from concurrent.futures._base import FINISHED, PENDING, RUNNING
from time import monotonic as _monotonic

cdef object _PENDING = PENDING
cdef object _RUNNING = RUNNING
cdef object _FINISHED = FINISHED
cdef object _ALL = object()   # cancel_queued(): every key
# A worker thread's start (_spawn's token).
cdef int _STARTING = 0, _STARTED = 1, _ABANDONED = 2
cdef str _BROKEN = "A thread initializer failed, the thread pool is not usable anymore"


def _broken():
    """The exception of each task dropped by a broken pool (as ThreadPoolExecutor's)."""
    return BrokenThreadPool(_BROKEN)


cdef extern from "Python.h":
    Py_hash_t PyObject_Hash(object o) except? -1
    int PyObject_RichCompareBool(PyObject *a, PyObject *b, int op) except -1
    int PyObject_RichCompareBool_raw "PyObject_RichCompareBool"(PyObject *a, PyObject *b, int op)
    void PyErr_Clear()
    ctypedef struct PyTypeObject_rc "PyTypeObject":
        void *tp_richcompare
    PyTypeObject_rc PyBaseObject_Type
    PyTypeObject_rc PyUnicode_Type
    PyTypeObject_rc PyLong_Type
    PyTypeObject_rc PyFloat_Type
    PyTypeObject_rc PyBytes_Type
    PyTypeObject_rc PyBool_Type
    PyTypeObject_rc PyTuple_Type
    bint PyCallable_Check(object o)
    int PyErr_CheckSignals() except -1
    void PyErr_SetInterrupt()
    void Py_INCREF_raw "Py_INCREF"(PyObject *o)
    void Py_DECREF_raw "Py_DECREF"(PyObject *o)
    void Py_XDECREF_raw "Py_XDECREF"(PyObject *o)
    void Py_XINCREF_raw "Py_XINCREF"(PyObject *o)
    void *Py_TYPE_raw "Py_TYPE"(PyObject *o)
    int Py_EQ


cdef extern from *:
    """
    #ifdef Py_GIL_DISABLED
    #define KE_FREE_THREADED 1
    #else
    #define KE_FREE_THREADED 0
    #endif
    """
    const bint KE_FREE_THREADED


cdef extern from "sync.h" nogil:
    ctypedef struct ke_mutex:
        pass
    ctypedef struct ke_cond:
        pass
    ke_mutex *ke_mutex_new()
    void ke_mutex_free(ke_mutex *m)
    ke_cond *ke_cond_new()
    void ke_cond_free(ke_cond *c)
    bint ke_trylock(ke_mutex *m)
    bint ke_looks_free(ke_mutex *m)
    void ke_lock(ke_mutex *m)
    void ke_unlock(ke_mutex *m)
    bint ke_wait(ke_cond *cv, ke_mutex *m, double timeout)
    void ke_notify_one(ke_cond *cv)
    void ke_notify_all(ke_cond *cv)
    void ke_cpu_relax()
    void ke_yield()
    void *ke_peek(void *const *p)


cdef extern from "inbox.h" nogil:
    const bint KE_INBOX
    void *KE_SHUT
    bint ke_inbox_push(void **head, void *node)
    void *ke_inbox_take(void **head, void *with_)
    void *ke_inbox_look(void *const *head)
    int ke_load_int(const int *p)
    void ke_store_int(int *p, int v)
    int64_t ke_countdown(int64_t *p)
    void ke_countdown_rearm(int64_t *p, int64_t gap)


LOCKFREE_SUBMIT = KE_INBOX   # for the tests: free-threaded builds only (inbox.h)


cdef extern from "blocks.h" nogil:
    const size_t KE_BIG_BLOCK
    void *ke_map(size_t n)
    void ke_unmap(void *p, size_t n)


cdef extern from "clock.h" nogil:
    uint64_t ke_now_ns()
    uint64_t ke_coarse_ns()
    int ke_bucket(uint64_t ns, int nbuckets)


cdef inline void *_block_alloc(size_t n) noexcept:
    """For arrays that can grow large (key table, rings): see blocks.h."""
    return ke_map(n) if n >= KE_BIG_BLOCK else PyMem_Malloc(n)


cdef inline void _block_free(void *p, size_t n) noexcept:
    """Free a _block_alloc block of ``n`` bytes (NULL is fine)."""
    if n >= KE_BIG_BLOCK:
        if p is not NULL:
            ke_unmap(p, n)
    else:
        PyMem_Free(p)


# What a task does with its outcome (bit flags in Task.kind).
cdef enum:
    K_FUTURE = 1   # complete Task.fut with the outcome
    K_ERRVAL = 2   # the future's *result* is the exception, or None (Go's <-chan error)
    K_CTX = 4      # call fn(ctx) with Task.args = ctx; skip it if ctx is cancelled by its turn
    K_TIMED = 8    # a sampled task: its wait and run times go into the histograms

# Where a key is (KeyState.flags).
cdef enum:
    S_IDLE = 0     # in the table, neither queued for a worker nor running
    S_READY = 1    # in the ready queue
    S_RUNNING = 2  # a worker is serving it

# Why the scheduler no longer accepts work (Scheduler.closing).
cdef enum:
    OPEN = 0
    CLOSED_SHUTDOWN = 1
    CLOSED_EXIT = 2
    CLOSED_FORK = 3
    CLOSED_BROKEN = 4   # a worker's initializer raised

# What happened to a task a worker took (returned by _run).
cdef enum:
    T_OK = 1
    T_RAISED = 2
    T_SKIPPED = 3

DEF MIN_TABLE_BITS = 6
DEF SPINS = 100
DEF POLL_NS = 20000       # how long an idle worker polls for work before it blocks
DEF INLINE_COMPARED = 8   # _locate's keys compared unlocked, before it allocates
DEF NBUCKETS = 28         # timing histograms: <= 1 us, <= 2 us, ... <= 2**26 us (67 s), +Inf
DEF SCAN_SLOTS = 4096     # hot_keys: key-table slots scanned per hold of the mutex
DEF SLOW_REPORTS = 16     # _slow_tasks: keys reported per call (the rest on the next)
DEF SAMPLE_SEED = 0x9E3779B97F4A7C15   # keyedexec._timings.Recorder draws the same gaps


ctypedef struct Task:
    PyObject *fn
    PyObject *args      # argument tuple; the Context for K_CTX
    PyObject *kwargs    # NULL when there are none
    PyObject *fut       # NULL unless K_FUTURE
    int kind
    uint64_t stamp      # submit time (ns; the coarse clock unless K_TIMED)


# One key with queued or running work. The ring starts as the inline slot, so
# a key with one queued task costs a single allocation.
ctypedef struct KeyState:
    PyObject *key
    Py_hash_t hash
    Task *ring          # capacity is a power of two
    uint32_t head
    uint32_t count
    uint32_t cap
    uint32_t flags
    unsigned long runner    # thread ident of the worker serving it, or 0
    PyObject *current       # the future of the task it runs (owned), or NULL: see fork
    uint64_t serial         # tells it from a later state at the same address (_locate)
    KeyState *next          # ready-queue link
    Task slot0


# A task submitted without the mutex, in the inbox (inbox.h) until the next
# holder of the mutex queues it. Only keys of exact str or int come this way:
# comparing them with the table's keys runs no Python code (see _foreign_in).
ctypedef struct Pushed:
    Pushed *next        # first field: inbox.h links through it
    PyObject *key       # owned
    Py_hash_t hash
    Task task


# Wait and run time histograms, and which tasks to time (Scheduler, AsyncCore).
ctypedef struct Timing:
    uint32_t every          # 1 task in every is timed; 0: none
    int64_t countdown       # accepted tasks until the next timed one (atomic: _timing_take)
    uint64_t rng            # xorshift64 state: the gaps between timed tasks
    uint64_t wait[NBUCKETS]
    uint64_t run[NBUCKETS]
    uint64_t wait_sum, run_sum


# A worker thread, as the slow-task watchdog sees it (on the worker's stack,
# linked into Scheduler.workers while it runs).
ctypedef struct WorkerSlot:
    WorkerSlot *next
    KeyState *ks            # the key whose task it runs, or NULL
    uint64_t seq            # tasks it has started
    uint64_t seen_seq       # (watchdog) the task it saw running last time...
    uint64_t seen_at        # ... first seen then (ns)
    int reported            # ... and already logged


# One of hot_keys' candidates: a strong reference to the key once owned.
ctypedef struct HotEntry:
    PyObject *key
    uint64_t rank           # 2 * queued + running
    uint64_t stamp          # submit stamp of its oldest queued task, or 0
    uint32_t count
    int running


# A key of the same hash that _locate compared with the mutex released.
ctypedef struct Compared:
    PyObject *key
    KeyState *ks
    uint64_t serial
    int equal


cdef inline size_t _home(Py_hash_t h, int shift) noexcept nogil:
    # Fibonacci hashing: spreads Python's sequential int hashes over the table.
    return <size_t>((<uint64_t>h * <uint64_t>0x9E3779B97F4A7C15ULL) >> shift)


cdef inline bint _numeric(PyTypeObject_rc *tp) noexcept:
    return tp == &PyLong_Type or tp == &PyBool_Type or tp == &PyFloat_Type


cdef bint _plain_pair(PyObject *a, PyObject *b, int depth) noexcept:
    """True if ``a == b`` runs no Python code (and warns of nothing: str and
    bytes under ``python -b`` would): two str, two bytes, numbers (int, bool,
    float), two objects compared by identity (``object.__eq__``, e.g. None),
    and tuples whose items pair up so."""
    cdef PyTypeObject_rc *ta = <PyTypeObject_rc *>Py_TYPE_raw(a)
    cdef PyTypeObject_rc *tb = <PyTypeObject_rc *>Py_TYPE_raw(b)
    cdef Py_ssize_t i, n
    if ta == tb and (ta == &PyUnicode_Type or ta == &PyBytes_Type):
        return True
    if _numeric(ta) and _numeric(tb):
        return True
    if (ta.tp_richcompare == PyBaseObject_Type.tp_richcompare
            and tb.tp_richcompare == PyBaseObject_Type.tp_richcompare):
        return True
    if ta == &PyTuple_Type and tb == &PyTuple_Type and depth < 4:
        # Tuples compare their items up to the shorter length, even for ==.
        n = min(PyTuple_GET_SIZE_raw(a), PyTuple_GET_SIZE_raw(b))
        for i in range(n):
            if not _plain_pair(PyTuple_GET_ITEM_raw(a, i), PyTuple_GET_ITEM_raw(b, i), depth + 1):
                return False
        return True
    return False


cdef inline void _acquire(ke_mutex *mu) noexcept:
    """Take ``mu`` while holding the GIL without ever blocking with it.

    The spin tries the lock only when it looks free (ke_looks_free): a failed
    try is a write to the line the holder needs to unlock."""
    cdef int i
    if ke_trylock(mu):
        return
    for i in range(SPINS):
        ke_cpu_relax()
        if ke_looks_free(mu) and ke_trylock(mu):
            return
    with nogil:
        ke_lock(mu)


cdef inline bint _has_pushed(void *head) noexcept nogil:
    return head is not NULL and head is not KE_SHUT


cdef inline bint _poll(void *const *p, void *const *inbox) noexcept nogil:
    """Poll ``*p`` (without the mutex) until it is non-NULL, the inbox has a
    task, or POLL_NS passed.

    Blocking on the condition variable costs a futex wait here and a futex
    wake (a system call) in the submitter that finds this worker asleep: more
    than a no-op task. A worker that polls a little first usually finds the
    next task without either."""
    cdef uint64_t deadline = 0
    cdef int i = 0
    while ke_peek(p) is NULL and not _has_pushed(ke_peek(inbox)):
        ke_cpu_relax()
        i += 1
        if i & 63 == 0:   # the clock costs ~25 ns: read it every 64 polls
            # Without a GIL, give the core to the submitter or a busy worker
            # if they need it. With one, it cost 10-15 % of bench/'s execute
            # and Zipf submits: threads there take turns on the GIL anyway.
            if KE_FREE_THREADED:
                ke_yield()
            if deadline == 0:
                deadline = ke_now_ns() + POLL_NS
            elif ke_now_ns() >= deadline:
                return False
    return True


cdef inline void _release_task(Task *t) noexcept:
    Py_DECREF_raw(t.fn)
    Py_DECREF_raw(t.args)
    Py_XDECREF_raw(t.kwargs)
    Py_XDECREF_raw(t.fut)


cdef inline bint _inboxable(PyObject *key) noexcept:
    """Keys that may come through the inbox: exact str and int. Their
    comparisons with each other are plain C (and run under the mutex)."""
    cdef void *tp = Py_TYPE_raw(key)
    return tp == <void *>&PyUnicode_Type or tp == <void *>&PyLong_Type


cdef class Scheduler:
    """The keyed scheduler. Facades: ``KeyedExecutor`` and ``TaskPool``."""

    cdef ke_mutex *mu
    cdef ke_cond *work_cv       # idle workers wait here
    cdef ke_cond *space_cv      # submitters blocked on a full key wait here

    # key table: open addressing, linear probing, backward-shift deletion
    cdef KeyState **slots
    cdef int bits
    cdef size_t nkeys

    cdef KeyState *ready_head
    cdef KeyState *ready_tail

    cdef Pushed *backlog        # taken from the inbox, not yet queued (only
    cdef Pushed *backlog_tail   # after running out of memory), oldest first
    cdef int foreign            # keys in the table that are not _inboxable:
                                # the inbox is shut while there are any

    cdef int idle               # waiting on work_cv
    cdef int polling            # 1: one polls and no submit has handed it a key yet
    cdef int wakeups            # notified, not yet awake
    cdef int blocked            # submitters waiting on space_cv
    cdef int closing
    cdef uint32_t batch
    cdef uint32_t queue_size    # 0: unbounded
    cdef double idle_timeout    # < 0: workers never retire

    cdef Py_ssize_t running, pending
    cdef unsigned long long submitted, completed, failed, cancelled
    cdef uint64_t serials       # KeyState.serial of the last state made (_locate)
    cdef Py_ssize_t nbytes      # native memory held for keys, rings and table

    cdef WorkerSlot *workers        # the running workers (slow-task watchdog)

    # What submits read or write without the mutex (inbox.h), on cache lines
    # of their own: next to the fields above, which workers write for every
    # task, each lock-free submit would miss the cache.
    cdef char _pad0[64]
    # Lock-free submissions. The inbox is part of the queue: every holder of
    # the mutex queues what it holds first (_lock), so nothing else under the
    # mutex ever sees a task still in it. Written by every lock-free submit:
    cdef void *inbox            # NULL, KE_SHUT, or the newest Pushed
    cdef Timing timing          # see timings(); its countdown too (_timing_take)
    cdef char _pad1[64]
    # Read by every lock-free submit, written rarely (under the mutex):
    cdef int max_workers
    cdef int nthreads           # started and not exited (or about to start)
    cdef int dozing             # idle - wakeups: sleeping workers nobody woke
    cdef int pollers            # idle workers polling for work (_poll): at most one;
                                # submitters wake nobody meanwhile (see _worker_main)
    cdef char _pad2[64]

    cdef object on_error
    cdef readonly str name
    cdef str thread_name_prefix
    cdef object initializer     # None, or called once by each worker before any task
    cdef tuple initargs
    cdef list _threads          # Thread objects, guarded by _threads_lock
    cdef object _threads_lock
    cdef object _exited         # Condition notified by each exiting worker
    cdef int _spawned
    cdef int _joining           # worker threads whose task waits in join(); under _exited
    cdef object __weakref__

    def __cinit__(self):
        self.mu = ke_mutex_new()
        self.work_cv = ke_cond_new()
        self.space_cv = ke_cond_new()
        self.bits = MIN_TABLE_BITS
        self.slots = <KeyState **>_block_alloc(sizeof(KeyState *) << self.bits)
        if self.slots is not NULL:   # zeroed first: __dealloc__ walks it even if we fail here
            memset(self.slots, 0, sizeof(KeyState *) << self.bits)
        if self.mu is NULL or self.work_cv is NULL or self.space_cv is NULL or self.slots is NULL:
            raise MemoryError()
        self.nbytes = sizeof(KeyState *) << self.bits
        self._threads = []
        self._threads_lock = threading.Lock()
        self._exited = threading.Condition()  # its own (reentrant) lock: see _spawn

    def __init__(self, int workers, *, queue_size=0, idle_timeout=None, int batch=64,
                 str name="keyedexec", on_error=None, str thread_name_prefix="",
                 initializer=None, tuple initargs=(), uint32_t sample_timings=32,
                 slow_task_threshold=None):
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        if queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size}")
        _timing_init(&self.timing, sample_timings)
        self.max_workers = workers
        self.batch = batch
        self.queue_size = queue_size
        if queue_size:
            self.inbox = KE_SHUT   # a full key makes submits wait: under the mutex
        self.idle_timeout = -1.0 if idle_timeout is None else idle_timeout
        self.name = name
        self.on_error = on_error
        self.thread_name_prefix = thread_name_prefix
        self.initializer = initializer
        self.initargs = initargs
        _lifecycle.register(self)
        if slow_task_threshold is not None:
            _watchdog.start(self, slow_task_threshold)

    def __dealloc__(self):
        # No worker can be alive: each holds a reference to self.
        cdef size_t i
        cdef KeyState *ks
        if self.slots is not NULL:
            for i in range(<size_t>1 << self.bits):
                ks = self.slots[i]
                if ks is not NULL:
                    while ks.count:
                        _release_task(&ks.ring[ks.head])
                        ks.head = (ks.head + 1) & (ks.cap - 1)
                        ks.count -= 1
                    self._free_key(ks)
            _block_free(self.slots, sizeof(KeyState *) << self.bits)
        self._free_pushed(<Pushed *>ke_inbox_take(&self.inbox, KE_SHUT))
        self._free_pushed(self.backlog)
        self.backlog = NULL
        ke_cond_free(self.space_cv)
        ke_cond_free(self.work_cv)
        ke_mutex_free(self.mu)

    # -- key table (mutex held) -----------------------------------------------

    cdef KeyState *_locate(self, object key, Py_hash_t h) except? NULL:
        """``key``'s state, or NULL if it has none. Returns with the mutex HELD;
        raises (an ``__eq__`` that raised, MemoryError) with it released.

        No Python code runs under the mutex (module docstring): ``key`` is
        compared there only with keys for which that is plain C
        (_plain_pair). A key of the same hash that needs Python is compared
        with the mutex released (a reference to it held), and the answer kept
        with that state's serial number. The lookup ends once every state of
        the hash now in the table has been compared, so keys that come and go
        meanwhile only cost comparisons with the new ones. A key whose
        ``__eq__`` uses the scheduler (or a finalizer that runs there) is
        therefore just another caller.
        """
        cdef Compared inline_seen[INLINE_COMPARED]
        cdef Compared *seen = inline_seen   # [0, nseen): compared; then: to compare
        cdef size_t cap = INLINE_COMPARED, nseen = 0, n, i, j
        cdef KeyState *ks
        cdef KeyState *found
        cdef void *grown
        cdef int eq
        cdef size_t mask
        try:
            while True:
                self._lock()
                found = NULL
                n = 0
                mask = (<size_t>1 << self.bits) - 1
                i = _home(h, 64 - self.bits)
                while self.slots[i] is not NULL:
                    ks = self.slots[i]
                    i = (i + 1) & mask
                    if ks.hash != h:
                        continue
                    if ks.key is <PyObject *>key:
                        found = ks
                        break
                    if _plain_pair(ks.key, <PyObject *>key, 0):
                        eq = PyObject_RichCompareBool_raw(ks.key, <PyObject *>key, Py_EQ)
                        if eq == 1:
                            found = ks
                            break
                        if eq == 0:
                            continue
                        PyErr_Clear()   # cannot happen for plain pairs; compare unlocked
                    for j in range(nseen):
                        if seen[j].ks is ks and seen[j].serial == ks.serial:
                            break
                    else:
                        j = nseen
                    if j < nseen:   # compared already, and still the same state
                        if seen[j].equal:
                            found = ks
                            break
                        continue
                    if nseen + n < cap:
                        seen[nseen + n].key = ks.key
                        seen[nseen + n].ks = ks
                        seen[nseen + n].serial = ks.serial
                    n += 1
                if found is not NULL or n == 0:
                    return found
                if nseen + n > cap:   # more colliding keys than room: grow, unlocked
                    ke_unlock(self.mu)
                    grown = PyMem_Malloc((nseen + n) * 2 * sizeof(Compared))
                    if grown is NULL:
                        raise MemoryError()
                    memcpy(grown, seen, nseen * sizeof(Compared))
                    if seen is not inline_seen:
                        PyMem_Free(seen)
                    seen = <Compared *>grown
                    cap = (nseen + n) * 2
                    continue
                for i in range(nseen, nseen + n):
                    Py_INCREF_raw(seen[i].key)   # alive while compared, whatever the table does
                ke_unlock(self.mu)
                j = nseen + n
                try:
                    for i in range(nseen, nseen + n):
                        # As a dict does: the stored key's __eq__ first.
                        seen[i].equal = PyObject_RichCompareBool(seen[i].key, <PyObject *>key, Py_EQ)
                        if seen[i].equal:
                            j = i + 1   # the rest need no comparison if this one stays
                            break
                finally:
                    for i in range(nseen, nseen + n):
                        Py_DECREF_raw(seen[i].key)
                nseen = j
        finally:
            if seen is not inline_seen:
                PyMem_Free(seen)

    cdef int _resize(self, int bits) noexcept:
        """Rehash into 2**bits slots (mutex held). -1: out of memory, unchanged."""
        cdef KeyState **old = self.slots
        cdef size_t oldn = <size_t>1 << self.bits
        cdef size_t n = <size_t>1 << bits
        cdef size_t i, j, mask = n - 1
        cdef KeyState **new = <KeyState **>_block_alloc(sizeof(KeyState *) * n)
        if new is NULL:
            return -1
        memset(new, 0, sizeof(KeyState *) * n)
        for i in range(oldn):
            if old[i] is not NULL:
                j = _home(old[i].hash, 64 - bits)
                while new[j] is not NULL:
                    j = (j + 1) & mask
                new[j] = old[i]
        self.slots = new
        self.nbytes += <Py_ssize_t>(sizeof(KeyState *) * (n - oldn))
        self.bits = bits
        _block_free(old, sizeof(KeyState *) * oldn)
        return 0

    cdef KeyState *_insert(self, object key, Py_hash_t h) noexcept:
        """A state for ``key``, which _locate found has none (mutex held).
        NULL: out of memory (raised by the caller once unlocked)."""
        cdef KeyState *ks
        cdef size_t pos
        if (self.nkeys + 1) * 2 > (<size_t>1 << self.bits):
            if self._resize(self.bits + 1) < 0:
                return NULL
        ks = <KeyState *>PyMem_Malloc(sizeof(KeyState))
        if ks is NULL:
            return NULL
        memset(ks, 0, sizeof(KeyState))
        pos = _home(h, 64 - self.bits)
        while self.slots[pos] is not NULL:
            pos = (pos + 1) & ((<size_t>1 << self.bits) - 1)
        Py_INCREF_raw(<PyObject *>key)
        ks.key = <PyObject *>key
        ks.hash = h
        ks.ring = &ks.slot0
        ks.cap = 1
        self.slots[pos] = ks
        self.nkeys += 1
        self.nbytes += sizeof(KeyState)
        self.serials += 1
        ks.serial = self.serials
        return ks

    cdef void _remove(self, KeyState *ks) noexcept:
        """Unlink ``ks`` from the table; the caller frees it after unlocking."""
        cdef size_t mask = (<size_t>1 << self.bits) - 1
        cdef int shift = 64 - self.bits
        cdef size_t i = _home(ks.hash, shift)
        cdef size_t j, k
        while self.slots[i] is not ks:
            i = (i + 1) & mask
        # Backward-shift deletion keeps every probe chain unbroken.
        j = i
        while True:
            self.slots[i] = NULL
            while True:
                j = (j + 1) & mask
                if self.slots[j] is NULL:
                    self.nkeys -= 1
                    self._maybe_shrink()
                    return
                k = _home(self.slots[j].hash, shift)
                if (i <= j and (i < k <= j)) or (i > j and (k > i or k <= j)):
                    continue   # already between its home and j: stays
                break
            self.slots[i] = self.slots[j]
            i = j

    cdef void _maybe_shrink(self) noexcept:
        # Give memory back once the burst of keys is gone.
        if self.bits > MIN_TABLE_BITS and self.nkeys * 8 < (<size_t>1 << self.bits):
            self._resize(self.bits - 1)   # out of memory: keep the larger table

    cdef void _free_key(self, KeyState *ks) noexcept:
        """Free a key's memory and drop its reference (mutex *not* held)."""
        if ks.ring is not &ks.slot0:
            _block_free(ks.ring, sizeof(Task) * ks.cap)
        Py_DECREF_raw(ks.key)
        PyMem_Free(ks)

    cdef void _release_unlocked(self, KeyState *dead, PyObject *held) noexcept:
        """A worker's leftovers, released with the mutex released around it
        (held on entry and exit): a dead key, a finished task's future."""
        ke_unlock(self.mu)
        if dead is not NULL:
            self._free_key(dead)
        Py_XDECREF_raw(held)
        self._lock()

    cdef void _unaccount_key(self, KeyState *ks) noexcept:
        self.nbytes -= sizeof(KeyState)
        if ks.ring is not &ks.slot0:
            self.nbytes -= sizeof(Task) * ks.cap

    # -- rings and ready queue (mutex held) -------------------------------------

    cdef int _grow_ring(self, KeyState *ks) noexcept:
        """Double the ring (mutex held). -1: out of memory, unchanged."""
        cdef uint32_t cap = ks.cap * 2
        cdef uint32_t i
        cdef Task *ring = <Task *>_block_alloc(sizeof(Task) * cap)
        if ring is NULL:
            return -1
        for i in range(ks.count):
            ring[i] = ks.ring[(ks.head + i) & (ks.cap - 1)]
        if ks.ring is not &ks.slot0:
            _block_free(ks.ring, sizeof(Task) * ks.cap)
            self.nbytes -= sizeof(Task) * ks.cap
        self.nbytes += sizeof(Task) * cap
        ks.ring = ring
        ks.cap = cap
        ks.head = 0
        return 0

    cdef inline void _ready_push(self, KeyState *ks) noexcept:
        ks.flags = S_READY
        ks.next = NULL
        if self.ready_tail is NULL:
            self.ready_head = ks
        else:
            self.ready_tail.next = ks
        self.ready_tail = ks

    cdef inline bint _claim_wakeup(self) noexcept:
        """(mutex held) A key was made ready: the polling worker takes it, or
        a sleeping one is to be woken (True: the caller notifies work_cv)."""
        if self.polling:
            self.polling = 0
            return False
        if self.idle > self.wakeups and not self.pollers:
            self.wakeups += 1
            self._dozing_changed()
            return True
        return False

    cdef inline KeyState *_ready_pop(self) noexcept:
        cdef KeyState *ks = self.ready_head
        if ks is not NULL:
            self.ready_head = ks.next
            if self.ready_head is NULL:
                self.ready_tail = NULL
            ks.next = NULL
        return ks

    # -- the inbox (inbox.h) ---------------------------------------------------------

    cdef inline void _lock(self) noexcept:
        """Take the mutex (as _acquire) and queue what the inbox holds: the
        inbox is part of the queue, so every holder of the mutex sees all
        accepted tasks in their rings, in submission order."""
        _acquire(self.mu)
        if KE_INBOX and (_has_pushed(ke_peek(&self.inbox)) or self.backlog is not NULL):
            self._drain(NULL)

    cdef void _drain(self, void *leave) noexcept:
        """(mutex held) Queue the inbox's tasks, oldest first, leaving the
        head ``leave`` (NULL; KE_SHUT to shut the inbox)."""
        cdef Pushed *p = NULL
        cdef Pushed *fifo = NULL
        cdef Pushed *nxt
        cdef Pushed *last
        # A shut inbox stays shut unless the caller opens it (only holders of
        # the mutex write KE_SHUT or NULL, and pushes fail on KE_SHUT).
        if leave is not NULL or ke_inbox_look(&self.inbox) is not KE_SHUT:
            p = <Pushed *>ke_inbox_take(&self.inbox, leave)
        if <void *>p is KE_SHUT:
            p = NULL
        last = p
        while p is not NULL:   # newest first: reverse
            nxt = p.next
            p.next = fifo
            fifo = p
            p = nxt
        if fifo is not NULL:
            if self.backlog is NULL:
                self.backlog = fifo
            else:
                self.backlog_tail.next = fifo
            self.backlog_tail = last
        self._queue_backlog()

    cdef void _queue_backlog(self) noexcept:
        """(mutex held) Move the backlog into the rings, as a submit under the
        mutex would. Stops if memory runs out: the rest stays for the next
        holder of the mutex (_lock)."""
        cdef Pushed *p
        cdef KeyState *ks
        while self.backlog is not NULL:
            p = self.backlog
            ks = self._find_inboxable(p.key, p.hash)
            if ks is NULL:
                ks = self._insert(<object>p.key, p.hash)
                if ks is NULL:
                    return
            elif ks.count == ks.cap and self._grow_ring(ks) < 0:
                return
            ks.ring[(ks.head + ks.count) & (ks.cap - 1)] = p.task
            ks.count += 1
            self.pending += 1
            self.submitted += 1
            if ks.flags == S_IDLE:
                self._ready_push(ks)
                if self._claim_wakeup():
                    ke_notify_one(self.work_cv)   # rarely: see _push_lockfree
            self.backlog = p.next
            Py_DECREF_raw(p.key)   # exact str or int: runs no Python code
            PyMem_Free(p)

    cdef KeyState *_find_inboxable(self, PyObject *key, Py_hash_t h) noexcept:
        """(mutex held) The state of an _inboxable key, or NULL. While the
        inbox is open the table holds only _inboxable keys: equal keys have
        one type, and comparing them is plain C. (Only a backlog left by an
        out-of-memory outlives the inbox's shutting: keys of other types are
        skipped then, so 1 and 1.0 would be two keys.)"""
        cdef size_t mask = (<size_t>1 << self.bits) - 1
        cdef size_t i = _home(h, 64 - self.bits)
        cdef KeyState *ks
        while self.slots[i] is not NULL:
            ks = self.slots[i]
            i = (i + 1) & mask
            if ks.hash == h and (ks.key is key or (
                    Py_TYPE_raw(ks.key) == Py_TYPE_raw(key)
                    and PyObject_RichCompareBool_raw(ks.key, key, Py_EQ) == 1)):
                return ks
        return NULL

    cdef void _free_pushed(self, Pushed *p) noexcept:
        """Release a list of Pushed (the scheduler is being freed)."""
        cdef Pushed *nxt
        if <void *>p is KE_SHUT:
            return
        while p is not NULL:
            nxt = p.next
            _release_task(&p.task)
            Py_DECREF_raw(p.key)
            PyMem_Free(p)
            p = nxt

    cdef bint _foreign_in(self) noexcept:
        """(mutex held) A key that is not _inboxable is about to enter the
        table: shut the inbox first (queueing what it holds), so that no
        queued-from-the-inbox key ever needs Python code to be compared.
        True if the inbox was open until now: the caller must look its key
        up again, as an equal one may have come in through it."""
        cdef bint was_open
        self.foreign += 1
        if self.foreign != 1:
            return False
        was_open = KE_INBOX and ke_inbox_look(&self.inbox) is not KE_SHUT
        self._drain(KE_SHUT)
        return was_open

    cdef void _foreign_out(self) noexcept:
        """(mutex held) A key that is not _inboxable left the table."""
        self.foreign -= 1
        if self.foreign == 0 and not self.closing and not self.queue_size:
            ke_inbox_take(&self.inbox, NULL)   # was KE_SHUT: nobody pushed

    cdef inline void _dozing_changed(self) noexcept nogil:
        ke_store_int(&self.dozing, self.idle - self.wakeups)

    cdef int _push_lockfree(self, object key, Py_hash_t h, object fn, object args,
                            object kwargs, object fut, int kind, int *drawn) except -1:
        """Queue a task through the inbox, without the mutex. 0: declined
        (the inbox is shut, a worker may need starting, out of memory): the
        caller queues it under the mutex, with the timing decision left in
        ``drawn`` if one was made (0 or 1)."""
        cdef Pushed *p
        cdef bint spawn = False
        if (not KE_INBOX or ke_load_int(&self.nthreads) < self.max_workers
                or ke_peek(&self.inbox) is KE_SHUT):
            return 0
        p = <Pushed *>PyMem_Malloc(sizeof(Pushed))
        if p is NULL:
            return 0
        p.key = <PyObject *>key
        p.hash = h
        p.task.fn = <PyObject *>fn
        p.task.args = <PyObject *>args
        p.task.kwargs = NULL
        if kwargs is not None:
            p.task.kwargs = <PyObject *>kwargs
        p.task.fut = NULL
        if fut is not None:
            p.task.fut = <PyObject *>fut
        p.task.kind = kind
        p.task.stamp = ke_coarse_ns()
        # Drawn before the push (a pushed task is the drainer's).
        if self.timing.every:
            drawn[0] = _timing_take(&self.timing)
            if drawn[0]:
                p.task.kind = kind | K_TIMED
                p.task.stamp = ke_now_ns()
        Py_INCREF_raw(p.key)
        Py_INCREF_raw(p.task.fn)
        Py_INCREF_raw(p.task.args)
        Py_XINCREF_raw(p.task.kwargs)
        Py_XINCREF_raw(p.task.fut)
        if not ke_inbox_push(&self.inbox, p):
            # The caller holds them all too: these releases free nothing.
            _release_task(&p.task)
            Py_DECREF_raw(p.key)
            PyMem_Free(p)
            return 0
        # Some worker must come for it. One that is awake takes the mutex
        # before it sleeps, and one that polls watches the inbox: nothing to
        # do. Only while a worker sleeps that nobody woke (or one retired
        # meanwhile) does the submit take the mutex, to queue the inbox and
        # wake one, or start one if none is left (inbox.h: of a submit and a
        # worker going to sleep or retiring, one sees the other).
        if ((ke_load_int(&self.dozing) > 0 and not ke_load_int(&self.pollers))
                or ke_load_int(&self.nthreads) < self.max_workers):
            self._lock()
            # As on the mutex path: a worker for a ready key if none is free.
            spawn = (self.ready_head is not NULL and self.idle + self.polling <= self.wakeups
                     and self.nthreads < self.max_workers and not self.closing)
            if spawn:
                self.nthreads += 1
            ke_unlock(self.mu)
            if spawn:
                try:
                    self._spawn()
                except BaseException as exc:
                    # The task is accepted already: this submit must not raise.
                    if isinstance(exc, KeyboardInterrupt):
                        PyErr_SetInterrupt()   # Ctrl-C: raised once the submit returns
                    else:   # "can't start new thread", MemoryError
                        report_failure("keyedexec could not start a worker thread; the "
                                       "queued tasks wait for a running worker or a later "
                                       "submit to start one", exc)
        return 1

    # -- submission -------------------------------------------------------------

    cdef int _push(self, object key, object fn, object args, object kwargs, object fut,
                   int kind, bint block, double timeout) except -1:
        """Queue one task. 1: queued; 0: the key is full and we may not wait.

        On any error nothing is queued and no reference is kept. A worker the
        task needs is started *before* the task is queued, so a thread that
        cannot start fails this submit (unless other workers can run the
        task) instead of stranding it.
        """
        cdef Py_hash_t h
        cdef KeyState *ks
        cdef Task *t
        cdef bint notify = False, spawned = False, timed_out = False
        cdef double slice_
        cdef int refused = 0    # 1: closed, 2: own key full, 3: out of memory; raised unlocked
        cdef bint reserved = False   # a key of another type shut the inbox (_foreign_in)
        cdef uint64_t stamp = 0
        cdef int drawn = -1     # _push_lockfree's timing decision, if it made one
        if not PyCallable_Check(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        try:
            h = PyObject_Hash(key)
        except TypeError as exc:
            raise TypeError(f"key must be hashable, got {type(key).__name__}") from exc
        if (_inboxable(<PyObject *>key)
                and self._push_lockfree(key, h, fn, args, kwargs, fut, kind, &drawn)):
            return 1
        deadline = None
        while True:
            stamp = ke_coarse_ns()   # for hot_keys; read unlocked; a timed task's is precise
            ks = self._locate(key, h)   # the mutex is held from here
            if reserved and ks is not NULL:   # an equal key came in meanwhile
                self._foreign_out()
                reserved = False
            if self.closing:
                refused = 1
                break
            if ks is not NULL and self.queue_size and ks.count >= self.queue_size:
                if not block or timed_out:
                    ke_unlock(self.mu)
                    return 0
                if ks.runner == PyThread_get_thread_ident():
                    refused = 2
                    break
                # Wait for space without the GIL, in slices so that Ctrl-C
                # reaches the main thread promptly; then look the key up again.
                if timeout >= 0 and deadline is None:
                    deadline = _monotonic() + timeout
                slice_ = 0.05
                if deadline is not None:
                    slice_ = min(slice_, max(0.0, deadline - _monotonic()))
                self.blocked += 1
                with nogil:
                    ke_wait(self.space_cv, self.mu, slice_)
                    self.blocked -= 1
                    ke_unlock(self.mu)
                PyErr_CheckSignals()
                if deadline is not None and _monotonic() >= deadline:
                    timed_out = True
                continue
            if ((ks is NULL or ks.flags == S_IDLE) and self.idle + self.polling <= self.wakeups
                    and self.nthreads < self.max_workers and (not spawned or self.nthreads == 0)):
                # The key will be ready and no worker is free: start one first.
                self.nthreads += 1
                ke_unlock(self.mu)
                try:
                    self._spawn()
                except BaseException as exc:
                    if reserved:   # given back; the next turn reserves again
                        self._lock()
                        self._foreign_out()
                        ke_unlock(self.mu)
                        reserved = False
                    if not isinstance(exc, RuntimeError) or self._live_workers() == 0:
                        raise   # a signal's exception, or nobody could run the task
                    # "can't start new thread"
                    report_failure("keyedexec could not start another worker thread; "
                                   "the running ones will serve the task", exc)
                spawned = True
                continue
            if ks is NULL:
                if not reserved and not _inboxable(<PyObject *>key):
                    reserved = True
                    if self._foreign_in():
                        # It shut the inbox (queueing what it held): look again,
                        # an equal key of another type (1 for 1.0) may have
                        # come in through it since _locate.
                        ke_unlock(self.mu)
                        continue
                ks = self._insert(key, h)
                if ks is NULL:
                    if reserved:
                        self._foreign_out()
                        reserved = False
                    refused = 3
                    break
                reserved = False   # the key holds the inbox shut now, until it leaves
            elif ks.count == ks.cap and self._grow_ring(ks) < 0:
                refused = 3
                break
            t = &ks.ring[(ks.head + ks.count) & (ks.cap - 1)]
            Py_INCREF_raw(<PyObject *>fn)
            Py_INCREF_raw(<PyObject *>args)
            t.fn = <PyObject *>fn
            t.args = <PyObject *>args
            if kwargs is None:
                t.kwargs = NULL
            else:
                Py_INCREF_raw(<PyObject *>kwargs)
                t.kwargs = <PyObject *>kwargs
            if fut is None:
                t.fut = NULL
            else:
                Py_INCREF_raw(<PyObject *>fut)
                t.fut = <PyObject *>fut
            t.kind = kind
            t.stamp = stamp
            if self.timing.every and (drawn == 1 if drawn >= 0 else _timing_take(&self.timing)):
                t.kind = kind | K_TIMED
                t.stamp = ke_now_ns()
            ks.count += 1
            self.pending += 1
            self.submitted += 1
            if ks.flags == S_IDLE:
                self._ready_push(ks)
                notify = self._claim_wakeup()
            break
        if reserved:   # refused before its key came in
            self._foreign_out()
        ke_unlock(self.mu)
        if refused == 1:
            raise self._closed_error()
        if refused == 2:
            raise QueueFull(f"key {key!r} is full ({self.queue_size} queued) and this job "
                            "runs on that key: waiting would deadlock")
        if refused == 3:
            raise MemoryError()
        if notify:
            ke_notify_one(self.work_cv)
        return 1

    cdef object _closed_error(self):
        """What a submit raises once closed. The stdlib's texts, word for word:
        code in the wild matches on them."""
        if self.closing == CLOSED_EXIT:
            return RuntimeError("cannot schedule new futures after interpreter shutdown")
        if self.closing == CLOSED_FORK:
            return RuntimeError("this executor was inherited across os.fork() and cannot "
                                "run tasks in the child; create a new one")
        if self.closing == CLOSED_BROKEN:
            return BrokenThreadPool(_BROKEN)
        return RuntimeError("cannot schedule new futures after shutdown")

    cdef int _spawn(self) except -1:
        """Start the worker thread reserved (nthreads += 1) under the mutex.

        If anything fails on the way (creating, naming or starting the thread,
        a signal handler's exception included), the reservation is given back,
        unless the thread already runs: then it accounts for itself. The
        token decides which, under _threads_lock: the worker claims it when
        it starts (_claim_start), a failed spawn abandons it.
        """
        cdef int n
        token = [_STARTING]
        t = None
        try:
            t = threading.Thread(target=self._worker_main, args=(token,))
            # Nothing is allocated under _threads_lock: an allocation may run the
            # GC, and a finalizer that submits may need to spawn a worker too.
            with self._threads_lock:
                self._spawned += 1
                n = self._spawned
                self._threads.append(t)
            # ThreadPoolExecutor's names with a prefix; 0-based, as there.
            if self.thread_name_prefix:
                t.name = f"{self.thread_name_prefix}_{n - 1}"
            else:
                t.name = f"{self.name}-worker-{n}"
            t.start()
        except BaseException:
            with self._threads_lock:
                abandoned = token[0] == _STARTING
                if abandoned:
                    token[0] = _ABANDONED
                    if t is not None and t in self._threads:
                        self._threads.remove(t)
            if abandoned:
                self._lock()
                self.nthreads -= 1
                ke_unlock(self.mu)
                self._notify_exited()
            raise
        return 0

    def _claim_start(self, token):
        """A new worker's first step: False if its spawn failed and gave its
        reservation back (see _spawn), when it must exit at once."""
        with self._threads_lock:
            if token[0] == _ABANDONED:
                return False
            token[0] = _STARTED
            return True

    cdef void _notify_exited(self) noexcept:
        """A worker exits (or failed to start): forget the threads that have
        exited, so the list stays as long as the pool, and wake join()."""
        cdef Py_ssize_t i
        exited = [t for t in self._threads[:] if t.ident is not None and not t.is_alive()]
        with self._threads_lock:   # no allocation in here: see _spawn
            for i in range(len(exited)):
                if exited[i] in self._threads:   # another exiting worker may have been first
                    self._threads.remove(exited[i])
        with self._exited:
            self._exited.notify_all()

    # The public submit family. Each is one C call from Python.

    def execute(self, key, fn, /, *args, **kwargs):
        """Run ``fn(*args, **kwargs)`` on ``key``'s queue; errors go to on_error."""
        self._push(key, fn, args, kwargs or None, None, 0, False, -1.0)

    def submit(self, key, fn, /, *args, **kwargs):
        """Run ``fn(*args, **kwargs)`` on ``key``'s queue; return its future."""
        fut = _new_future()
        self._push(key, fn, args, kwargs or None, fut, K_FUTURE, False, -1.0)
        return fut

    def execute_with_error(self, key, fn, /, *args, **kwargs):
        """Like submit, but the future's result is the exception raised, or None."""
        fut = _new_future()
        self._push(key, fn, args, kwargs or None, fut, K_FUTURE | K_ERRVAL, False, -1.0)
        return fut

    def _fast_methods(self):
        """(execute, submit, execute_with_error) bound to this scheduler, taking
        their arguments as a vector: no kwargs dict per call (see the end of
        this module)."""
        return tuple(PyCFunction_NewEx(&_FAST_DEFS[i], self, __name__) for i in range(3))

    def execute_with_context(self, key, ctx, fn):
        """Run ``fn(ctx)``; skipped if ctx is cancelled when its turn comes."""
        _check_ctx(ctx)
        self._push(key, fn, ctx, None, None, K_CTX, False, -1.0)

    def submit_with_context(self, key, ctx, fn):
        """Run ``fn(ctx)``; the future raises ``ctx.err()`` if it was skipped."""
        _check_ctx(ctx)
        fut = _new_future()
        self._push(key, fn, ctx, None, fut, K_FUTURE | K_CTX, False, -1.0)
        return fut

    def execute_with_context_error(self, key, ctx, fn):
        """Run ``fn(ctx)``; the future's result is the error (or ``ctx.err()``), or None."""
        _check_ctx(ctx)
        fut = _new_future()
        self._push(key, fn, ctx, None, fut, K_FUTURE | K_ERRVAL | K_CTX, False, -1.0)
        return fut

    def put(self, key, fn, ctx, bint block=True, timeout=None):
        """TaskPool's submit: ``fn(ctx)``, waiting while the key is full.

        Returns False if the key stayed full (``block`` false, or ``timeout``
        seconds passed); raises QueueFull if waiting would deadlock.
        """
        _check_ctx(ctx)
        return self._push(key, fn, ctx, None, None, K_CTX, block,
                          -1.0 if timeout is None else timeout) == 1

    # -- the worker ----------------------------------------------------------------

    def _worker_main(self, token):
        """Body of a worker thread: serve ready keys until shut down (or idle)."""
        cdef KeyState *ks = NULL
        cdef KeyState *dead = NULL
        cdef PyObject *held = NULL   # a finished task's future, released once unlocked
        cdef Task t
        cdef uint32_t served = 0
        cdef int status = 0
        cdef bint notify_space, woke, retire = False, fresh = True
        cdef bint polled = False, searching = False
        cdef double wait
        cdef unsigned long me = PyThread_get_thread_ident()
        cdef WorkerSlot slot
        cdef uint64_t started = 0, ended = 0
        if not self._claim_start(token):
            return
        if self.initializer is not None:
            self._initialize_worker()   # if it fails, the loop below only exits
        memset(&slot, 0, sizeof(WorkerSlot))
        self._lock()
        slot.next = self.workers
        self.workers = &slot
        while True:
            # (mutex held) account for the task that just ran
            if status:
                slot.ks = NULL
                if t.kind & K_TIMED and status != T_SKIPPED:
                    _timing_record(&self.timing, t.stamp, started, ended)
                held = ks.current
                ks.current = NULL
                self.running -= 1
                if status == T_SKIPPED:
                    self.cancelled += 1
                else:
                    self.completed += 1
                    if status == T_RAISED:
                        self.failed += 1
                status = 0
            if ks is not NULL:
                if ks.count and served < self.batch:
                    t = ks.ring[ks.head]
                    ks.head = (ks.head + 1) & (ks.cap - 1)
                    ks.count -= 1
                    self.pending -= 1
                    self.running += 1
                    served += 1
                    fresh = False
                    ks.current = t.fut   # _run leaves the task's reference to it
                    slot.ks = ks
                    slot.seq += 1
                    notify_space = self.blocked > 0
                    ke_unlock(self.mu)
                    if dead is not NULL:
                        self._free_key(dead)
                        dead = NULL
                    if held is not NULL:
                        Py_DECREF_raw(held)
                        held = NULL
                    if notify_space:
                        ke_notify_all(self.space_cv)
                    if t.kind & K_TIMED:
                        started = ke_now_ns()
                    status = self._run(<object>ks.key, &t)
                    if t.kind & K_TIMED:
                        ended = ke_now_ns()
                    self._lock()
                    continue
                if dead is not NULL:
                    # Release the previous dead key first, outside the mutex
                    # (and the finished task's future with it: one unlock).
                    self._release_unlocked(dead, held)
                    dead = NULL
                    held = NULL
                    continue
                # This key's turn is over: back of the line, or gone.
                ks.runner = 0
                if ks.count:
                    self._ready_push(ks)
                else:
                    ks.flags = S_IDLE
                    self._remove(ks)
                    self._unaccount_key(ks)
                    if not _inboxable(ks.key):
                        self._foreign_out()
                    dead = ks
                ks = NULL
            ks = self._ready_pop()
            if ks is not NULL:
                ks.flags = S_RUNNING
                ks.runner = me
                served = 0
                if searching:
                    searching = False
                    # Submitters woke nobody while a worker polled; a worker
                    # that was idle hands what is left ready to a sleeping one
                    # (who does the same): off the submitters' path.
                    if self.ready_head is not NULL and self.idle > self.wakeups and not self.pollers:
                        self.wakeups += 1
                        self._dozing_changed()
                        ke_notify_one(self.work_cv)
                continue
            if self.closing:
                break
            if dead is not NULL or held is not NULL:
                # Free the last key before sleeping: an idle worker holds nothing.
                self._release_unlocked(dead, held)
                dead = NULL
                held = NULL
                continue
            if not polled and not self.pollers:
                # Nothing to do: poll a little before blocking (_poll), one
                # worker at a time: on a machine with few cores, more pollers
                # would take the cores from the threads that submit and run.
                # To submitters it is an idle worker that needs no wake-up:
                # the first key made ready meanwhile is its (self.polling).
                # It watches the inbox too (_push_lockfree).
                ke_store_int(&self.pollers, 1)
                self.polling = 1
                polled = searching = True
                with nogil:
                    ke_unlock(self.mu)
                    _poll(<void **>&self.ready_head, &self.inbox)
                _acquire(self.mu)
                # No longer polling, then queue the inbox (inbox.h's order):
                # a submit that saw it polling finds its task queued here.
                ke_store_int(&self.pollers, 0)
                if _has_pushed(ke_peek(&self.inbox)) or self.backlog is not NULL:
                    self._drain(NULL)   # the first key made ready is still its
                self.polling = 0
                continue
            polled = False
            # Nothing to do: wait without the GIL. First say so, then look at
            # the inbox once more (inbox.h: a submit that pushed meanwhile
            # either sees this worker asleep and wakes it, or is seen here).
            self.idle += 1
            self._dozing_changed()
            if _has_pushed(ke_inbox_look(&self.inbox)):
                self.idle -= 1
                self._dozing_changed()
                self._drain(NULL)
                continue
            # A worker that has run nothing yet does not retire: it was started
            # for a task about to be queued (_push), which would start it again.
            wait = -1.0 if fresh else self.idle_timeout
            with nogil:
                woke = ke_wait(self.work_cv, self.mu, wait)
                self.idle -= 1
                if self.wakeups:
                    self.wakeups -= 1
                self._dozing_changed()
                if not woke and self.ready_head is NULL and not self.closing:
                    # Idle for idle_timeout seconds: give the thread back. Count
                    # it out first, then look at the inbox (inbox.h's order): a
                    # submit that pushed meanwhile is seen here or sees this.
                    ke_store_int(&self.nthreads, self.nthreads - 1)
                    if _has_pushed(ke_inbox_look(&self.inbox)):
                        ke_store_int(&self.nthreads, self.nthreads + 1)
                    else:
                        retire = True
                        self._unlink_worker(&slot)
                ke_unlock(self.mu)
            if retire:
                self._notify_exited()
                return
            searching = True
            self._lock()
        self.nthreads -= 1
        self._unlink_worker(&slot)
        ke_unlock(self.mu)
        if dead is not NULL:
            self._free_key(dead)
        Py_XDECREF_raw(held)
        self._notify_exited()

    cdef void _unlink_worker(self, WorkerSlot *w) noexcept nogil:
        """(mutex held) An exiting worker leaves the watchdog's list."""
        cdef WorkerSlot **link = &self.workers
        while link[0] is not NULL:
            if link[0] is w:
                link[0] = w.next
                return
            link = &link[0].next

    cdef void _initialize_worker(self) noexcept:
        """Call the initializer in a new worker. If it raises (logged), the pool is
        broken, as ThreadPoolExecutor's: submits raise BrokenThreadPool, and the
        queued tasks are dropped, their futures failed with it. The workers then
        free the emptied keys and exit, this one included."""
        try:
            self.initializer(*self.initargs)
            return
        except BaseException as exc:
            report_failure(f"a worker initializer of {self.name!r} raised: the pool is broken",
                           exc)
        self._lock()
        if self.closing != CLOSED_FORK:
            self.closing = CLOSED_BROKEN
        self._drain(KE_SHUT)   # closed: submits take the mutex and are refused
        ke_unlock(self.mu)
        ke_notify_all(self.work_cv)
        ke_notify_all(self.space_cv)
        try:
            self.cancel_queued(error=_broken)
        except BaseException as exc:   # not expected: the futures are done regardless
            report_failure(f"keyedexec could not fail the tasks of {self.name!r}", exc)

    cdef int _run(self, object key, Task *t) noexcept:
        """Run one task with the GIL; never raises. Releases the task's references
        except the future's."""
        cdef int kind = t.kind
        cdef object fn = <object>t.fn
        cdef object args = <object>t.args
        cdef object kwargs = None if t.kwargs is NULL else <object>t.kwargs
        cdef object fut = None if t.fut is NULL else <object>t.fut
        cdef object result
        # The locals above own the objects now; the task's reference to its
        # future stays with the key (KeyState.current) until the worker's
        # accounting, so that a fork sees every running task's future.
        Py_DECREF_raw(t.fn)
        Py_DECREF_raw(t.args)
        Py_XDECREF_raw(t.kwargs)
        try:
            if fut is not None and not _claim(fut):
                fut.set_running_or_notify_cancel()   # cancelled: notify its waiters
                return T_SKIPPED
        except BaseException as exc:   # not expected: report it, go on
            report_failure(f"keyedexec could not start a task for key {key!r}", exc)
            return T_SKIPPED
        try:
            if kind & K_CTX:
                # Inside the task's try: a context whose err() raises fails the task.
                err = args.err()
                if err is not None:
                    if fut is not None:
                        if kind & K_ERRVAL:
                            _complete(fut, err, None)
                        else:
                            _complete(fut, None, err)
                    return T_SKIPPED
                result = fn(args)
            elif kwargs is not None:
                result = fn(*args, **kwargs)
            elif len(<tuple>args) == 0:
                result = fn()
            else:
                result = fn(*args)
        except BaseException as exc:
            if fut is None:
                self._report(key, exc)
            elif kind & K_ERRVAL:
                _complete(fut, exc, None)
            else:
                _complete(fut, None, exc)
            return T_RAISED
        if fut is not None:
            _complete(fut, None if kind & K_ERRVAL else result, None)
        return T_OK

    cdef void _report(self, object key, object exc) noexcept:
        if self.on_error is not None:
            try:
                self.on_error(key, exc)
            except BaseException as handler_exc:
                report_failure(f"on_error handler {self.on_error!r} raised for key {key!r}",
                               handler_exc)

    # -- shutdown and introspection -----------------------------------------------

    cdef int _close(self, int reason) except -1:
        cdef bint spawn = False
        self._lock()
        if not self.closing:
            self.closing = reason
        # Submits from now on take the mutex and are refused; those that came
        # through the inbox before are queued here (their submit returned).
        self._drain(KE_SHUT)
        # Queued work with no worker left (a failed start): someone must run it.
        if self.pending and self.nthreads == 0 and reason != CLOSED_FORK:
            self.nthreads += 1
            spawn = True
        ke_unlock(self.mu)
        ke_notify_all(self.work_cv)
        ke_notify_all(self.space_cv)
        if spawn:
            self._spawn()
        return 0

    def close(self):
        """Stop accepting tasks; workers drain what is queued, then exit."""
        self._close(CLOSED_SHUTDOWN)

    def _close_for_exit(self):
        self._close(CLOSED_EXIT)

    def cancel_queued(self, key=_ALL, error=None):
        """Drop queued tasks (all, or one key's) that have not started.

        Their futures are cancelled (and waiters notified), or, given ``error``,
        fail with the exception it makes. Returns how many.
        """
        cdef size_t i, n = 0, need, cap = 0
        cdef Py_hash_t h = 0
        cdef KeyState *ks = NULL
        cdef Task *dropped = NULL
        cdef bint blocked
        if key is not _ALL:
            h = PyObject_Hash(key)
        try:
            while True:   # size the buffer outside the mutex, then drain under it
                if key is _ALL:
                    self._lock()
                    need = self.pending
                else:
                    ks = self._locate(key, h)
                    need = 0 if ks is NULL else ks.count
                if need <= cap:
                    if key is _ALL:
                        for i in range(<size_t>1 << self.bits):
                            if self.slots[i] is not NULL:
                                n = _drain_ring(self.slots[i], dropped, n)
                    elif ks is not NULL:
                        n = _drain_ring(ks, dropped, n)
                    # Emptied keys stay in the ready queue; a worker frees them.
                    self.pending -= n
                    self.cancelled += n
                    blocked = self.blocked > 0
                    ke_unlock(self.mu)
                    break
                ke_unlock(self.mu)
                _block_free(dropped, sizeof(Task) * cap)
                dropped = <Task *>_block_alloc(sizeof(Task) * need)
                cap = 0 if dropped is NULL else need
                if dropped is NULL:
                    raise MemoryError()
        except BaseException:
            _block_free(dropped, sizeof(Task) * cap)
            raise
        if blocked and n:
            ke_notify_all(self.space_cv)   # submitters waiting on a full key
        return self._cancel_dropped(dropped, n, cap, error)

    cdef Py_ssize_t _cancel_dropped(self, Task *dropped, size_t n, size_t cap,
                                    object error) except -1:
        """Cancel the futures of ``n`` tasks taken out of their rings (or fail
        them with what ``error()`` makes), then release them and the buffer
        (``cap`` tasks). Returns ``n``."""
        cdef size_t i
        first_error = None   # one failure (a Ctrl-C) must not leave the rest pending
        try:
            for i in range(n):
                if dropped[i].fut is not NULL:
                    try:
                        if error is None:
                            (<object>dropped[i].fut)._cancel_queued()
                        else:
                            (<object>dropped[i].fut)._fail_queued(
                                error(), dropped[i].kind & K_ERRVAL != 0)
                    except BaseException as exc:
                        if first_error is None:
                            first_error = exc
        finally:
            for i in range(n):
                _release_task(&dropped[i])
            _block_free(dropped, sizeof(Task) * cap)
        if first_error is not None:
            raise first_error
        return n

    def cancel_task(self, key, fut):
        """Drop ``key``'s queued task whose future is ``fut``, if it has not
        started, and cancel that future. Returns whether it was dropped.
        (wait_key's timed-out barrier: polling must not leave one behind.)"""
        cdef Py_hash_t h = PyObject_Hash(key)
        cdef KeyState *ks
        cdef Task *taken = <Task *>PyMem_Malloc(sizeof(Task))
        cdef uint32_t i, j, mask
        cdef size_t n = 0
        if taken is NULL:
            raise MemoryError()
        try:
            ks = self._locate(key, h)
        except BaseException:
            PyMem_Free(taken)
            raise
        if ks is not NULL:
            mask = ks.cap - 1
            for i in range(ks.count):
                if ks.ring[(ks.head + i) & mask].fut is <PyObject *>fut:
                    taken[0] = ks.ring[(ks.head + i) & mask]
                    for j in range(i, ks.count - 1):   # close the gap, keeping the order
                        ks.ring[(ks.head + j) & mask] = ks.ring[(ks.head + j + 1) & mask]
                    ks.count -= 1
                    self.pending -= 1
                    self.cancelled += 1
                    n = 1
                    break
        ke_unlock(self.mu)
        return self._cancel_dropped(taken, n, 1, None) == 1

    def check_can_wait(self, what):
        """RuntimeError if waiting here would deadlock: never, since no Python
        code runs under the mutex (the pure scheduler's finalizers may)."""

    cdef int _live_workers(self) except -1:
        self._lock()
        n = self.nthreads
        ke_unlock(self.mu)
        return n

    def join(self, timeout=None):
        """Wait until the workers have exited (after close). True if they did.

        Waits on the worker count, not on a list of threads, so that a worker
        being started by a racing submit is waited for too. Called from a task,
        it waits neither for its own worker nor for workers whose task waits
        in join() too: two tasks that shut the executor down would otherwise
        wait for each other forever.
        """
        deadline = None if timeout is None else _monotonic() + timeout
        me = threading.current_thread()
        with self._exited:
            worker = me in self._threads
            if worker:
                self._joining += 1
                self._exited.notify_all()   # the others may stop waiting for us
            try:
                while self._live_workers() > (self._joining if worker else 0):
                    remaining = None if deadline is None else deadline - _monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self._exited.wait(remaining)
            finally:
                if worker:
                    self._joining -= 1
            threads = list(self._threads)
        if worker:
            return True   # the threads still alive are ours or wait in join() too
        for t in threads:
            # Past _worker_main already: this only waits for threading's own exit.
            if t.ident is not None:
                t.join(None if deadline is None else max(0.0, deadline - _monotonic()))
        return all(not t.is_alive() for t in threads)

    def shutdown(self, wait=True, *, cancel_futures=False):
        self._close(CLOSED_SHUTDOWN)
        if cancel_futures:
            self.cancel_queued()
        if wait:
            self.join()

    def metrics(self):
        """(workers, running, pending, active_keys, submitted, completed, failed, cancelled)"""
        cdef int nthreads
        cdef Py_ssize_t running, pending
        cdef size_t nkeys
        cdef unsigned long long submitted, completed, failed, cancelled
        self._lock()
        nthreads, running, pending, nkeys = self.nthreads, self.running, self.pending, self.nkeys
        submitted, completed = self.submitted, self.completed
        failed, cancelled = self.failed, self.cancelled
        ke_unlock(self.mu)
        # Built after unlocking: a tuple allocation may run the GC (3.10/3.11).
        return (nthreads, running, pending, nkeys, submitted, completed, failed, cancelled)

    def timings(self):
        """(sample_every, wait bucket counts, wait sum ns, run bucket counts, run sum ns)"""
        cdef Timing copy
        self._lock()
        copy = self.timing
        ke_unlock(self.mu)
        return _timing_tuple(&copy)   # built unlocked: tuples may run the GC

    def hot_keys(self, Py_ssize_t n):
        """The ``n`` keys with the most queued tasks (ties: running first), as
        ``([(key, queued, running, oldest queued task's wait in ns or None)], longest
        hold of the mutex in ns)``; keys with nothing queued count only if running.

        With a million keys a single pass would stop every worker for tens of
        milliseconds: the table is scanned SCAN_SLOTS slots at a time, the
        mutex (and the GIL) released in between, keeping the best ``n`` in a
        C heap. The answer is therefore not one snapshot: a key that moves in
        the table during the scan (a resize) may be missed, or met twice (the
        facade keeps the first). Each candidate's key is referenced as soon as
        it is chosen; the ones pushed out again are released between chunks.
        """
        cdef Py_ssize_t cap, size = 0, i, nevicted
        cdef size_t pos = 0, end, nslots
        cdef int bits
        cdef KeyState *ks
        cdef HotEntry cand
        cdef HotEntry *heap
        cdef PyObject **evicted
        cdef uint64_t t0, t1, longest = 0, now
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        self._lock()
        cap = min(n, <Py_ssize_t>self.nkeys + 64)   # keys that arrive later may not fit: fine
        bits = self.bits
        ke_unlock(self.mu)
        heap = <HotEntry *>PyMem_Malloc(sizeof(HotEntry) * cap)
        evicted = <PyObject **>PyMem_Malloc(sizeof(PyObject *) * SCAN_SLOTS)
        if heap is NULL or evicted is NULL:
            PyMem_Free(heap)
            PyMem_Free(evicted)
            raise MemoryError()
        try:
            while True:
                with nogil:
                    pass   # let threads waiting for the GIL run between chunks
                self._lock()
                t0 = ke_now_ns()
                if self.bits != bits:   # resized meanwhile: the same place in the new table
                    pos = pos << (self.bits - bits) if self.bits > bits else pos >> (bits - self.bits)
                    bits = self.bits
                nslots = <size_t>1 << bits
                end = min(pos + SCAN_SLOTS, nslots)
                nevicted = 0
                for i in range(<Py_ssize_t>pos, <Py_ssize_t>end):
                    ks = self.slots[i]
                    if ks is NULL or (ks.count == 0 and ks.runner == 0):
                        continue
                    cand.rank = 2 * <uint64_t>ks.count + (ks.runner != 0)
                    if size == cap and cand.rank <= heap[0].rank:
                        continue
                    cand.key = ks.key
                    cand.count = ks.count
                    cand.running = ks.runner != 0
                    cand.stamp = ks.ring[ks.head].stamp if ks.count else 0
                    Py_INCREF_raw(ks.key)   # no code runs on an incref: fine under the mutex
                    if size == cap:
                        evicted[nevicted] = heap[0].key
                        nevicted += 1
                        _heap_replace_top(heap, size, &cand)
                    else:
                        _heap_push(heap, size, &cand)
                        size += 1
                pos = end
                t1 = ke_now_ns()
                ke_unlock(self.mu)
                longest = max(longest, t1 - t0)
                for i in range(nevicted):
                    Py_DECREF_raw(evicted[i])
                if pos >= nslots:
                    break
            now = ke_now_ns()
            out = []
            for i in range(size):
                out.append((<object>heap[i].key, heap[i].count, heap[i].running != 0,
                            None if heap[i].stamp == 0
                            else (now - heap[i].stamp if now > heap[i].stamp else 0)))
        finally:
            for i in range(size):
                Py_DECREF_raw(heap[i].key)
            PyMem_Free(heap)
            PyMem_Free(evicted)
        return out, longest

    def _slow_tasks(self, uint64_t threshold_ns):
        """(the watchdog) [(key, ns it has run at least)] for each task found
        running longer than ``threshold_ns`` and not reported before.

        No clock read per task: each worker counts the tasks it starts, and a
        task is timed from the first call that saw its worker on it, so it is
        reported between threshold and threshold + one watchdog period after
        it started.
        """
        cdef WorkerSlot *w
        cdef PyObject *keys[SLOW_REPORTS]
        cdef uint64_t ran[SLOW_REPORTS]
        cdef int i, n = 0
        cdef uint64_t now = ke_now_ns()
        self._lock()
        w = self.workers
        while w is not NULL and n < SLOW_REPORTS:
            if w.ks is not NULL:
                if w.seq != w.seen_seq:
                    w.seen_seq = w.seq
                    w.seen_at = now
                    w.reported = 0
                elif not w.reported and now - w.seen_at >= threshold_ns:
                    w.reported = 1
                    keys[n] = w.ks.key
                    Py_INCREF_raw(keys[n])
                    ran[n] = now - w.seen_at
                    n += 1
            w = w.next
        ke_unlock(self.mu)
        out = []
        try:
            for i in range(n):
                out.append((<object>keys[i], ran[i]))
        finally:
            for i in range(n):
                Py_DECREF_raw(keys[i])
        return out

    def _watch_done(self):
        """(the watchdog) True once closed and every worker has exited."""
        return self.closing != OPEN and self._live_workers() == 0

    def key_pending(self, key):
        """Queued (not running) tasks of ``key``."""
        cdef KeyState *ks = self._locate(key, PyObject_Hash(key))
        cdef Py_ssize_t n = 0 if ks is NULL else ks.count
        ke_unlock(self.mu)
        return n

    def key_active(self, key):
        """True if ``key`` has queued or running tasks."""
        cdef KeyState *ks = self._locate(key, PyObject_Hash(key))
        ke_unlock(self.mu)
        return ks is not NULL

    def serving(self, key):
        """True if the calling thread is a worker running a task of ``key``."""
        cdef unsigned long me = PyThread_get_thread_ident()
        cdef KeyState *ks = self._locate(key, PyObject_Hash(key))
        cdef bint serving = ks is not NULL and ks.runner == me
        ke_unlock(self.mu)
        return serving

    @property
    def closed(self):
        return self.closing != OPEN

    @property
    def max_workers(self):
        return self.max_workers

    def _native_bytes(self):
        """Bytes of C memory held for keys, rings and the key table."""
        cdef Py_ssize_t n
        self._lock()   # tasks still in the inbox count once queued
        n = self.nbytes
        ke_unlock(self.mu)
        return n

    def _inboxed(self):
        """Tasks submitted through the inbox and not queued yet (tests)."""
        cdef Py_ssize_t n = 0
        cdef Pushed *p
        _acquire(self.mu)   # not _lock: that would queue them
        p = <Pushed *>ke_inbox_look(&self.inbox)
        if <void *>p is KE_SHUT:
            p = NULL
        while p is not NULL:   # pushes only prepend: the rest stays put
            n += 1
            p = p.next
        ke_unlock(self.mu)
        return n

    def _mapped_bytes(self):
        """The part of _native_bytes() in blocks mapped from the OS (blocks.h),
        which tracemalloc does not see; the rest went through PyMem_Malloc."""
        cdef size_t i, size
        cdef Py_ssize_t mapped = 0
        cdef KeyState *ks
        self._lock()
        size = sizeof(KeyState *) << self.bits
        if size >= KE_BIG_BLOCK:
            mapped += size
        for i in range(<size_t>1 << self.bits):
            ks = self.slots[i]
            if ks is not NULL and ks.ring is not &ks.slot0:
                size = sizeof(Task) * ks.cap
                if size >= KE_BIG_BLOCK:
                    mapped += size
        ke_unlock(self.mu)
        return mapped

    # -- fork: keep the state consistent across it, retire the copy in the child --

    def _before_fork(self):
        self._lock()

    def _after_fork_parent(self):
        ke_unlock(self.mu)

    def _after_fork_child(self):
        # Worker threads are gone, but for this one if a task forked; condition
        # variables they waited on may be unusable, so start from fresh ones
        # (the old ones are leaked on purpose).
        me = threading.current_thread()
        survivor = me in self._threads   # a task forked: its worker lives on here
        self.mu = ke_mutex_new()
        self.work_cv = ke_cond_new()
        self.space_cv = ke_cond_new()
        self._threads_lock = threading.Lock()
        self._exited = threading.Condition()  # its own (reentrant) lock: see _spawn
        self.closing = CLOSED_FORK
        self.nthreads = 1 if survivor else 0
        self.idle = 0
        self.pollers = 0
        self.polling = 0
        self.wakeups = 0
        self.blocked = 0
        self._joining = 0
        self._threads = [me] if survivor else []
        self.workers = NULL   # the parent's workers' slots: not running here
        self.dozing = 0
        # Tasks the parent's submitters put in the inbox after _before_fork:
        # queued here, then cancelled with the rest.
        self._lock()
        self._drain(KE_SHUT)
        ke_unlock(self.mu)
        self.cancel_queued()
        self._cancel_orphans()

    cdef int _cancel_orphans(self) except -1:
        """(fork child) The tasks the parent's other workers were running never
        end here: count them as cancelled and cancel their futures, so that
        every future ends done. Their keys stay busy: the executor is closed."""
        cdef size_t i
        cdef Py_ssize_t n = 0
        cdef KeyState *ks
        cdef unsigned long me = PyThread_get_thread_ident()
        orphans = []
        for i in range(<size_t>1 << self.bits):   # no other thread runs here
            ks = self.slots[i]
            if ks is NULL or ks.runner == 0 or ks.runner == me:
                continue
            n += 1
            if ks.current is not NULL:
                orphans.append(<object>ks.current)
                Py_DECREF_raw(ks.current)   # the list's reference replaces the key's
                ks.current = NULL
        self.running -= n
        self.cancelled += n
        _lifecycle.cancel_orphans(orphans)
        return 0


cdef void _timing_init(Timing *t, uint32_t every) noexcept:
    memset(t, 0, sizeof(Timing))
    t.every = every
    t.countdown = 1   # the first task is timed
    t.rng = SAMPLE_SEED


cdef inline bint _timing_take(Timing *t) noexcept nogil:
    """Once per accepted task (``every`` > 0): whether to time it. The gaps
    between timed tasks are random in [1, 2 * every - 1] (mean ``every``), so
    that no periodic pattern of submits is in step with them.

    Atomic (inbox.h), for submits that take no lock: the one submit that
    brings the countdown to 0 is timed and alone draws the next gap (the
    countdown stays <= 0 until it is re-armed)."""
    cdef uint64_t x
    if ke_countdown(&t.countdown) != 1:
        return False
    x = t.rng
    x ^= x << 13
    x ^= x >> 7
    x ^= x << 17
    t.rng = x
    ke_countdown_rearm(&t.countdown, <int64_t>(1 + x % (2 * <uint64_t>t.every - 1)))
    return True


cdef inline void _timing_record(Timing *t, uint64_t stamp, uint64_t started,
                                uint64_t ended) noexcept nogil:
    """Add a timed task's wait (submit -> start) and run (start -> end)."""
    cdef uint64_t wait = started - stamp if started > stamp else 0
    cdef uint64_t run = ended - started if ended > started else 0
    t.wait[ke_bucket(wait, NBUCKETS)] += 1
    t.wait_sum += wait
    t.run[ke_bucket(run, NBUCKETS)] += 1
    t.run_sum += run


cdef tuple _timing_tuple(Timing *t):
    """(every, wait bucket counts, wait sum ns, run bucket counts, run sum ns)"""
    return (t.every, tuple([t.wait[i] for i in range(NBUCKETS)]), t.wait_sum,
            tuple([t.run[i] for i in range(NBUCKETS)]), t.run_sum)


cdef inline void _heap_sift_down(HotEntry *heap, Py_ssize_t size, Py_ssize_t i) noexcept nogil:
    cdef Py_ssize_t child
    cdef HotEntry tmp
    while True:
        child = 2 * i + 1
        if child >= size:
            return
        if child + 1 < size and heap[child + 1].rank < heap[child].rank:
            child += 1
        if heap[i].rank <= heap[child].rank:
            return
        tmp = heap[i]
        heap[i] = heap[child]
        heap[child] = tmp
        i = child


cdef inline void _heap_push(HotEntry *heap, Py_ssize_t size, HotEntry *e) noexcept nogil:
    """Add ``e`` to the min-heap (by rank) of ``size`` entries."""
    cdef Py_ssize_t i = size, parent
    heap[i] = e[0]
    while i > 0:
        parent = (i - 1) // 2
        if heap[parent].rank <= heap[i].rank:
            return
        heap[i], heap[parent] = heap[parent], heap[i]
        i = parent


cdef inline void _heap_replace_top(HotEntry *heap, Py_ssize_t size, HotEntry *e) noexcept nogil:
    """Replace the smallest entry with ``e``."""
    heap[0] = e[0]
    _heap_sift_down(heap, size, 0)


cdef inline size_t _drain_ring(KeyState *ks, Task *out, size_t n) noexcept:
    while ks.count:
        out[n] = ks.ring[ks.head]
        ks.head = (ks.head + 1) & (ks.cap - 1)
        ks.count -= 1
        n += 1
    return n


include "_future.pxi"

# Imported after _future.pxi registered its fork hooks: in a forked child they
# must run before _lifecycle's, which cancel futures and so use their locks.
from keyedexec import _lifecycle


cdef inline int _check_ctx(object ctx) except -1:
    if not isinstance(ctx, Context):
        raise TypeError(f"ctx must be a keyedexec Context, got {type(ctx).__name__}")
    return 0



# -- vectorcall entry points ---------------------------------------------------------
#
# ``def execute(self, key, fn, /, *args, **kwargs)`` builds a kwargs dict on every
# call, even an empty one, and that dict (allocation, GC tracking, dealloc) is a
# large share of a no-op task's cost. These take the interpreter's argument
# vector as it is (METH_FASTCALL | METH_KEYWORDS) and build a dict only when
# keywords were passed. KeyedExecutor binds them per scheduler (_fast_methods).

cdef extern from "Python.h":
    ctypedef PyObject *(*PyCFunction)(PyObject *, PyObject *)
    ctypedef struct PyMethodDef:
        const char *ml_name
        PyCFunction ml_meth
        int ml_flags
        const char *ml_doc
    int METH_FASTCALL
    int METH_KEYWORDS
    object PyCFunction_NewEx(PyMethodDef *ml, object self, object module)
    tuple PyTuple_New(Py_ssize_t n)
    void PyTuple_SET_ITEM_raw "PyTuple_SET_ITEM"(object t, Py_ssize_t i, PyObject *o)
    PyObject *PyTuple_GET_ITEM_raw "PyTuple_GET_ITEM"(PyObject *t, Py_ssize_t i)
    Py_ssize_t PyTuple_GET_SIZE_raw "PyTuple_GET_SIZE"(PyObject *t)

ctypedef PyObject *(*_Vectorcall)(PyObject *, PyObject **, Py_ssize_t, PyObject *) except NULL


cdef inline int _check_call(const char *name, Py_ssize_t nargs) except -1:
    if nargs < 2:
        raise TypeError(f"{name.decode()}() takes a key and a callable, then its arguments "
                        f"({nargs} positional argument{'' if nargs == 1 else 's'} given)")
    return 0


cdef tuple _rest(PyObject **args, Py_ssize_t nargs):
    """args[2:nargs] as a tuple."""
    if nargs == 2:
        return ()
    cdef tuple t = PyTuple_New(nargs - 2)
    cdef Py_ssize_t i
    for i in range(2, nargs):
        Py_INCREF_raw(args[i])   # SET_ITEM steals it
        PyTuple_SET_ITEM_raw(t, i - 2, args[i])
    return t


cdef object _kwargs(PyObject **args, Py_ssize_t nargs, PyObject *kwnames):
    """The keyword arguments (their values follow the positional ones), or None."""
    if kwnames is NULL or PyTuple_GET_SIZE_raw(kwnames) == 0:
        return None
    cdef dict d = {}
    cdef Py_ssize_t i
    for i in range(PyTuple_GET_SIZE_raw(kwnames)):
        d[<object>PyTuple_GET_ITEM_raw(kwnames, i)] = <object>args[nargs + i]
    return d


cdef PyObject *_execute_vc(PyObject *self, PyObject **args, Py_ssize_t nargs,
                           PyObject *kwnames) except NULL:
    _check_call(b"execute", nargs)
    (<Scheduler>self)._push(<object>args[0], <object>args[1], _rest(args, nargs),
                            _kwargs(args, nargs, kwnames), None, 0, False, -1.0)
    Py_INCREF_raw(<PyObject *>None)
    return <PyObject *>None


cdef PyObject *_submit_kind(PyObject *self, PyObject **args, Py_ssize_t nargs,
                            PyObject *kwnames, const char *name, int kind) except NULL:
    _check_call(name, nargs)
    fut = _new_future()
    (<Scheduler>self)._push(<object>args[0], <object>args[1], _rest(args, nargs),
                            _kwargs(args, nargs, kwnames), fut, kind, False, -1.0)
    Py_INCREF_raw(<PyObject *>fut)   # the caller's reference
    return <PyObject *>fut


cdef PyObject *_submit_vc(PyObject *self, PyObject **args, Py_ssize_t nargs,
                          PyObject *kwnames) except NULL:
    return _submit_kind(self, args, nargs, kwnames, b"submit", K_FUTURE)


cdef PyObject *_execute_with_error_vc(PyObject *self, PyObject **args, Py_ssize_t nargs,
                                      PyObject *kwnames) except NULL:
    return _submit_kind(self, args, nargs, kwnames, b"execute_with_error", K_FUTURE | K_ERRVAL)


cdef PyMethodDef _FAST_DEFS[3]


cdef void _fast_def(int i, const char *name, _Vectorcall fn, const char *doc) noexcept:
    _FAST_DEFS[i].ml_name = name
    _FAST_DEFS[i].ml_meth = <PyCFunction><void *>fn
    _FAST_DEFS[i].ml_flags = METH_FASTCALL | METH_KEYWORDS
    _FAST_DEFS[i].ml_doc = doc


_fast_def(0, b"execute", _execute_vc,
          b"execute(key, fn, /, *args, **kwargs)\n--\n\n"
          b"Run fn(*args, **kwargs) on key's queue; errors go to on_error.")
_fast_def(1, b"submit", _submit_vc,
          b"submit(key, fn, /, *args, **kwargs)\n--\n\n"
          b"Run fn(*args, **kwargs) on key's queue; return its future.")
_fast_def(2, b"execute_with_error", _execute_with_error_vc,
          b"execute_with_error(key, fn, /, *args, **kwargs)\n--\n\n"
          b"Like submit, but the future's result is the exception raised, or None.")


# -- AsyncKeyedExecutor (keyedexec/aio.py) ------------------------------------------

include "_aio.pxi"
