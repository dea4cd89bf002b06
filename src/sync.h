/* Portable mutex and condition variable for the scheduler core (C++11).
 *
 * Never call ke_lock or ke_wait while holding the GIL: a thread blocked on the
 * mutex with the GIL would stop the thread that holds the mutex from ever
 * getting the GIL back. The core takes the mutex with ke_trylock first and
 * drops the GIL before it blocks.
 */
#ifndef KEYEDEXEC_SYNC_H
#define KEYEDEXEC_SYNC_H

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#if defined(_MSC_VER)
#include <intrin.h>
#endif

/* The mutex, and a word that says whether it is held. The word lets a
 * thread that waits for the mutex spin on a plain load (ke_looks_free)
 * instead of on try_lock: each try_lock is an atomic read-modify-write that
 * takes the cache line away from the holder, who needs it to unlock (and,
 * without the GIL, the spinner never stops trying). The holder's stores to
 * the word are relaxed: it is only a hint, try_lock decides. */
struct ke_mutex {
    std::mutex m;
    std::atomic<int> held;
    ke_mutex() : held(0) {}
};
typedef std::condition_variable ke_cond;

static inline ke_mutex *ke_mutex_new(void) { return new (std::nothrow) ke_mutex(); }
static inline void ke_mutex_free(ke_mutex *m) { delete m; }
static inline ke_cond *ke_cond_new(void) { return new (std::nothrow) ke_cond(); }
static inline void ke_cond_free(ke_cond *c) { delete c; }

static inline int ke_trylock(ke_mutex *m) {
    if (!m->m.try_lock())
        return 0;
    m->held.store(1, std::memory_order_relaxed);
    return 1;
}
static inline void ke_lock(ke_mutex *m) {
    m->m.lock();
    m->held.store(1, std::memory_order_relaxed);
}
static inline void ke_unlock(ke_mutex *m) {
    m->held.store(0, std::memory_order_relaxed);
    m->m.unlock();
}
/* Whether the mutex looks free (a relaxed load: a hint for spinners). */
static inline int ke_looks_free(ke_mutex *m) {
    return m->held.load(std::memory_order_relaxed) == 0;
}

/* Wait on cv with m held; m is held again on return. timeout < 0 waits
 * forever. Returns 0 when the timeout passed, 1 otherwise (which includes
 * spurious wake-ups: callers re-check their condition). */
static inline int ke_wait(ke_cond *cv, ke_mutex *m, double timeout) {
    std::unique_lock<std::mutex> lk(m->m, std::adopt_lock);
    int woke = 1;
    m->held.store(0, std::memory_order_relaxed);
    if (timeout < 0) {
        cv->wait(lk);
    } else {
        woke = cv->wait_for(lk, std::chrono::duration<double>(timeout)) ==
               std::cv_status::no_timeout;
    }
    lk.release(); /* the caller keeps owning m */
    m->held.store(1, std::memory_order_relaxed);
    return woke;
}

static inline void ke_notify_one(ke_cond *cv) { cv->notify_one(); }
static inline void ke_notify_all(ke_cond *cv) { cv->notify_all(); }
/* Tell the CPU we are spinning on a lock (cheaper for the lock holder). */
static inline void ke_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#elif defined(_MSC_VER) && (defined(_M_X64) || defined(_M_IX86))
    _mm_pause();
#endif
}

/* Give the core to another runnable thread, if any (sched_yield on Linux):
 * for a thread that polls with nothing to do, on a machine with more
 * runnable threads than cores. */
static inline void ke_yield(void) { std::this_thread::yield(); }

/* A read of a pointer the mutex guards, made without the mutex: a hint that
 * the caller re-checks under it. Relaxed atomic, so the compiler reloads it
 * on each call instead of hoisting it out of a polling loop. */
static inline void *ke_peek(void *const *p) {
#if defined(__GNUC__) || defined(__clang__)
    return __atomic_load_n(p, __ATOMIC_RELAXED);
#else
    return *(void *const volatile *)p;
#endif
}

#endif
