/*
 * _core.Reader: a reader's hot path, reading and announcing sleep
 * (docs/PROTOCOL.md "Reading", steps [R1]..[R5], and "Sleeping", [S1]..[S4]).
 *
 * shmd.bus.subscriber.Subscriber owns one and binds read_batch and
 * prepare_sleep on itself, so neither costs a Python frame.  Errors a user
 * can meet (reading after close, an entry the writer evicted, a corrupt
 * slot) go to the `on_error(code, seq)` callable, which raises the
 * library's exception for them; we return NULL with it set.
 */
#include "_bus.h"

#include <errno.h>
#include <math.h>
#include <sched.h>
#include <semaphore.h>
#include <string.h>
#include <unistd.h>

/* on_error's codes (shmd.bus.subscriber mirrors them). */
enum { ERR_CLOSED_READ = 1, ERR_EVICTED = 2, ERR_CORRUPT = 3, ERR_CLOSED_SLEEP = 4 };


struct Loan;

typedef struct Reader {
    PyObject_HEAD
    shmd_views v;
    uint8_t *c, *r;   /* control part, ring (NULL once closed) */
    uint8_t *e;       /* our table entry */
    PyObject *ring_view; /* a memoryview of the ring, for zero-copy slices */
    uint64_t capacity, mask, slot, max_payload;
    uint64_t token, topics;
    uint64_t cursor, delivered, lost;
    uint64_t posted_at;  /* cursor at our last post of the writer's semaphore */
    Py_ssize_t copy_limit;
    int block, may_owe, cursor_owed, held;
    int spinning;        /* a thread waits in spin() without the GIL: close() refuses */
    int efd;             /* our eventfd's number, -1: none (owned by Python) */
    PyObject *on_error;  /* on_error(code, seq): raises */
    PyObject *hook;      /* tests: hook(start, end) between the plan and the copy */
    /* Block policy: the records of hold reads whose views may still be alive,
     * in seq order, each a strong reference (a Loan's pointer back to us is
     * borrowed, and cleared when it leaves this list). */
    struct Loan **loans;
    Py_ssize_t nloans, loans_cap;
} Reader;

/* A held record's payload, exported read-only to the memoryview a hold read
 * hands out (block policy only).  While anything made from that view lives
 * (slices, numpy arrays), `exports` stays above 0 and the reader's published
 * cursor stays at or below `seq`, so the writer cannot reuse the slot. */
typedef struct Loan {
    PyObject_HEAD
    Py_buffer ring;        /* an export of the reader's ring view: the mapping
                              stays while we live, even after the reader's close */
    const uint8_t *buf;    /* the payload, in the ring */
    Py_ssize_t len;
    uint64_t seq;
    Py_ssize_t exports;    /* our buffer's consumers (memoryviews' managed buffers) */
    Reader *reader;        /* borrowed; NULL: not (or no longer) in a reader's list */
    int open;              /* may be exported again: its slot is still held */
} Loan;

static PyObject *
fail(Reader *self, int code, uint64_t seq)
{
    PyObject *r = PyObject_CallFunction(self->on_error, "iK", code, (unsigned long long)seq);
    if (r != NULL) {
        Py_DECREF(r);
        PyErr_SetString(PyExc_RuntimeError, "Failed to read since on_error did not raise");
    }
    return NULL;
}

/* -- construction -------------------------------------------------------------- */

static int
Reader_init(Reader *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"control", "ring", "ring_view", "capacity", "slot_size",
                             "index", "token", "block", "eventfd", "on_error", NULL};
    PyObject *control, *ring, *ring_view, *on_error;
    unsigned long long capacity, slot, token;
    unsigned int index;
    int block, efd;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOKKIKpiO", kwlist, &control, &ring,
                                     &ring_view, &capacity, &slot, &index, &token, &block,
                                     &efd, &on_error)) {
        return -1;
    }
    if (self->c != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Failed to initialise the reader since it was already");
        return -1;
    }
    if (capacity == 0 || (capacity & (capacity - 1)) != 0 || slot <= RECORD_HEADER_SIZE
        || slot % 8 != 0) {
        PyErr_SetString(PyExc_ValueError, "Failed to make the reader since its geometry is invalid");
        return -1;
    }
    if (!PyCallable_Check(on_error)) {
        PyErr_SetString(PyExc_TypeError, "Failed to make the reader since on_error is not callable");
        return -1;
    }
    Py_ssize_t control_size = OFF_READERS + (Py_ssize_t)(index + 1) * READER_ENTRY_SIZE;
    if (shmd_views_take(&self->v, control, ring, 0, control_size,
                        (Py_ssize_t)(capacity * slot)) < 0) {
        return -1;
    }
    self->c = self->v.ctl.buf;
    self->r = self->v.ring.buf;
    self->e = self->c + OFF_READERS + (size_t)index * READER_ENTRY_SIZE;
    self->capacity = capacity;
    self->mask = capacity - 1;
    self->slot = slot;
    self->max_payload = slot - RECORD_HEADER_SIZE;
    self->token = token;
    /* The writer set these up before it handed us the entry. */
    self->cursor = LOAD64(self->e + R_CURSOR, ACQUIRE);
    self->topics = LOAD64(self->e + R_TOPICS, RELAXED);
    self->delivered = self->lost = 0;
    self->posted_at = UINT64_MAX;
    self->copy_limit = (Py_ssize_t)(COPY_BATCH_BYTES / slot) > 0 ? (Py_ssize_t)(COPY_BATCH_BYTES / slot) : 1;
    self->block = block;
    self->may_owe = capacity >= DEFER_CURSOR_MIN_CAPACITY;
    self->cursor_owed = self->held = 0;
    self->efd = efd;
    Py_INCREF(ring_view);
    Py_XSETREF(self->ring_view, ring_view);
    Py_INCREF(on_error);
    Py_XSETREF(self->on_error, on_error);
    return 0;
}

/* Forget every loan: none holds a slot through us any more (closed,
 * collected, or the entry is no longer ours).  Views already made keep
 * reading their bytes (the mapping stays until the last one goes).  The
 * array stays (only Reader_clear frees it): a read that reserved room in it
 * (loans_reserve) can count on that room whatever its allocations run. */
