/* Large blocks (the key table, long rings) straight from the OS.
 *
 * glibc's malloc raises its mmap threshold each time it frees a large mapped
 * block, so a table that grew and shrank once would from then on live in the
 * heap, whose freed memory is rarely given back: after a burst of a million
 * keys the process would keep megabytes it no longer uses. Blocks of
 * KE_BIG_BLOCK bytes or more are therefore mapped and unmapped here; smaller
 * ones use Python's allocator (its arenas go back to the OS once empty).
 */
#ifndef KEYEDEXEC_BLOCKS_H
#define KEYEDEXEC_BLOCKS_H

#include <stddef.h>

#define KE_BIG_BLOCK ((size_t)64 * 1024)

#if defined(_WIN32)
#ifndef WIN32_LEAN_AND_MEAN
#define WIN32_LEAN_AND_MEAN
#endif
#ifndef NOMINMAX
#define NOMINMAX /* keep std::min/std::max usable in the generated C++ */
#endif
#include <windows.h>

static inline void *ke_map(size_t n) {
    return VirtualAlloc(NULL, n, MEM_RESERVE | MEM_COMMIT, PAGE_READWRITE);
}
static inline void ke_unmap(void *p, size_t n) {
    (void)n;
    VirtualFree(p, 0, MEM_RELEASE);
}
#else
#include <sys/mman.h>
#ifndef MAP_ANONYMOUS
#define MAP_ANONYMOUS MAP_ANON
#endif

static inline void *ke_map(size_t n) {
    void *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}
static inline void ke_unmap(void *p, size_t n) { munmap(p, n); }
#endif

#endif /* KEYEDEXEC_BLOCKS_H */
