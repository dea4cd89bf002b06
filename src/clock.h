/* Monotonic clocks for the scheduler's timings (nanoseconds, one base).
 *
 * ke_now_ns: the precise clock (CLOCK_MONOTONIC, ~25 ns a read on Linux).
 * ke_coarse_ns: the same clock as of the last timer tick (a few ms behind at
 * most) at a fifth of the cost; it stamps every submitted task for hot_keys().
 * Where no cheap variant with the same base exists, both are the precise one.
 */
#ifndef KEYEDEXEC_CLOCK_H
#define KEYEDEXEC_CLOCK_H

#include <stdint.h>

#if defined(__linux__)
#include <time.h>
static inline uint64_t ke_read_clock(clockid_t id) {
    struct timespec ts;
    clock_gettime(id, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}
static inline uint64_t ke_now_ns(void) { return ke_read_clock(CLOCK_MONOTONIC); }
static inline uint64_t ke_coarse_ns(void) { return ke_read_clock(CLOCK_MONOTONIC_COARSE); }
#else
#include <chrono>
static inline uint64_t ke_now_ns(void) {
    return (uint64_t)std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch()).count();
}
static inline uint64_t ke_coarse_ns(void) { return ke_now_ns(); }
#endif

/* Histogram bucket of a duration: bucket k holds durations up to 2**k us
 * (k = 0 .. nbuckets - 2); the last bucket is +Inf. */
static inline int ke_bucket(uint64_t ns, int nbuckets) {
    uint64_t q = ns ? (ns - 1) / 1000 : 0;
    int k = 0;
#if defined(__GNUC__) || defined(__clang__)
    k = q ? 64 - __builtin_clzll(q) : 0;
#else
    while (q) { k++; q >>= 1; }
#endif
    return k < nbuckets - 1 ? k : nbuckets - 1;
}

#endif /* KEYEDEXEC_CLOCK_H */