static void
loans_drop_all(Reader *self)
{
    Py_ssize_t n = self->nloans;
    self->nloans = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        Loan *loan = self->loans[i];
        loan->reader = NULL;
        loan->open = 0;
        Py_DECREF(loan);
    }
}

static int
Reader_traverse(Reader *self, visitproc visit, void *arg)
{
    Py_VISIT(self->ring_view);
    Py_VISIT(self->on_error);
    Py_VISIT(self->hook);
    return 0;
}

static int
Reader_clear(Reader *self)
{
    loans_drop_all(self);
    PyMem_Free(self->loans);
    self->loans = NULL;
    self->loans_cap = 0;
    Py_CLEAR(self->ring_view);
    Py_CLEAR(self->on_error);
    Py_CLEAR(self->hook);
    return 0;
}

static void
Reader_dealloc(Reader *self)
{
    PyObject_GC_UnTrack(self);
    shmd_views_release(&self->v);
    Reader_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* -- the cursor ------------------------------------------------------------------- */

/* The entry is still ours: attached, with our token. */
static inline int
entry_is_ours(Reader *self)
{
    return LOAD32(self->e + R_STATE, ACQUIRE) == STATE_ATTACHED  /* pairs with the writer's
                                                                    table change under the mutex */
           && LOAD64(self->e + R_TOKEN, RELAXED) == self->token;
}

/* Block policy: post the writer's semaphore if it waits for space we freed
 * and we have not posted for this cursor. */
static inline void
post_owed(Reader *self)
{
    if (self->posted_at != self->cursor && LOAD32(self->c + OFF_WRITER_WAITING, RELAXED)) {
        self->posted_at = self->cursor;
        sem_post((sem_t *)(void *)(self->c + OFF_SEM));
    }
}

/* [R5] The stores themselves: `cursor` and the counters into our entry. */
static inline void
store_entry(Reader *self, uint64_t cursor)
{
    uint8_t *e = self->e;
    /* Release: our copies of the slots below the cursor are done before the
     * writer can see them free; pairs with the writer's acquire fence after
     * it loads the cursors (shmd.bus.block.slowest). */
    STORE64(e + R_CURSOR, cursor, RELEASE);
    STORE64(e + R_DELIVERED, self->delivered, RELAXED);  /* statistics */
    STORE64(e + R_LOST, self->lost, RELAXED);
    STORE64(e + R_LAST_ACTIVE_NS, shmd_monotonic_ns(), RELAXED);
}

/* Drop the loans whose views are all gone (the writer may reuse their slots
 * once we publish); the seq of the first one left, if below `cursor`. */
__attribute__((noinline)) static uint64_t
loans_floor(Reader *self, uint64_t cursor)
{
    Py_ssize_t kept = 0;
    for (Py_ssize_t i = 0; i < self->nloans; i++) {
        Loan *loan = self->loans[i];
        if (loan->exports > 0) {
            self->loans[kept++] = loan;
            continue;
        }
        loan->reader = NULL;
        loan->open = 0;
        Py_DECREF(loan);  /* frees nothing of ours: the mapping is held by self->v */
    }
    self->nloans = kept;
    return kept > 0 && self->loans[0]->seq < cursor ? self->loans[0]->seq : cursor;
}

/* [R5] under the block policy: the cursor stops at the first held record a
 * view still lives on (loans), then the writer is posted if it waits.  Kept
 * out of line: inlined, the registers it needs cost publish_cursor's
 * drop-oldest path a few instructions a call (benchmarks/instructions.py). */
__attribute__((noinline)) static void
publish_blocking(Reader *self)
{
    store_entry(self, self->nloans > 0 ? loans_floor(self, self->cursor) : self->cursor);
    /* No fence between the cursor store and the writer_waiting load: one
     * here would be paid on every read, and the writer waits rarely.  Both
     * sides can miss each other once; we post at our next read (post_owed)
     * or after the fence of our next sleep [S4], and the writer re-checks
     * the cursors every 10 ms anyway (shmd.bus.block.wait_for_space). */
    if (LOAD32(self->c + OFF_WRITER_WAITING, RELAXED)) {
        self->posted_at = self->cursor;
        sem_post((sem_t *)(void *)(self->c + OFF_SEM));
    }
}

/* [R5] Store cursor and counters into our entry.  Drop-oldest (the
 * benchmarks' hot path) pays one test of `block`, as it always did. */
static void
publish_cursor(Reader *self)
{
    self->held = self->cursor_owed = 0;
    if (self->block) {
        publish_blocking(self);
        return;
    }
    store_entry(self, self->cursor);
}

/* Publish a cursor a read left for later, if the entry is still ours (the
 * writer may have evicted us and given it to another reader meanwhile). */
static void
settle(Reader *self)
{
    if (self->c != NULL && entry_is_ours(self)) {
        publish_cursor(self);
    } else {
        self->held = self->cursor_owed = 0;
        loans_drop_all(self);  /* nothing is held through an entry that is not ours */
    }
}

/* -- loans: held records' views ------------------------------------------------------ */

static int
Loan_getbuffer(Loan *self, Py_buffer *view, int flags)
{
    if (!self->open) {
        view->obj = NULL;
        PyErr_Format(PyExc_BufferError,
                     "Failed to view record %llu since its slot was released",
                     (unsigned long long)self->seq);
        return -1;
    }
    /* Read-only: the ring is mapped PROT_READ; a writable request fails here. */
    if (PyBuffer_FillInfo(view, (PyObject *)self, (void *)self->buf, self->len, 1, flags) < 0) {
        return -1;
    }
    self->exports++;
    return 0;
}

static void
Loan_releasebuffer(Loan *self, Py_buffer *Py_UNUSED(view))
{
    if (--self->exports > 0) {
        return;
    }
    Reader *r = self->reader;
    /* The last view of the first record still held went (in whatever code
     * dropped it): republish now, so a writer waiting for this slot (block
     * policy) is posted at once instead of at our next call.  Not while a
     * hold read still holds: release() or the next sleep publishes then.
     * The list keeps a reference to us, so settle() dropping it frees
     * nothing under the caller, which holds one too. */
    if (r != NULL && !r->held && r->nloans > 0 && r->loans[0] == self) {
        settle(r);
    }
}

static void
Loan_dealloc(Loan *self)
{
    /* Not in a reader's list (the list holds a reference), so nobody points at us. */
    PyBuffer_Release(&self->ring);  /* may be the mapping's last export: munmap */
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Loan_get_seq(Loan *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(self->seq);
}

static PyObject *
Loan_get_held(Loan *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->open);
}

static PyGetSetDef Loan_getset[] = {
    {"seq", (getter)Loan_get_seq, NULL, "The record's seq.", NULL},
    {"held", (getter)Loan_get_held, NULL,
     "Its slot is still held for this view (False once released, or the reader closed).",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyBufferProcs Loan_as_buffer = {
    .bf_getbuffer = (getbufferproc)Loan_getbuffer,
    .bf_releasebuffer = (releasebufferproc)Loan_releasebuffer,
};

PyTypeObject shmd_LoanType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmd._sys._core.Loan",
    .tp_doc = "A held record's payload (block policy): its slot stays held while a view of "
              "it lives (shmd/_sys/_reader.c).",
    .tp_basicsize = sizeof(Loan),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)Loan_dealloc,
    .tp_as_buffer = &Loan_as_buffer,
    .tp_getset = Loan_getset,
};

/* A memoryview over a new loan of the payload at `off`; NULL with an exception set.
 * Out of line, as keep_loans: the read's hot loop never comes here. */
__attribute__((noinline)) static PyObject *
loan_view(Reader *self, uint64_t seq, size_t off, uint32_t length)
{
    Loan *loan = (Loan *)PyType_GenericAlloc(&shmd_LoanType, 0);  /* zeroed */
    if (loan == NULL) {
        return NULL;
    }
    if (PyObject_GetBuffer(self->ring_view, &loan->ring, PyBUF_SIMPLE) < 0) {
        Py_DECREF(loan);
        return NULL;
    }
    if (loan->ring.len < 0 || (size_t)loan->ring.len < off + length) {
        Py_DECREF(loan);
        PyErr_SetString(PyExc_ValueError,
                        "Failed to view a record since the ring view is smaller than the ring");
        return NULL;
    }
    loan->buf = (const uint8_t *)loan->ring.buf + off;
    loan->len = (Py_ssize_t)length;
    loan->seq = seq;
    loan->open = 1;
    PyObject *view = PyMemoryView_FromObject((PyObject *)loan);
    Py_DECREF(loan);  /* the view's managed buffer holds it */
    return view;
}

/* Room for `n` more loans; -1 with an exception set.  Called before a hold
 * read takes anything, so keep_loans after it cannot fail. */
__attribute__((noinline)) static int
loans_reserve(Reader *self, Py_ssize_t n)
{
    if (n <= self->loans_cap - self->nloans) {
        return 0;
    }
    Py_ssize_t cap = self->loans_cap > 8 ? self->loans_cap : 8;
    while (cap < self->nloans + n) {
        cap *= 2;
    }
    Loan **grown = PyMem_Realloc(self->loans, (size_t)cap * sizeof *grown);
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->loans = grown;
    self->loans_cap = cap;
    return 0;
}

/* Append the loans of a hold read's rows (every payload a loan's view, no
 * more rows than loans_reserve made room for) to our list, in order. */
__attribute__((noinline)) static void
keep_loans(Reader *self, PyObject *rows)
{
    if (self->c == NULL) {
        return;  /* closed meanwhile (a finalizer run by the read's allocations): not held */
    }
    Py_ssize_t n = PyList_GET_SIZE(rows);
    for (Py_ssize_t i = 0; i < n && self->nloans < self->loans_cap; i++) {
        PyObject *view = PyTuple_GET_ITEM(PyList_GET_ITEM(rows, i), 3);
        Loan *loan = (Loan *)PyMemoryView_GET_BUFFER(view)->obj;
        loan->reader = self;
        self->loans[self->nloans++] = (Loan *)Py_NewRef(loan);
    }
}

/* -- reading ------------------------------------------------------------------------ */

PyDoc_STRVAR(read_batch_doc,
"read_batch(limit=4096, copy=True, hold=False) -> [(seq, timestamp_ns, topic, payload)]\n\n"
"Records from the cursor, in order, for this reader's topics (docs/PROTOCOL.md, Reading).");

/* How read_batch hands out a payload: its `copy` argument, or AS_LOAN for a
 * zero-copy hold read under the block policy (one variable: a second one
 * live through the copy loop costs the copying reads a spill). */
enum { AS_SLICE = 0, AS_BYTES = 1, AS_LOAN = 2 };

/* The arguments; `copy` one of the above.  A lending read reserves its
 * loans' room here, where only calls that pass `hold` come: the copying and
 * slicing reads pay no test for it. */
static int
parse_read_args(Reader *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                Py_ssize_t *limit, int *copy, int *hold)
{
    PyObject *vals[3] = {NULL, NULL, NULL};
    static const char *names[3] = {"limit", "copy", "hold"};
    if (nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "read_batch() takes at most 3 arguments");
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++) {
        vals[i] = args[i];
    }
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, k);
        int found = 0;
        for (int j = 0; j < 3; j++) {
            if (PyUnicode_CompareWithASCIIString(name, names[j]) == 0) {
                if (vals[j] != NULL) {
                    PyErr_Format(PyExc_TypeError, "read_batch() got %s twice", names[j]);
                    return -1;
                }
                vals[j] = args[nargs + k];
                found = 1;
            }
        }
        if (!found) {
            PyErr_Format(PyExc_TypeError, "read_batch() got an unexpected keyword %R", name);
            return -1;
        }
    }
    *limit = 4096;
    if (vals[0] != NULL && (*limit = PyLong_AsSsize_t(vals[0])) == -1 && PyErr_Occurred()) {
        return -1;
    }
    *copy = vals[1] == NULL ? AS_BYTES : PyObject_IsTrue(vals[1]);
    if (vals[2] == NULL) {
        *hold = 0;
    } else if ((*hold = PyObject_IsTrue(vals[2])) > 0 && *copy == AS_SLICE && self->block) {
        *copy = AS_LOAN;
        /* Room for every row the read can hand out (at most a ring's). */
        Py_ssize_t most = *limit < 1 ? 1 : *limit;
        if ((uint64_t)most > self->capacity) {
            most = (Py_ssize_t)self->capacity;
        }
        if (loans_reserve(self, most) < 0) {
            return -1;
        }
    }
    if (*copy < 0 || *hold < 0) {
        return -1;
    }
    return 0;
}

