/*
 * The ceiling of any copying transport on this machine: two copies per record, nothing else.
 *
 *     gcc -O2 -Wall -Wextra -Werror -pthread -o /tmp/copy_ceiling benchmarks/copy_ceiling.c
 *     /tmp/copy_ceiling [SLOTS [RECORDS [PAYLOAD]]]     (defaults 8, 40000, 1048576)
 *
 * A writer thread copies each record (memcpy, from one source buffer) into the next slot of
 * a ring of SLOTS slots, a reader thread copies it out (memcpy, into one reused buffer, as
 * read_into does), and each waits for the other by spinning on one counter: no syscall, no
 * wake-up, no header, no check. It prints records/s. A transport that copies in and out
 * (shmd's copying readers, unix sockets through the kernel, iceoryx2's copying peer) cannot
 * beat it with the same ring; docs/PERFORMANCE.md compares the 1 MiB cells with it.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

static size_t payload = 1 << 20;
static long slots = 8;
static long records = 40000;
static char *ring;
/* Records the writer has copied in: its release pairs with the reader's acquire. */
static _Atomic long written;
/* Records the reader has copied out: its release pairs with the writer's acquire. */
static _Atomic long taken;

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void *reader(void *arg)
{
    char *out = arg;
    for (long i = 0; i < records; i++) {
        /* acquire: pairs with the writer's release of `written`; the slot's bytes are visible */
        while (atomic_load_explicit(&written, memory_order_acquire) <= i)
            CPU_RELAX();
        memcpy(out, ring + (size_t)(i % slots) * payload, payload);
        /* release: pairs with the writer's acquire of `taken`; our reads are done */
        atomic_store_explicit(&taken, i + 1, memory_order_release);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc > 1)
        slots = atol(argv[1]);
    if (argc > 2)
        records = atol(argv[2]);
    if (argc > 3)
        payload = (size_t)atol(argv[3]);
    if (slots < 1 || records < 1 || payload < 1) {
        fprintf(stderr, "copy_ceiling: SLOTS, RECORDS and PAYLOAD must be positive\n");
        return 2;
    }
    ring = malloc((size_t)slots * payload);
    char *src = malloc(payload);
    char *out = malloc(payload);
    if (!ring || !src || !out) {
        fprintf(stderr, "copy_ceiling: Failed to allocate the ring since memory ran out\n");
        return 1;
    }
    memset(ring, 0, (size_t)slots * payload); /* touch every page before timing */
    memset(src, 3, payload);
    memset(out, 0, payload);
    pthread_t thread;
    double t0 = now();
    if (pthread_create(&thread, NULL, reader, out) != 0) {
        fprintf(stderr, "copy_ceiling: Failed to start the reader thread\n");
        return 1;
    }
    for (long i = 0; i < records; i++) {
        /* acquire: pairs with the reader's release of `taken`; the slot is free again */
        while (i - atomic_load_explicit(&taken, memory_order_acquire) >= slots)
            CPU_RELAX();
        memcpy(ring + (size_t)(i % slots) * payload, src, payload);
        /* release: pairs with the reader's acquire of `written`; the copy is visible first */
        atomic_store_explicit(&written, i + 1, memory_order_release);
    }
    pthread_join(thread, NULL);
    double dt = now() - t0;
    printf("slots=%ld payload=%zu records=%ld: %.0f records/s (%.1f us each)\n", slots, payload,
           records, (double)records / dt, dt / (double)records * 1e6);
    free(out);
    free(src);
    free(ring);
    return 0;
}
