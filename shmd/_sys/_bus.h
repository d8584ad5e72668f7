/*
 * What the compiled core knows of the segment layout (docs/PROTOCOL.md,
 * shmd/bus/layout.py), and how it touches shared memory.
 *
 * Every access to a shared word goes through the macros below, which make it
 * a C11 atomic with its order written at the call site.  The one exception is
 * a slot's payload: the writer memcpy()s it in and a reader memcpy()s it out
 * while the writer may be overwriting it.  That is the data half of a
 * seqlock (reserve_seq and write_seq are its sequence words), formally a data
 * race in C11, the same one every seqlock in use has (Linux's, and Boehm's
 * "Can seqlocks get along with programming language memory models?", 2012,
 * whose fence placement _writer.c and _reader.c follow): a reader never
 * trusts the bytes until it has re-read reserve_seq after an acquire fence,
 * and drops them if the writer may have been there.
 *
 * shmd/bus/layout.py holds the same numbers; _core.LAYOUT hands these to
 * tests/test_core.py, which checks they agree.
 */
#ifndef SHMD_BUS_H
#define SHMD_BUS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdatomic.h>
#include <stdint.h>

/* -- header words (byte offsets in the control part) ------------------------ */
#define OFF_ACTIVE 28          /* u32: 1 while the writer publishes */
#define OFF_WRITE_SEQ 72       /* u64: seqs below it are committed */
#define OFF_RESERVE_SEQ 80     /* u64: the writer may be writing [write_seq, reserve_seq) */
#define OFF_WRITER_WAITING 88  /* u32: the writer sleeps on the semaphore (block policy) */
#define OFF_SLEEP_COUNT 92     /* u32: sleep announcements, all readers */
#define OFF_BYTES_PUBLISHED 96 /* u64: payload bytes committed (statistics) */
#define OFF_SEM 192            /* sem_t: the writer's "space was freed" semaphore */
#define OFF_READERS 256        /* the reader table */
#define READER_ENTRY_SIZE 128

/* -- reader-table entry fields (byte offsets in an entry) ------------------- */
#define R_STATE 0           /* u32: 0 free, 1 attached, 2 evicted, 3 dormant */
#define R_CURSOR 8          /* u64 */
#define R_DELIVERED 16      /* u64 */
#define R_LOST 24           /* u64 */
#define R_LAST_ACTIVE_NS 32 /* u64 */
#define R_SLEEP_SEQ 40      /* u32: the reader's announcements */
#define R_WAKE_SEQ 44       /* u32: the writer's answers */
#define R_TOPICS 48         /* u64: subscription mask */
#define R_TOKEN 96          /* u64 */
#define R_TAKEN 112         /* u64: durable readers: seq after the last record handed out */

#define STATE_ATTACHED 1

/* -- a slot: the record header, then the payload ---------------------------- */
#define REC_SEQ 0
#define REC_TIMESTAMP 8
#define REC_LENGTH 16
#define REC_TOPIC 20
#define REC_FLAGS 24
#define REC_RESERVED 28
#define RECORD_HEADER_SIZE 32
#define TOPIC_MAX 63

/* A copying read copies at most this many slot bytes (at least one record). */
#define COPY_BATCH_BYTES (1u << 20)
/* Rings with at least this many slots let a one-record read leave its
 * cursor to the next call (one slot is then at most 1/64 of the writer's room). */
#define DEFER_CURSOR_MIN_CAPACITY 64

/* A shared word at a byte address.  The mapping is page-aligned and every
 * offset above is a multiple of the word's size, so the casts are aligned;
 * uint64_t and uint32_t atomics are lock-free on every platform shmd builds
 * for (checked in core_exec), hence plain words in memory another process
 * shares. */
#define A64(p) ((_Atomic uint64_t *)(void *)(p))
#define A32(p) ((_Atomic uint32_t *)(void *)(p))

#define LOAD64(p, order) atomic_load_explicit(A64(p), order)
#define LOAD32(p, order) atomic_load_explicit(A32(p), order)
#define STORE64(p, v, order) atomic_store_explicit(A64(p), (v), order)
#define STORE32(p, v, order) atomic_store_explicit(A32(p), (v), order)

#define RELAXED memory_order_relaxed
#define ACQUIRE memory_order_acquire
#define RELEASE memory_order_release
#define SEQ_CST memory_order_seq_cst

/* CLOCK_MONOTONIC in ns (the vDSO: no syscall). */
uint64_t shmd_monotonic_ns(void);

/* The segment's two mappings, taken from the Segment's mmaps (a held buffer
 * export: mmap.close() refuses while we hold it, so the memory cannot be
 * unmapped under us).  shmd_views_release() is idempotent. */
typedef struct {
    Py_buffer ctl;  /* ctl.buf == NULL: not taken, or released */
    Py_buffer ring;
} shmd_views;

int shmd_views_take(shmd_views *v, PyObject *control, PyObject *ring, int ring_writable,
                    Py_ssize_t control_size, Py_ssize_t ring_size);
void shmd_views_release(shmd_views *v);

extern PyTypeObject shmd_WriterType;
extern PyTypeObject shmd_ReaderType;
extern PyTypeObject shmd_LoanType;
extern PyTypeObject shmd_ReservationType;

/* Module-exec set-up of _writer.c (its interned names); 0, or -1 with an exception set. */
int shmd_writer_init(void);

#endif