/* A slot's record header, as [R3] loads it. */
typedef struct {
    uint64_t seq, ts;
    uint32_t length, topic;
    size_t off; /* the slot's offset in the ring */
} slot_head;

/* [R3] Load the header of the slot of position `s`; whether it is a record
 * to hand out (its seq, a length that fits the slot, a topic id).  The
 * words are loaded relaxed: what they say is trusted only once [R4] says
 * the writer was not there. */
static inline int
load_head(const Reader *self, uint64_t s, slot_head *hd)
{
    hd->off = (size_t)((s & self->mask) * self->slot);
    const uint8_t *h = self->r + hd->off;
    hd->seq = LOAD64(h + REC_SEQ, RELAXED);
    hd->ts = LOAD64(h + REC_TIMESTAMP, RELAXED);
    hd->length = LOAD32(h + REC_LENGTH, RELAXED);
    hd->topic = LOAD32(h + REC_TOPIC, RELAXED);
    return hd->seq == s && hd->length <= self->max_payload && hd->topic <= TOPIC_MAX;
}

/* One record's row; NULL with an exception set. */
static PyObject *
record_row(Reader *self, uint64_t seq, uint64_t ts, uint32_t topic, size_t off, uint32_t length,
           int how)
{
    PyObject *payload;
    if (how == AS_BYTES) {
        /* The seqlock's data read (see _bus.h): trusted only after [R4]. */
        payload = PyBytes_FromStringAndSize((const char *)self->r + off, (Py_ssize_t)length);
    } else if (how == AS_LOAN) {
        payload = loan_view(self, seq, off, length);
    } else {
        payload = PySequence_GetSlice(self->ring_view, (Py_ssize_t)off,
                                      (Py_ssize_t)(off + length));
    }
    if (payload == NULL) {
        return NULL;
    }
    PyObject *row = PyTuple_New(4);
    if (row == NULL) {
        Py_DECREF(payload);
        return NULL;
    }
    PyObject *a = PyLong_FromUnsignedLongLong(seq);
    PyObject *b = PyLong_FromUnsignedLongLong(ts);
    PyObject *t = PyLong_FromUnsignedLong(topic);
    if (a == NULL || b == NULL || t == NULL) {
        Py_XDECREF(a);
        Py_XDECREF(b);
        Py_XDECREF(t);
        Py_DECREF(payload);
        Py_DECREF(row);
        return NULL;
    }
    PyTuple_SET_ITEM(row, 0, a);
    PyTuple_SET_ITEM(row, 1, b);
    PyTuple_SET_ITEM(row, 2, t);
    PyTuple_SET_ITEM(row, 3, payload);
    return row;
}

