/* Portable mutex and condition variable for the scheduler core (C++11).
 *
 * Never call ke_lock or ke_wait while holding the GIL: a thread blocked on the
 * mutex with the GIL would stop the thread that holds the mutex from ever
 * getting the GIL back. The core takes the mutex with ke_trylock first and
 * drops the GIL before it blocks.
 */
#ifndef KEYEDEXEC_SYNC_H
#define KEYEDEXEC_SYNC_H

#include <chrono>
#include <condition_variable>
#include <mutex>
#if defined(_MSC_VER)
#include <intrin.h>
#endif

typedef std::mutex ke_mutex;
typedef std::condition_variable ke_cond;

static inline ke_mutex *ke_mutex_new(void) { return new (std::nothrow) ke_mutex(); }
static inline void ke_mutex_free(ke_mutex *m) { delete m; }
static inline ke_cond *ke_cond_new(void) { return new (std::nothrow) ke_cond(); }
static inline void ke_cond_free(ke_cond *c) { delete c; }

static inline int ke_trylock(ke_mutex *m) { return m->try_lock() ? 1 : 0; }
static inline void ke_lock(ke_mutex *m) { m->lock(); }
static inline void ke_unlock(ke_mutex *m) { m->unlock(); }

/* Wait on cv with m held; m is held again on return. timeout < 0 waits
 * forever. Returns 0 when the timeout passed, 1 otherwise (which includes
 * spurious wake-ups: callers re-check their condition). */
static inline int ke_wait(ke_cond *cv, ke_mutex *m, double timeout) {
    std::unique_lock<std::mutex> lk(*m, std::adopt_lock);
    int woke = 1;
    if (timeout < 0) {
        cv->wait(lk);
    } else {
        woke = cv->wait_for(lk, std::chrono::duration<double>(timeout)) ==
               std::cv_status::no_timeout;
    }
    lk.release(); /* the caller keeps owning m */
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