/* [R1]-[R5] reader_read. */
static PyObject *
Reader_read_batch(Reader *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    Py_ssize_t limit;
    int copy, hold;
    if (parse_read_args(self, args, nargs, kwnames, &limit, &copy, &hold) < 0) {
        return NULL;
    }
    if (self->c == NULL) {
        return fail(self, ERR_CLOSED_READ, 0);
    }
    uint8_t *c = self->c;
    uint64_t cursor = self->cursor;
    /* [R1] Acquire: pairs with the writer's release store of write_seq [P4]:
     * the slots below it are written. */
    uint64_t w = LOAD64(c + OFF_WRITE_SEQ, ACQUIRE);
    if (w <= cursor) {
        if (self->cursor_owed) {
            settle(self);
        }
        if (self->block) {
            post_owed(self);
        }
        return PyList_New(0);
    }
    if (!entry_is_ours(self)) {
        return fail(self, ERR_EVICTED, 0);
    }
    /* Ordered after the write_seq load by its acquire. */
    uint64_t reserve = LOAD64(c + OFF_RESERVE_SEQ, RELAXED);
    if (limit < 1) {
        limit = 1;
    }
    if (copy == AS_BYTES && limit > self->copy_limit) {
        limit = self->copy_limit;
    }
    /* Never more positions than the ring has: an honest writer never commits
     * more than a ring past R - capacity (W <= R), but a hostile or broken
     * one can set write_seq anywhere, and with a caller's huge limit the plan
     * below would span 2^61 positions (its row counts' allocation wrapping
     * to 8 bytes: a heap overflow) or ask for terabytes (found writing
     * fuzz/fuzz_read.py). */
    if ((uint64_t)limit > self->capacity) {
        limit = (Py_ssize_t)self->capacity;
    }
    /* [R2] The plan: the writer may be overwriting every seq below
     * reserve - capacity, so those are lost. */
    uint64_t cap = self->capacity;
    uint64_t start = cursor, lost = 0;
    if (reserve > cap && reserve - cap > cursor) {
        start = reserve - cap;
        lost = start - cursor;
    }
    uint64_t end = start;
    if (w > start) {
        end = w - start > (uint64_t)limit ? start + (uint64_t)limit : w;
    }
    if (self->hook != NULL) {
        PyObject *r = PyObject_CallFunction(self->hook, "KK", (unsigned long long)start,
                                            (unsigned long long)end);
        if (r == NULL) {
            return NULL;
        }
        Py_DECREF(r);
        if (self->c == NULL) {
            return fail(self, ERR_CLOSED_READ, 0);
        }
    }
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        return NULL;
    }
    uint64_t topics = self->topics;
    uint64_t bad = UINT64_MAX;
    /* [R3] Copy [start, end).  `first_kept[i]`: how many rows of `out` come
     * from positions below start + i is what [R4] needs; rows are in
     * position order, so counting rows per position as we go is enough. */
    uint64_t n = end - start;
    Py_ssize_t *rows_below = PyMem_Malloc((size_t)(n + 1) * sizeof(Py_ssize_t));
    if (rows_below == NULL) {
        Py_DECREF(out);
        return PyErr_NoMemory();
    }
    for (uint64_t s = start; s < end; s++) {
        rows_below[s - start] = PyList_GET_SIZE(out);
        slot_head hd;
        if (!load_head(self, s, &hd)) {
            /* The writer lapping us (settled by [R4]) or a corrupt slot;
             * either way its bytes are not a record to hand out. */
            if (bad == UINT64_MAX) {
                bad = s;
            }
            continue;
        }
        if (!(topics >> hd.topic & 1)) {
            continue;
        }
        PyObject *row = record_row(self, hd.seq, hd.ts, hd.topic, hd.off + RECORD_HEADER_SIZE,
                                    hd.length, copy);
        if (row == NULL || PyList_Append(out, row) < 0) {
            Py_XDECREF(row);
            PyMem_Free(rows_below);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(row);
    }
    rows_below[n] = PyList_GET_SIZE(out);
    /* [R4] Acquire fence: our slot loads above are ordered before the
     * re-read of reserve_seq; pairs with the writer's release fence after
     * its reserve_seq store [P2]: if we saw any byte it wrote into a slot,
     * we see its reserve now. */
    atomic_thread_fence(ACQUIRE);
    uint64_t again = LOAD64(c + OFF_RESERVE_SEQ, RELAXED);
    uint64_t oldest_ok = again > cap ? again - cap : 0;
    if (start < oldest_ok) {
        /* Every position below `cut` may hold a torn record or a whole one
         * of a later lap (whose header seq looks valid): drop them by
         * position, never by their header's seq. */
        uint64_t cut = oldest_ok < end ? oldest_ok : end;
        lost += cut - start;
        Py_ssize_t drop = rows_below[cut - start];
        if (drop > 0 && PyList_SetSlice(out, 0, drop, NULL) < 0) {
            PyMem_Free(rows_below);
            Py_DECREF(out);
            return NULL;
        }
    } else if (bad != UINT64_MAX) {
        PyMem_Free(rows_below);
        Py_DECREF(out);
        return fail(self, ERR_CORRUPT, bad);
    }
    PyMem_Free(rows_below);
    /* [R5] */
    self->cursor = end;
    self->delivered += (uint64_t)PyList_GET_SIZE(out);
    self->lost += lost;
    if (hold) {
        if (copy == AS_LOAN) {
            keep_loans(self, out);  /* the rows kept (a dropped row's loan held nothing) */
        }
        self->held = 1;
    } else if (n == 1 && self->may_owe && !self->cursor_owed) {
        /* Publishing the cursor costs four stores and a clock read, as much
         * as the rest of a one-record read; on the latency path it would come
         * before the caller has its record.  The next call publishes it (a
         * read, prepare_sleep, release, close), so the writer sees this
         * reader at most one slot behind.  Not in a ring of few big slots,
         * where one slot is room the writer waits for. */
        self->cursor_owed = 1;
    } else {
        publish_cursor(self);
    }
    return out;
}

/* -- sleeping ------------------------------------------------------------------------ */

PyDoc_STRVAR(prepare_sleep_doc,
"prepare_sleep() -> 0.0 or None\n\n"
"Announce that this reader goes to sleep: 0.0 = do not (records arrived or\n"
"the writer went inactive), None = sleep until the eventfd fires.");

/* [S1]-[S4] reader_prepare_sleep. */
static PyObject *
Reader_prepare_sleep(Reader *self, PyObject *Py_UNUSED(unused))
{
    if (self->c == NULL) {
        return fail(self, ERR_CLOSED_SLEEP, 0);
    }
    uint8_t *c = self->c, *e = self->e;
    if (self->held || self->cursor_owed) {
        settle(self);  /* a sleeping reader must not hold the writer up */
    }
    /* [S1] Acquire: pairs with the writer's release stores of write_seq [P4]
     * and active (shmd.bus.publisher.Publisher.deactivate). */
    if (LOAD64(c + OFF_WRITE_SEQ, ACQUIRE) > self->cursor || !LOAD32(c + OFF_ACTIVE, ACQUIRE)) {
        return PyFloat_FromDouble(0.0);
    }
    if (!entry_is_ours(self)) {
        return fail(self, ERR_EVICTED, 0);  /* never announce into a reused entry */
    }
    /* [S2] Drain what the eventfd holds before announcing: a write answering
     * this announcement can only come after it, and the wake-up path then
     * costs no syscall but the epoll_wait that returns. */
    if (self->efd >= 0) {
        uint64_t junk;
        if (read(self->efd, &junk, sizeof junk) < 0 && errno != EAGAIN) {
            return PyErr_SetFromErrno(PyExc_OSError);
        }
    }
    /* [S3] Announce, unless an earlier announcement still stands unanswered
     * (the writer answers it at its next commit). */
    uint32_t asked = LOAD32(e + R_SLEEP_SEQ, RELAXED);  /* our own word */
    /* Acquire: pairs with the writer's release store of wake_seq [P5]. */
    if (asked == LOAD32(e + R_WAKE_SEQ, ACQUIRE)) {
        STORE32(e + R_SLEEP_SEQ, asked + 1, RELAXED);
        /* Release: sleep_seq above is visible to a writer that sees this
         * increment; pairs with its acquire load of sleep_count [P5].  An
         * atomic read-modify-write: readers need no mutex among themselves. */
        atomic_fetch_add_explicit(A32(c + OFF_SLEEP_COUNT), 1, RELEASE);
    }
    /* [S4] StoreLoad, the reader's half of the Dekker handshake: our
     * announcement is visible before we re-read write_seq.  Pairs with the
     * writer's seq_cst fence after its commit [P5]: at least one of us sees
     * the other. */
    atomic_thread_fence(SEQ_CST);
    if (self->block) {
        post_owed(self);  /* after a fence: a writer waiting for us is seen now */
    }
    if (LOAD64(c + OFF_WRITE_SEQ, ACQUIRE) > self->cursor || !LOAD32(c + OFF_ACTIVE, ACQUIRE)) {
        /* The announcement stands: one spurious wake-up later, never a lost one. */
        return PyFloat_FromDouble(0.0);
    }
    Py_RETURN_NONE;
}

/* -- reading into a caller's buffer ---------------------------------------------------- */

PyDoc_STRVAR(read_into_doc,
"read_into(buffer) -> (seq, timestamp_ns, topic, nbytes) or None\n\n"
"Copy the next record of this reader's topics into `buffer` (any writable\n"
"buffer), as socket.recv_into does: nothing is allocated for the payload.\n"
"None: nothing new (the cursor may have moved past other topics' or lost\n"
"records).  A record longer than the buffer raises ValueError and stays\n"
"unread.");

/* (seq, timestamp_ns, topic, nbytes); NULL with an exception set.  Built by
 * hand: Py_BuildValue's format parsing cost more than the rest of the read. */
static PyObject *
into_row(uint64_t seq, uint64_t ts, uint32_t topic, uint32_t length)
{
    PyObject *row = PyTuple_New(4);
    if (row == NULL) {
        return NULL;
    }
    PyObject *items[4] = {PyLong_FromUnsignedLongLong(seq), PyLong_FromUnsignedLongLong(ts),
                          PyLong_FromUnsignedLong(topic), PyLong_FromUnsignedLong(length)};
    for (int i = 0; i < 4; i++) {
        if (items[i] == NULL) {
            for (int j = 0; j < 4; j++) {
                Py_XDECREF(items[j]);
            }
            Py_DECREF(row);
            return NULL;
        }
    }
    for (int i = 0; i < 4; i++) {
        PyTuple_SET_ITEM(row, i, items[i]);
    }
    return row;
}

/* At most this many records of other topics (or lost ones) are skipped in one call. */
#define READ_INTO_SKIP_MAX 4096

/* [R1]-[R5] for one record, copied into `dst`. */
static PyObject *
Reader_read_into(Reader *self, PyObject *arg)
{
    Py_buffer dst;
    if (PyObject_GetBuffer(arg, &dst, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        return NULL;
    }
    PyObject *result = NULL;
    if (self->c == NULL) {
        result = fail(self, ERR_CLOSED_READ, 0);
        goto done;
    }
    uint8_t *c = self->c;
    uint64_t cap = self->capacity;
    for (int skipped = 0; skipped < READ_INTO_SKIP_MAX; skipped++) {
        uint64_t cursor = self->cursor;
        /* [R1] Acquire: pairs with the writer's release store of write_seq [P4]. */
        uint64_t w = LOAD64(c + OFF_WRITE_SEQ, ACQUIRE);
        if (w <= cursor) {
            break;
        }
        if (!entry_is_ours(self)) {
            result = fail(self, ERR_EVICTED, 0);
            goto done;
        }
        /* Ordered after the write_seq load by its acquire. */
        uint64_t reserve = LOAD64(c + OFF_RESERVE_SEQ, RELAXED);
        /* [R2] */
        uint64_t s = cursor, lost = 0;
        if (reserve > cap && reserve - cap > cursor) {
            s = reserve - cap;
            lost = s - cursor;
        }
        if (self->hook != NULL) {
            PyObject *r = PyObject_CallFunction(self->hook, "KK", (unsigned long long)s,
                                                (unsigned long long)(s + 1));
            if (r == NULL) {
                goto done;
            }
            Py_DECREF(r);
            if (self->c == NULL) {
                result = fail(self, ERR_CLOSED_READ, 0);
                goto done;
            }
        }
        /* [R3] */
        slot_head hd;
        int valid = load_head(self, s, &hd);
        uint64_t seq = hd.seq, ts = hd.ts;
        uint32_t length = hd.length, topic = hd.topic;
        int wanted = valid && (self->topics >> topic & 1);
        int fits = (Py_ssize_t)length <= dst.len;
        if (wanted && fits) {
            /* The seqlock's data read (see _bus.h): trusted only after [R4]. */
            memcpy(dst.buf, self->r + hd.off + RECORD_HEADER_SIZE, length);
        }
        /* [R4] Acquire fence, pairs with [P2]'s release fence (see read_batch). */
        atomic_thread_fence(ACQUIRE);
        uint64_t again = LOAD64(c + OFF_RESERVE_SEQ, RELAXED);
        if (again > cap && s < again - cap) {
            /* Overwritten while we looked: lost, by position. */
            self->lost += lost + 1;
            self->cursor = s + 1;
            continue;
        }
        if (!valid) {
            result = fail(self, ERR_CORRUPT, s);
            goto done;
        }
        self->lost += lost;
        if (!wanted) {
            self->cursor = s + 1;
            continue;
        }
        if (!fits) {
            self->cursor = s;  /* the records before it were lost; this one stays */
            PyErr_Format(PyExc_ValueError,
                         "Failed to read record %llu since it has %u bytes and the buffer "
                         "holds %zd", (unsigned long long)s, length, dst.len);
            goto done;
        }
        /* [R5] as a one-record read_batch: the cursor may be left for later. */
        self->cursor = s + 1;
        self->delivered += 1;
        if (self->may_owe && !self->cursor_owed) {
            self->cursor_owed = 1;
        } else {
            publish_cursor(self);
        }
        result = into_row(seq, ts, topic, length);
        goto done;
    }
    /* Nothing delivered: publish a cursor that moved (or was owed). */
    if (self->cursor_owed || LOAD64(self->e + R_CURSOR, RELAXED) != self->cursor) {
        settle(self);
    }
    if (self->block) {
        post_owed(self);
    }
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&dst);
    return result;
}

/* -- spinning ------------------------------------------------------------------------ */

/* One pause in a busy-wait: tells the CPU (and an SMT sibling) we spin. */
static inline void
cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#else
    atomic_signal_fence(SEQ_CST);
#endif
}

/* The GIL is given back, and signals looked at, at least this often. */
#define SPIN_CHUNK_NS 1000000u
/* The clock (vDSO, no syscall) is read once per this many polls. */
#define SPIN_POLLS_PER_CLOCK 64

/* Whether records are committed past `cursor` or the writer went inactive.
 * Acquire: pairs with the writer's release stores of write_seq [P4] and of
 * active (Publisher.deactivate), as [S1]. */
static inline int
ready(const uint8_t *c, uint64_t cursor)
{
    return LOAD64(c + OFF_WRITE_SEQ, ACQUIRE) > cursor || !LOAD32(c + OFF_ACTIVE, ACQUIRE);
}

/* Poll until ready() or `until` (monotonic ns), pausing (or yielding) between
 * polls; called without the GIL, touching only the mapping we hold. */
static int
poll_until(const uint8_t *c, uint64_t cursor, uint64_t until, int yield)
{
    for (;;) {
        for (int i = 0; i < SPIN_POLLS_PER_CLOCK; i++) {
            if (ready(c, cursor)) {
                return 1;
            }
            if (yield) {
                sched_yield();
            } else {
                cpu_relax();
            }
        }
        if (shmd_monotonic_ns() >= until) {
            return ready(c, cursor);
        }
    }
}

static uint64_t
seconds_to_ns(double s)
{
    if (!(s > 0.0)) {
        return 0;
    }
    if (s >= 1e9 || isinf(s)) {
        return UINT64_MAX / 2;
    }
    return (uint64_t)(s * 1e9);
}

PyDoc_STRVAR(spin_doc,
"spin(spin_seconds, yield_seconds=0.0) -> bool\n\n"
"Busy-poll write_seq and active for spin_seconds (math.inf: until they\n"
"change), then poll with sched_yield() between polls for yield_seconds.\n"
"True: records are committed past the cursor, or the writer went inactive;\n"
"False: the time is up.  Announces nothing, so the writer writes no\n"
"eventfd for us.  The GIL is released meanwhile, and taken back every\n"
"millisecond to run signal handlers (an exception of theirs is raised).");

static PyObject *
Reader_spin(Reader *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "spin() takes spin_seconds and yield_seconds");
        return NULL;
    }
    double spin_s = PyFloat_AsDouble(args[0]);
    double yield_s = nargs > 1 ? PyFloat_AsDouble(args[1]) : 0.0;
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (isnan(spin_s) || isnan(yield_s) || spin_s < 0.0 || yield_s < 0.0) {
        PyErr_SetString(PyExc_ValueError, "Failed to spin since a time is negative or NaN");
        return NULL;
    }
    if (self->c == NULL) {
        return fail(self, ERR_CLOSED_SLEEP, 0);
    }
    if (self->held || self->cursor_owed) {
        settle(self);  /* a waiting reader must not hold the writer up */
    }
    if (self->block) {
        post_owed(self);
    }
    const uint8_t *c = self->c;
    uint64_t cursor = self->cursor;
    uint64_t now = shmd_monotonic_ns();
    uint64_t phase_end[2] = {now + seconds_to_ns(spin_s), 0};
    phase_end[1] = phase_end[0] + seconds_to_ns(yield_s);
    int got = ready(c, cursor);
    for (int phase = 0; phase < 2 && !got; phase++) {
        while (!got && now < phase_end[phase]) {
            uint64_t until = phase_end[phase] - now > SPIN_CHUNK_NS ? now + SPIN_CHUNK_NS
                                                                   : phase_end[phase];
            self->spinning = 1;
            Py_BEGIN_ALLOW_THREADS
            got = poll_until(c, cursor, until, phase);
            Py_END_ALLOW_THREADS
            self->spinning = 0;
            if (!got && PyErr_CheckSignals() < 0) {
                return NULL;
            }
            now = shmd_monotonic_ns();
        }
    }
    return PyBool_FromLong(got);
}

PyDoc_STRVAR(announce_doc,
"announce()\n\nStep [S3] alone: announce a sleep, without the drain and the re-check (tests).");

static PyObject *
Reader_announce(Reader *self, PyObject *Py_UNUSED(unused))
{
    if (self->c == NULL) {
        return fail(self, ERR_CLOSED_SLEEP, 0);
    }
    uint32_t asked = LOAD32(self->e + R_SLEEP_SEQ, RELAXED);
    STORE32(self->e + R_SLEEP_SEQ, asked + 1, RELAXED);
    atomic_fetch_add_explicit(A32(self->c + OFF_SLEEP_COUNT), 1, RELEASE);  /* as in [S3] */
    Py_RETURN_NONE;
}

PyDoc_STRVAR(settle_doc,
"settle()\n\nPublish a cursor a read left for later, or release held slots.");

static PyObject *
Reader_settle(Reader *self, PyObject *Py_UNUSED(unused))
{
    if (self->held || self->cursor_owed) {
        settle(self);
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(take_doc,
"take(taken, released=None)\n\n"
"A durable reader's two marks.  `taken`, stored in the entry, is the seq\n"
"after the last record handed to the application: what a new process of\n"
"this reader gets again below it is redelivered.  `released` publishes the\n"
"cursor up to there (at most the read cursor, and only while a hold read\n"
"holds: it never moves back): the application is done with every record\n"
"below it; those above stay held until release() or a sleep.\n"
"None publishes nothing.  Does nothing once the entry is not ours.");

/* [R5] with the cursor published at `pos` (below the read cursor: the rest
 * stays held), for take(). */
static void
publish_upto(Reader *self, uint64_t pos)
{
    self->cursor_owed = 0;
    if (!self->block) {
        store_entry(self, pos);
        return;
    }
    store_entry(self, self->nloans > 0 ? loans_floor(self, pos) : pos);
    /* As publish_blocking: no fence, the writer re-checks every 10 ms. */
    if (LOAD32(self->c + OFF_WRITER_WAITING, RELAXED)) {
        self->posted_at = pos;
        sem_post((sem_t *)(void *)(self->c + OFF_SEM));
    }
}

static PyObject *
Reader_take(Reader *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "take() takes taken and an optional released");
        return NULL;
    }
    unsigned long long taken = PyLong_AsUnsignedLongLong(args[0]);
    if (taken == (unsigned long long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    int release = nargs == 2 && args[1] != Py_None;
    unsigned long long released = 0;
    if (release) {
        released = PyLong_AsUnsignedLongLong(args[1]);
        if (released == (unsigned long long)-1 && PyErr_Occurred()) {
            return NULL;
        }
    }
    if (self->c == NULL) {
        return fail(self, ERR_CLOSED_READ, 0);
    }
    if (!entry_is_ours(self)) {
        /* Evicted (the next read says so): nothing is held through it. */
        self->held = self->cursor_owed = 0;
        loans_drop_all(self);
        Py_RETURN_NONE;
    }
    /* Relaxed: the writer reads it only after our connection closed (the
     * kernel's hang-up orders it after every store we made), to tell a new
     * process of ours what it gets again. */
    STORE64(self->e + R_TAKEN, taken, RELAXED);
    if (release) {
        if (released >= self->cursor) {
            publish_cursor(self);
        } else if (self->held) {
            /* Only while a hold read holds: below the cursor of a read that
             * published (or a resumed entry's, which the writer set) the
             * writer may already have counted the slots free (the block
             * policy caches its room), so the cursor never moves back. */
            publish_upto(self, released);
        }
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(set_totals_doc,
"set_totals(delivered, lost)\n\nContinue counting from these totals, stored in the entry too.");

static PyObject *
Reader_set_totals(Reader *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "set_totals() takes delivered and lost");
        return NULL;
    }
    unsigned long long d = PyLong_AsUnsignedLongLong(args[0]);
    unsigned long long l = PyLong_AsUnsignedLongLong(args[1]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (self->c == NULL) {
        return fail(self, ERR_CLOSED_READ, 0);
    }
    self->delivered = d;
    self->lost = l;
    STORE64(self->e + R_DELIVERED, d, RELAXED);  /* statistics */
    STORE64(self->e + R_LOST, l, RELAXED);
    Py_RETURN_NONE;
}

static PyObject *
Reader_close(Reader *self, PyObject *Py_UNUSED(unused))
{
    if (self->spinning) {
        /* That thread reads the mapping without the GIL: unmapping it now
         * would pull the memory from under it. */
        PyErr_SetString(PyExc_RuntimeError,
                        "Failed to close the reader since another thread is waiting in spin()");
        return NULL;
    }
    if (self->held || self->cursor_owed) {
        /* The writer's detach report counts every record we read; a slot a
         * live view holds stays held in the entry until the writer frees it. */
        settle(self);
    }
    loans_drop_all(self);  /* their views keep the mapping (not the slot) */
    self->c = self->r = self->e = NULL;
    shmd_views_release(&self->v);
    Py_CLEAR(self->ring_view);
    Py_RETURN_NONE;
}

/* -- attributes ------------------------------------------------------------------------ */

static PyObject *
Reader_get_cursor(Reader *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(self->cursor);
}

static PyObject *
Reader_get_delivered(Reader *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(self->delivered);
}

static PyObject *
Reader_get_lost(Reader *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(self->lost);
}

static PyObject *
Reader_get_topics(Reader *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(self->topics);
}

static PyObject *
Reader_get_pending(Reader *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->held || self->cursor_owed || self->nloans > 0);
}

static PyObject *
Reader_get_spinning(Reader *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->spinning);
}

static PyObject *
Reader_get_hook(Reader *self, void *Py_UNUSED(c))
{
    return Py_NewRef(self->hook != NULL ? self->hook : Py_None);
}

static int
Reader_set_hook(Reader *self, PyObject *value, void *Py_UNUSED(c))
{
    if (value == Py_None || value == NULL) {
        Py_CLEAR(self->hook);
        return 0;
    }
    if (!PyCallable_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "Failed to set the hook since it is not callable");
        return -1;
    }
    Py_INCREF(value);
    Py_XSETREF(self->hook, value);
    return 0;
}

static PyGetSetDef Reader_getset[] = {
    {"cursor", (getter)Reader_get_cursor, NULL, "The seq this reader reads next.", NULL},
    {"delivered", (getter)Reader_get_delivered, NULL, "Records delivered.", NULL},
    {"lost", (getter)Reader_get_lost, NULL, "Records overwritten before they were read.", NULL},
    {"topics", (getter)Reader_get_topics, NULL, "The subscription mask.", NULL},
    {"pending", (getter)Reader_get_pending, NULL,
     "A read left its cursor for later, or holds slots (a hold read, or a live view of one).",
     NULL},
    {"spinning", (getter)Reader_get_spinning, NULL,
     "A thread waits in spin() (without the GIL) right now.", NULL},
    {"hook", (getter)Reader_get_hook, (setter)Reader_set_hook,
     "Tests only: called as hook(start, end) between a read's plan and its copy.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef Reader_methods[] = {
    {"read_batch", (PyCFunction)(void (*)(void))Reader_read_batch, METH_FASTCALL | METH_KEYWORDS,
     read_batch_doc},
    {"prepare_sleep", (PyCFunction)Reader_prepare_sleep, METH_NOARGS, prepare_sleep_doc},
    {"read_into", (PyCFunction)Reader_read_into, METH_O, read_into_doc},
    {"spin", (PyCFunction)(void (*)(void))Reader_spin, METH_FASTCALL, spin_doc},
    {"announce", (PyCFunction)Reader_announce, METH_NOARGS, announce_doc},
    {"settle", (PyCFunction)Reader_settle, METH_NOARGS, settle_doc},
    {"take", (PyCFunction)(void (*)(void))Reader_take, METH_FASTCALL, take_doc},
    {"set_totals", (PyCFunction)(void (*)(void))Reader_set_totals, METH_FASTCALL, set_totals_doc},
    {"close", (PyCFunction)Reader_close, METH_NOARGS,
     "close()\n\nStore a cursor left for later, then release the segment's buffers."},
    {NULL, NULL, 0, NULL},
};

PyTypeObject shmd_ReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmd._sys._core.Reader",
    .tp_doc = "A reader's hot path: reading and announcing sleep (shmd/_sys/_reader.c).",
    .tp_basicsize = sizeof(Reader),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Reader_init,
    .tp_dealloc = (destructor)Reader_dealloc,
    .tp_traverse = (traverseproc)Reader_traverse,
    .tp_clear = (inquiry)Reader_clear,
    .tp_methods = Reader_methods,
    .tp_getset = Reader_getset,
};
