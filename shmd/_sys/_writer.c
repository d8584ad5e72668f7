/*
 * _core.Writer: the writer's hot path, publishing and waking
 * (docs/PROTOCOL.md "Publishing"; the labels [P1]..[P6] are its steps).
 *
 * shmd.bus.publisher.Publisher owns one and keeps everything that is not
 * per record in Python: the reader table, the block policy's wait for
 * space, evictions, closing.  The contract:
 *
 * - publish() is the Publisher's publish itself (bound on the instance:
 *   no Python frame per record).  Whatever it cannot do alone (a closed
 *   writer, a payload too big, a topic out of range, the block policy out
 *   of known room) goes to the `slow` callable, which raises the error a
 *   user reads or makes room and calls publish() again.
 * - The wake table (set_readers) names eventfds by number; Python rebuilds
 *   it before it closes any of them, so we never write a number that now
 *   names something else.
 * - reserve() and reserve_batch() are the Publisher's own too: they hand out
 *   a Reservation (below) over slots the caller fills in place, or go to
 *   `reserve_slow` the same way publish() goes to `slow`.
 * - An eventfd found without O_NONBLOCK (a reader cleared it on the file
 *   description it shares with us) goes to `on_blocking` before we write
 *   it, which logs and restores the flag: a writer must never block on a
 *   reader's counter.
 */
#include "_bus.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

typedef struct {
    size_t entry;    /* byte offset of the reader's entry in the control part */
    uint64_t topics; /* its subscription mask */
    int fd;          /* its eventfd (owned by the Python ReaderHandle) */
} wake_row;

typedef struct {
    PyObject_HEAD
    shmd_views v;
    uint8_t *c, *r;  /* control part, ring (NULL once closed) */
    uint64_t mask, slot, max_payload, capacity;
    uint64_t seq;        /* the next seq; equals the write_seq we stored */
    uint64_t reserved;   /* the highest reserve_seq we stored: it never goes down */
    uint64_t room_until; /* block policy: seqs below it are free for every reader */
    uint32_t sleep_seen; /* sleep_count at our last look at the entries */
    int sleep_seen_valid;
    wake_row *rows;
    Py_ssize_t nrows;
    Py_ssize_t *waiting; /* rows seen asleep for topics no commit since carried */
    Py_ssize_t nwaiting;
    PyObject *ring_view;   /* a writable memoryview of the ring: reservations slice it */
    PyObject *slow;        /* slow(payload, topic) -> seq */
    PyObject *reserve_slow; /* reserve_slow(count, size, topic) -> Reservation */
    PyObject *on_blocking; /* on_blocking(row) : a reader's eventfd lost O_NONBLOCK */
} Writer;

/* -- construction ------------------------------------------------------------ */

static int
Writer_init(Writer *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"control", "ring", "capacity", "slot_size", "write_seq",
                             "reserve_seq", "slow", "reserve_slow", "on_blocking", NULL};
    PyObject *control, *ring, *slow, *reserve_slow, *on_blocking;
    unsigned long long capacity, slot, seq, reserved;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOKKKKOOO", kwlist, &control, &ring,
                                     &capacity, &slot, &seq, &reserved, &slow, &reserve_slow,
                                     &on_blocking)) {
        return -1;
    }
    if (self->c != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Failed to initialise the writer since it was already");
        return -1;
    }
    if (capacity == 0 || (capacity & (capacity - 1)) != 0 || slot <= RECORD_HEADER_SIZE
        || slot % 8 != 0 || reserved < seq || reserved - seq > capacity) {
        PyErr_SetString(PyExc_ValueError, "Failed to make the writer since its geometry is invalid");
        return -1;
    }
    if (!PyCallable_Check(slow) || !PyCallable_Check(reserve_slow)
        || !PyCallable_Check(on_blocking)) {
        PyErr_SetString(PyExc_TypeError, "Failed to make the writer since a callback is not callable");
        return -1;
    }
    if (shmd_views_take(&self->v, control, ring, 1, OFF_READERS,
                        (Py_ssize_t)(capacity * slot)) < 0) {
        return -1;
    }
    /* Slices of this view are the reservations' buffers: each keeps the
     * mapping's export alive, so the ring cannot be unmapped under a caller
     * still writing into one (Segment.close leaves the munmap to the GC). */
    PyObject *ring_view = PyMemoryView_FromObject(ring);
    if (ring_view == NULL) {
        shmd_views_release(&self->v);
        return -1;
    }
    Py_XSETREF(self->ring_view, ring_view);
    self->c = self->v.ctl.buf;
    self->r = self->v.ring.buf;
    self->capacity = capacity;
    self->mask = capacity - 1;
    self->slot = slot;
    self->max_payload = slot - RECORD_HEADER_SIZE;
    self->seq = seq;
    self->reserved = reserved;
    self->room_until = UINT64_MAX;
    self->sleep_seen_valid = 0;
    Py_INCREF(slow);
    Py_XSETREF(self->slow, slow);
    Py_INCREF(reserve_slow);
    Py_XSETREF(self->reserve_slow, reserve_slow);
    Py_INCREF(on_blocking);
    Py_XSETREF(self->on_blocking, on_blocking);
    return 0;
}

static void
release_rows(Writer *self)
{
    PyMem_Free(self->rows);
    PyMem_Free(self->waiting);
    self->rows = NULL;
    self->waiting = NULL;
    self->nrows = self->nwaiting = 0;
}

static int
Writer_traverse(Writer *self, visitproc visit, void *arg)
{
    Py_VISIT(self->ring_view);
    Py_VISIT(self->slow);
    Py_VISIT(self->reserve_slow);
    Py_VISIT(self->on_blocking);
    return 0;
}

static int
Writer_clear(Writer *self)
{
    Py_CLEAR(self->ring_view);
    Py_CLEAR(self->slow);
    Py_CLEAR(self->reserve_slow);
    Py_CLEAR(self->on_blocking);
    return 0;
}

static void
Writer_dealloc(Writer *self)
{
    PyObject_GC_UnTrack(self);
    shmd_views_release(&self->v);
    release_rows(self);
    Writer_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Writer_close(Writer *self, PyObject *Py_UNUSED(unused))
{
    /* Every later publish() sees c == NULL and goes to the slow path, which
     * raises SegmentClosed; the rows name eventfds Python is about to close. */
    self->c = self->r = NULL;
    release_rows(self);
    shmd_views_release(&self->v);
    Py_CLEAR(self->ring_view);  /* reservations' slices keep the mapping until they go */
    Py_RETURN_NONE;
}

/* -- the wake table ------------------------------------------------------------ */

PyDoc_STRVAR(set_readers_doc,
"set_readers(rows)\n\n"
"The attached readers as (entry index, topics, eventfd) rows; the next\n"
"commit looks at every entry.  Call it before closing any eventfd.");

static PyObject *
Writer_set_readers(Writer *self, PyObject *rows)
{
    PyObject *seq = PySequence_Fast(rows, "Failed to set the readers since rows is not a sequence");
    if (seq == NULL) {
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    wake_row *fresh = PyMem_Calloc(n ? (size_t)n : 1, sizeof(wake_row));
    Py_ssize_t *waiting = PyMem_Calloc(n ? (size_t)n : 1, sizeof(Py_ssize_t));
    if (fresh == NULL || waiting == NULL) {
        PyMem_Free(fresh);
        PyMem_Free(waiting);
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned int index;
        unsigned long long topics;
        int fd;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "IKi", &index, &topics, &fd)) {
            PyMem_Free(fresh);
            PyMem_Free(waiting);
            Py_DECREF(seq);
            return NULL;
        }
        fresh[i].entry = OFF_READERS + (size_t)index * READER_ENTRY_SIZE;
        fresh[i].topics = topics;
        fresh[i].fd = fd;
    }
    Py_DECREF(seq);
    release_rows(self);
    self->rows = fresh;
    self->waiting = waiting;
    self->nrows = n;
    /* Whoever was waiting for a topic is found again at the next look. */
    self->sleep_seen_valid = 0;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(forget_sleepers_doc,
"forget_sleepers()\n\nMake the next commit look at every entry (after an adoption).");

static PyObject *
Writer_forget_sleepers(Writer *self, PyObject *Py_UNUSED(unused))
{
    self->sleep_seen_valid = 0;
    self->nwaiting = 0;
    Py_RETURN_NONE;
}

/* Write 1 to a reader's eventfd.  0, or -1 with an exception set. */
static int
write_eventfd(Writer *self, Py_ssize_t row)
{
    int fd = self->rows[row].fd;
    /* File status flags belong to the open file description, which the
     * reader's copy of this eventfd shares: a reader can clear O_NONBLOCK
     * under us, and with its counter near 2^64 our write() would block. */
    int flags = fcntl(fd, F_GETFL);
    if (flags >= 0 && !(flags & O_NONBLOCK)) {
        PyObject *r = PyObject_CallFunction(self->on_blocking, "n", row);
        if (r == NULL) {
            return -1;
        }
        Py_DECREF(r);
        if (self->rows == NULL) {
            return 0;  /* the callback closed us (it must not; be safe) */
        }
    }
    uint64_t one = 1;
    if (write(fd, &one, sizeof one) < 0 && errno != EAGAIN) {
        /* EAGAIN: the counter is saturated, and the reader wakes anyway. */
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

/* [P5] writer_wake: answer every sleep announcement of a reader subscribed
 * to `topics`.  Runs right after the commit's release store of write_seq.
 * 0, or -1 with an exception set (an eventfd write failed). */
static int
writer_wake(Writer *self, uint64_t topics)
{
    /* StoreLoad, the writer's half of the Dekker handshake: our write_seq
     * store must be visible before we load sleep_count, or a reader going to
     * sleep now and we could miss each other (it sees the old write_seq, we
     * no new announcement).  Pairs with the reader's seq_cst fence in [S4]
     * (_reader.c, reader_prepare_sleep). */
    atomic_thread_fence(SEQ_CST);
    /* Acquire: pairs with the reader's release fetch_add of sleep_count in
     * [S3], so the sleep_seq it stored before is visible below. */
    uint32_t count = LOAD32(self->c + OFF_SLEEP_COUNT, ACQUIRE);
    if (self->sleep_seen_valid && count == self->sleep_seen && self->nwaiting == 0) {
        return 0;  /* nobody announced since our last look: everyone is awake */
    }
    uint8_t *c = self->c;
    Py_ssize_t n, kept = 0;
    int all = !self->sleep_seen_valid || count != self->sleep_seen;
    if (all) {
        /* Loaded before the entries: an announcement made after this load
         * moves sleep_count again, and the next commit sees it. */
        self->sleep_seen = count;
        self->sleep_seen_valid = 1;
        n = self->nrows;
    } else {
        n = self->nwaiting;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        Py_ssize_t i = all ? k : self->waiting[k];
        uint8_t *e = c + self->rows[i].entry;
        uint32_t asked = LOAD32(e + R_SLEEP_SEQ, RELAXED);   /* ordered by the acquire above */
        if (asked == LOAD32(e + R_WAKE_SEQ, RELAXED)) {       /* our own word */
            continue;
        }
        if (!(self->rows[i].topics & topics)) {
            self->waiting[kept++] = i;  /* asleep for another topic: look again next commit */
            continue;
        }
        /* Release: pairs with the reader's acquire load of wake_seq in [S3];
         * the eventfd write after it is a syscall, a full barrier anyway. */
        STORE32(e + R_WAKE_SEQ, asked, RELEASE);
        if (write_eventfd(self, i) < 0) {
            self->nwaiting = 0;
            self->sleep_seen_valid = 0;  /* look at everyone next time */
            return -1;
        }
        if (self->rows == NULL) {
            return 0;
        }
    }
    self->nwaiting = kept;
    return 0;
}

/* -- publishing ------------------------------------------------------------------ */

/* [P2] Raise reserve_seq to `end`, never lower it (a dead or abandoning
 * writer's reserve stands: docs/PROTOCOL.md), visible before any slot store. */
static inline void
reserve_to(Writer *self, uint64_t end)
{
    if (end > self->reserved) {
        self->reserved = end;
        STORE64(self->c + OFF_RESERVE_SEQ, end, RELAXED);
        /* Release fence: the reserve store above is ordered before the slot
         * stores below, for a reader that sees any of them: pairs with the
         * acquire fence before its re-read of reserve_seq in [R4]. */
        atomic_thread_fence(RELEASE);
    }
}

/* [P3] One slot: the header's words (relaxed: the commit orders them), then
 * the payload (memcpy: the seqlock's data, see _bus.h). */
static inline void
write_slot(Writer *self, uint64_t seq, uint64_t ts, const void *payload, uint32_t length,
           uint32_t topic)
{
    uint8_t *s = self->r + (seq & self->mask) * self->slot;
    STORE64(s + REC_SEQ, seq, RELAXED);
    STORE64(s + REC_TIMESTAMP, ts, RELAXED);
    STORE32(s + REC_LENGTH, length, RELAXED);
    STORE32(s + REC_TOPIC, topic, RELAXED);
    STORE32(s + REC_FLAGS, 0, RELAXED);
    STORE32(s + REC_RESERVED, 0, RELAXED);
    if (payload != NULL) {
        memcpy(s + RECORD_HEADER_SIZE, payload, length);
    }
}

/* [P4] and [P6]: the commit, the wake-ups, the statistics.  0 or -1. */
static int
commit(Writer *self, uint64_t end, uint64_t nbytes, uint64_t topics)
{
    /* Release: the slots before it; pairs with the reader's acquire load of
     * write_seq in [R1] (and in the sleep re-check [S4]). */
    STORE64(self->c + OFF_WRITE_SEQ, end, RELEASE);
    self->seq = end;
    int rc = writer_wake(self, topics);
    /* Statistics, after the wake-ups; the writer is its only writer. */
    uint64_t bytes = LOAD64(self->c + OFF_BYTES_PUBLISHED, RELAXED);
    STORE64(self->c + OFF_BYTES_PUBLISHED, bytes + nbytes, RELAXED);
    return rc;
}

/* publish(payload, topic=0): the topic as a C long, or -2 with TypeError set. */
static int
parse_publish_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, long *topic,
                   PyObject **topic_obj)
{
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    *topic_obj = NULL;
    if (nargs == 2 && nkw == 0) {
        *topic_obj = args[1];
    } else if (nargs == 1 && nkw == 1
               && PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "topic") == 0) {
        *topic_obj = args[1];
    } else if (!(nargs == 1 && nkw == 0)) {
        PyErr_SetString(PyExc_TypeError, "publish() takes a payload and an optional topic");
        return -1;
    }
    *topic = 0;
    if (*topic_obj != NULL) {
        if (!PyLong_Check(*topic_obj)) {
            PyErr_Format(PyExc_TypeError,
                         "Failed to publish since the topic is %.100s, not an int",
                         Py_TYPE(*topic_obj)->tp_name);
            return -1;
        }
        int overflow;
        *topic = PyLong_AsLongAndOverflow(*topic_obj, &overflow);
        if (overflow) {
            *topic = -1;  /* out of range: the slow path says so */
        }
    }
    return 0;
}

PyDoc_STRVAR(publish_doc,
"publish(payload, topic=0) -> seq\n\nPublish one record (docs/PROTOCOL.md, Publishing).");

static PyObject *
Writer_publish(Writer *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    long topic;
    PyObject *topic_obj;
    if (parse_publish_args(args, nargs, kwnames, &topic, &topic_obj) < 0) {
        return NULL;
    }
    PyObject *payload = args[0];
    Py_buffer view = {0};
    const char *data;
    Py_ssize_t length;
    if (PyBytes_CheckExact(payload)) {
        data = PyBytes_AS_STRING(payload);
        length = PyBytes_GET_SIZE(payload);
    } else {
        if (PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE) < 0) {
            return NULL;
        }
        data = view.buf;
        length = view.len;
    }
    uint64_t seq = self->seq;
    /* [P1] One comparison chain sends everything unusual to Python. */
    if (self->c == NULL || (uint64_t)length > self->max_payload || topic < 0 || topic > TOPIC_MAX
        || seq >= self->room_until) {
        if (view.obj != NULL) {
            PyBuffer_Release(&view);
        }
        PyObject *t = topic_obj != NULL ? topic_obj : PyLong_FromLong(0);
        if (t == NULL) {
            return NULL;
        }
        PyObject *r = PyObject_CallFunctionObjArgs(self->slow, payload, t, NULL);
        if (topic_obj == NULL) {
            Py_DECREF(t);
        }
        return r;
    }
    reserve_to(self, seq + 1);                                              /* [P2] */
    write_slot(self, seq, shmd_monotonic_ns(), data, (uint32_t)length, (uint32_t)topic); /* [P3] */
    if (view.obj != NULL) {
        PyBuffer_Release(&view);
    }
    if (commit(self, seq + 1, (uint64_t)length, (uint64_t)1 << topic) < 0) { /* [P4]-[P6] */
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(seq);
}

PyDoc_STRVAR(write_batch_doc,
"write_batch(payloads, topic) -> last seq\n\n"
"Publish records with one commit.  The caller has checked every length, the\n"
"topic, that len(payloads) <= capacity and (block policy) the room.");

static PyObject *
Writer_write_batch(Writer *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "write_batch() takes payloads and a topic");
        return NULL;
    }
    long topic = PyLong_AsLong(args[1]);
    if (topic == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (self->c == NULL) {
        PyErr_SetString(PyExc_ValueError, "Failed to publish since the writer was closed");
        return NULL;
    }
    PyObject *seq_obj = PySequence_Fast(args[0], "Failed to publish since payloads is not a sequence");
    if (seq_obj == NULL) {
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq_obj);
    if (topic < 0 || topic > TOPIC_MAX || (uint64_t)n > self->capacity) {
        Py_DECREF(seq_obj);
        PyErr_SetString(PyExc_ValueError, "Failed to publish since the batch was not checked");
        return NULL;
    }
    /* Every buffer first: a payload that is not one fails before any store. */
    Py_buffer *views = PyMem_Calloc(n ? (size_t)n : 1, sizeof(Py_buffer));
    if (views == NULL) {
        Py_DECREF(seq_obj);
        return PyErr_NoMemory();
    }
    Py_ssize_t got = 0;
    uint64_t nbytes = 0;
    PyObject *result = NULL;
    for (; got < n; got++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq_obj, got), &views[got], PyBUF_SIMPLE)
            < 0) {
            goto done;
        }
        if ((uint64_t)views[got].len > self->max_payload) {
            got++;
            PyErr_SetString(PyExc_ValueError, "Failed to publish since a payload was not checked");
            goto done;
        }
        nbytes += (uint64_t)views[got].len;
    }
    uint64_t seq = self->seq;
    reserve_to(self, seq + (uint64_t)n);                                    /* [P2] */
    uint64_t ts = shmd_monotonic_ns();
    for (Py_ssize_t i = 0; i < n; i++) {                                    /* [P3] */
        write_slot(self, seq + (uint64_t)i, ts, views[i].buf, (uint32_t)views[i].len,
                   (uint32_t)topic);
    }
    if (n > 0 && commit(self, seq + (uint64_t)n, nbytes, (uint64_t)1 << topic) < 0) {
        goto done;
    }
    result = PyLong_FromLongLong((long long)self->seq - 1);
done:
    for (Py_ssize_t i = 0; i < got; i++) {
        PyBuffer_Release(&views[i]);
    }
    PyMem_Free(views);
    Py_DECREF(seq_obj);
    return result;
}

/* -- reservations: slots the caller fills in place ----------------------------- */

/* A Reservation's life: open until commit() or abandon(), never again after. */
enum { RES_OPEN, RES_COMMITTED, RES_ABANDONED };

typedef struct {
    PyObject_HEAD
    Writer *writer;     /* the writer it commits through (a strong reference) */
    PyObject *buffers;  /* list: one writable memoryview per slot, released on commit */
    uint64_t seq;       /* the first slot's seq */
    uint64_t count;
    uint64_t size;      /* bytes reserved per slot */
    uint32_t topic;
    int state;
} Reservation;

static PyObject *str_release; /* "release", interned by shmd_writer_init */

/* reserve(size, topic=0) and reserve_batch(count, size, topic=0): the
 * arguments (`fixed` of them before the topic) as objects, or -1 with
 * TypeError set.  *topic_obj is NULL when the topic was left out. */
static int
parse_reserve_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, Py_ssize_t fixed,
                   PyObject **topic_obj)
{
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    *topic_obj = NULL;
    if (nargs == fixed + 1 && nkw == 0) {
        *topic_obj = args[fixed];
    } else if (nargs == fixed && nkw == 1
               && PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "topic") == 0) {
        *topic_obj = args[fixed];
    } else if (!(nargs == fixed && nkw == 0)) {
        PyErr_SetString(PyExc_TypeError, fixed == 1
                        ? "reserve() takes a size and an optional topic"
                        : "reserve_batch() takes a count, a size and an optional topic");
        return -1;
    }
    return 0;
}

/* An int argument as a long long (-1 when out of range: the slow path says
 * why), or -1 with TypeError set when it is not an int. */
static int
int_arg(PyObject *o, const char *what, long long *out)
{
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "Failed to reserve since the %s is %.100s, not an int",
                     what, Py_TYPE(o)->tp_name);
        return -1;
    }
    int overflow;
    *out = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow) {
        *out = -1;
    }
    return 0;
}

/* The Reservation of `count` slots of `size` bytes from the next seq, after
 * the fast path's checks; NULL with an exception set, having reserved nothing. */
static PyObject *
make_reservation(Writer *self, uint64_t count, uint64_t size, uint32_t topic)
{
    uint64_t seq = self->seq;
    PyObject *buffers = PyList_New((Py_ssize_t)count);
    if (buffers == NULL) {
        return NULL;
    }
    for (uint64_t i = 0; i < count; i++) {
        Py_ssize_t off = (Py_ssize_t)(((seq + i) & self->mask) * self->slot + RECORD_HEADER_SIZE);
        PyObject *view = PySequence_GetSlice(self->ring_view, off, off + (Py_ssize_t)size);
        if (view == NULL) {
            Py_DECREF(buffers);
            return NULL;
        }
        PyList_SET_ITEM(buffers, (Py_ssize_t)i, view);
    }
    Reservation *res = PyObject_GC_New(Reservation, &shmd_ReservationType);
    if (res == NULL) {
        Py_DECREF(buffers);
        return NULL;
    }
    Py_INCREF(self);
    res->writer = self;
    res->buffers = buffers;
    res->seq = seq;
    res->count = count;
    res->size = size;
    res->topic = topic;
    res->state = RES_OPEN;
    PyObject_GC_Track(res);
    reserve_to(self, seq + count);  /* [P2], last: a failure above reserved nothing */
    return (PyObject *)res;
}

/* Both reserve methods; `count_obj` NULL means one slot. */
static PyObject *
writer_reserve(Writer *self, PyObject *count_obj, PyObject *size_obj, PyObject *topic_obj)
{
    long long count = 1, size, topic = 0;
    if ((count_obj != NULL && int_arg(count_obj, "count", &count) < 0)
        || int_arg(size_obj, "size", &size) < 0
        || (topic_obj != NULL && int_arg(topic_obj, "topic", &topic) < 0)) {
        return NULL;
    }
    /* [P1] One comparison chain sends everything unusual to Python. */
    if (self->c == NULL || count < 1 || (uint64_t)count > self->capacity || size < 0
        || (uint64_t)size > self->max_payload || topic < 0 || topic > TOPIC_MAX
        || self->seq + (uint64_t)count > self->room_until) {
        PyObject *c = count_obj != NULL ? count_obj : PyLong_FromLong(1);
        PyObject *t = topic_obj != NULL ? topic_obj : PyLong_FromLong(0);
        PyObject *r = NULL;
        if (c != NULL && t != NULL) {
            r = PyObject_CallFunctionObjArgs(self->reserve_slow, c, size_obj, t, NULL);
        }
        if (count_obj == NULL) {
            Py_XDECREF(c);
        }
        if (topic_obj == NULL) {
            Py_XDECREF(t);
        }
        return r;
    }
    return make_reservation(self, (uint64_t)count, (uint64_t)size, (uint32_t)topic);
}

PyDoc_STRVAR(reserve_doc,
"reserve(size, topic=0) -> Reservation\n\n"
"One slot's payload buffer to fill in place (docs/PROTOCOL.md, Publishing).");

static PyObject *
Writer_reserve(Writer *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *topic_obj;
    if (parse_reserve_args(args, nargs, kwnames, 1, &topic_obj) < 0) {
        return NULL;
    }
    return writer_reserve(self, NULL, args[0], topic_obj);
}

PyDoc_STRVAR(reserve_batch_doc,
"reserve_batch(count, size, topic=0) -> Reservation\n\n"
"count consecutive slots' payload buffers, committed together.");

static PyObject *
Writer_reserve_batch(Writer *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *topic_obj;
    if (parse_reserve_args(args, nargs, kwnames, 2, &topic_obj) < 0) {
        return NULL;
    }
    return writer_reserve(self, args[0], args[1], topic_obj);
}

/* Release every buffer of the reservation (the caller can no longer write
 * into a slot it gave up); 0, or -1 with BufferError set when one is still
 * exported (a numpy array over it, say): nothing is committed then. */
static int
release_buffers(Reservation *self)
{
    Py_ssize_t n = PyList_GET_SIZE(self->buffers);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *r = PyObject_CallMethodNoArgs(PyList_GET_ITEM(self->buffers, i), str_release);
        if (r == NULL) {
            return -1;
        }
        Py_DECREF(r);
    }
    return 0;
}

static const char *
state_word(int state)
{
    return state == RES_COMMITTED ? "committed" : "abandoned";
}

PyDoc_STRVAR(commit_doc,
"commit(length=None) -> int\n\n"
"Publish every slot with its first length bytes (default: all); the last seq.");

static PyObject *
Reservation_commit(Reservation *self, PyObject *const *args, Py_ssize_t nargs,
                   PyObject *kwnames)
{
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    PyObject *length_obj = NULL;
    if (nargs == 1 && nkw == 0) {
        length_obj = args[0];
    } else if (nargs == 0 && nkw == 1
               && PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "length") == 0) {
        length_obj = args[0];
    } else if (nargs + nkw != 0) {
        PyErr_SetString(PyExc_TypeError, "commit() takes an optional length");
        return NULL;
    }
    if (self->state != RES_OPEN) {
        PyErr_Format(PyExc_ValueError, "Failed to commit the reservation since it was already %s",
                     state_word(self->state));
        return NULL;
    }
    uint64_t length = self->size;
    if (length_obj != NULL && length_obj != Py_None) {
        long long v;
        if (int_arg(length_obj, "length", &v) < 0) {
            return NULL;
        }
        if (v < 0 || (uint64_t)v > self->size) {
            PyErr_Format(PyExc_ValueError, "Failed to commit %S bytes since %llu were reserved",
                         length_obj, (unsigned long long)self->size);
            return NULL;
        }
        length = (uint64_t)v;
    }
    Writer *w = self->writer;
    if (w->c == NULL) {
        PyErr_SetString(PyExc_ValueError, "Failed to commit since the writer was closed");
        return NULL;
    }
    if (self->seq != w->seq) {
        PyErr_Format(PyExc_ValueError,
                     "Failed to commit the reservation of seq %llu since seq %llu was published "
                     "after it was made",
                     (unsigned long long)self->seq, (unsigned long long)w->seq - 1);
        return NULL;
    }
    if (release_buffers(self) < 0) {
        return NULL;
    }
    self->state = RES_COMMITTED;
    uint64_t ts = shmd_monotonic_ns();
    for (uint64_t s = self->seq; s < self->seq + self->count; s++) {        /* [P3] */
        write_slot(w, s, ts, NULL, (uint32_t)length, self->topic);
    }
    if (commit(w, self->seq + self->count, length * self->count, (uint64_t)1 << self->topic) < 0) {
        return NULL;  /* [P4]-[P6]: committed; an eventfd write failed */
    }
    return PyLong_FromUnsignedLongLong(self->seq + self->count - 1);
}

PyDoc_STRVAR(abandon_doc,
"abandon()\n\n"
"Give the slots back without publishing; the next publish reuses them.\n"
"reserve_seq stays up (see shmd.bus.adopt.take_over): the caller may have\n"
"written into a slot a lagging reader was copying.");

static PyObject *
Reservation_abandon(Reservation *self, PyObject *Py_UNUSED(unused))
{
    if (self->state == RES_OPEN) {
        if (release_buffers(self) < 0) {
            return NULL;
        }
        self->state = RES_ABANDONED;
    }
    Py_RETURN_NONE;
}

static PyObject *
Reservation_enter(Reservation *self, PyObject *Py_UNUSED(unused))
{
    PyObject *first = PyList_GET_ITEM(self->buffers, 0);
    Py_INCREF(first);
    return first;
}

static PyObject *
Reservation_exit(Reservation *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "__exit__() takes 3 arguments");
        return NULL;
    }
    PyObject *r;
    if (args[0] != Py_None) {
        r = Reservation_abandon(self, NULL);  /* an exception: nothing is published */
    } else if (self->state == RES_OPEN) {
        r = Reservation_commit(self, NULL, 0, NULL);
    } else {
        r = Py_NewRef(Py_None);
    }
    if (r == NULL) {
        return NULL;
    }
    Py_DECREF(r);
    Py_RETURN_FALSE;
}

static int
Reservation_traverse(Reservation *self, visitproc visit, void *arg)
{
    Py_VISIT(self->writer);
    Py_VISIT(self->buffers);
    return 0;
}

static int
Reservation_clear(Reservation *self)
{
    Py_CLEAR(self->writer);
    Py_CLEAR(self->buffers);
    return 0;
}

static void
Reservation_dealloc(Reservation *self)
{
    /* Dropped open: its slots are reused by the next publish, as if abandoned. */
    PyObject_GC_UnTrack(self);
    Reservation_clear(self);
    PyObject_GC_Del(self);
}

static PyObject *
Reservation_get_seq(Reservation *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(self->seq);
}

static PyObject *
Reservation_get_topic(Reservation *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLong(self->topic);
}

static PyObject *
Reservation_get_buffers(Reservation *self, void *Py_UNUSED(c))
{
    return PyList_GetSlice(self->buffers, 0, PyList_GET_SIZE(self->buffers));
}

static PyObject *
Reservation_get_buffer(Reservation *self, void *Py_UNUSED(c))
{
    return Reservation_enter(self, NULL);
}

static PyGetSetDef Reservation_getset[] = {
    {"seq", (getter)Reservation_get_seq, NULL, "The first slot's seq.", NULL},
    {"topic", (getter)Reservation_get_topic, NULL, "The topic every slot is committed with.",
     NULL},
    {"buffers", (getter)Reservation_get_buffers, NULL,
     "One writable payload buffer per slot, in seq order (released on commit).", NULL},
    {"buffer", (getter)Reservation_get_buffer, NULL, "The first slot's payload buffer.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef Reservation_methods[] = {
    {"commit", (PyCFunction)(void (*)(void))Reservation_commit, METH_FASTCALL | METH_KEYWORDS,
     commit_doc},
    {"abandon", (PyCFunction)Reservation_abandon, METH_NOARGS, abandon_doc},
    {"__enter__", (PyCFunction)Reservation_enter, METH_NOARGS,
     "__enter__() -> the first slot's buffer."},
    {"__exit__", (PyCFunction)(void (*)(void))Reservation_exit, METH_FASTCALL,
     "__exit__(type, value, traceback)\n\nCommit every slot whole on a clean exit; abandon on "
     "an exception."},
    {NULL, NULL, 0, NULL},
};

PyTypeObject shmd_ReservationType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmd._sys._core.Reservation",
    .tp_doc = "Slots reserved by Publisher.reserve (one) or reserve_batch: fill buffers in "
              "place, then commit (shmd/_sys/_writer.c).",
    .tp_basicsize = sizeof(Reservation),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_dealloc = (destructor)Reservation_dealloc,
    .tp_traverse = (traverseproc)Reservation_traverse,
    .tp_clear = (inquiry)Reservation_clear,
    .tp_methods = Reservation_methods,
    .tp_getset = Reservation_getset,
};

int
shmd_writer_init(void)
{
    str_release = PyUnicode_InternFromString("release");
    return str_release == NULL ? -1 : 0;
}

/* -- attributes -------------------------------------------------------------------- */

static PyObject *
get_u64(uint64_t v)
{
    return PyLong_FromUnsignedLongLong(v);
}

static int
set_u64(uint64_t *field, PyObject *value)
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "Failed to delete since the attribute is required");
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(value);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        return -1;
    }
    *field = v;
    return 0;
}

static PyObject *
Writer_get_seq(Writer *self, void *Py_UNUSED(c))
{
    return get_u64(self->seq);
}

static PyObject *
Writer_get_reserved(Writer *self, void *Py_UNUSED(c))
{
    return get_u64(self->reserved);
}

static PyObject *
Writer_get_room_until(Writer *self, void *Py_UNUSED(c))
{
    return get_u64(self->room_until);
}

static int
Writer_set_room_until(Writer *self, PyObject *value, void *Py_UNUSED(c))
{
    return set_u64(&self->room_until, value);
}

static PyObject *
Writer_get_closed(Writer *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->c == NULL);
}

static PyGetSetDef Writer_getset[] = {
    {"seq", (getter)Writer_get_seq, NULL, "The next seq (the write_seq stored).", NULL},
    {"reserved", (getter)Writer_get_reserved, NULL, "The highest reserve_seq stored.", NULL},
    {"room_until", (getter)Writer_get_room_until, (setter)Writer_set_room_until,
     "Block policy: seqs below it are known free for every reader.", NULL},
    {"closed", (getter)Writer_get_closed, NULL, "True once close() ran.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef Writer_methods[] = {
    {"publish", (PyCFunction)(void (*)(void))Writer_publish, METH_FASTCALL | METH_KEYWORDS,
     publish_doc},
    {"write_batch", (PyCFunction)(void (*)(void))Writer_write_batch, METH_FASTCALL,
     write_batch_doc},
    {"reserve", (PyCFunction)(void (*)(void))Writer_reserve, METH_FASTCALL | METH_KEYWORDS,
     reserve_doc},
    {"reserve_batch", (PyCFunction)(void (*)(void))Writer_reserve_batch,
     METH_FASTCALL | METH_KEYWORDS, reserve_batch_doc},
    {"set_readers", (PyCFunction)Writer_set_readers, METH_O, set_readers_doc},
    {"forget_sleepers", (PyCFunction)Writer_forget_sleepers, METH_NOARGS, forget_sleepers_doc},
    {"close", (PyCFunction)Writer_close, METH_NOARGS, "close()\n\nRelease the segment's buffers."},
    {NULL, NULL, 0, NULL},
};

PyTypeObject shmd_WriterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmd._sys._core.Writer",
    .tp_doc = "The writer's hot path: publishing and waking (shmd/_sys/_writer.c).",
    .tp_basicsize = sizeof(Writer),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Writer_init,
    .tp_dealloc = (destructor)Writer_dealloc,
    .tp_traverse = (traverseproc)Writer_traverse,
    .tp_clear = (inquiry)Writer_clear,
    .tp_methods = Writer_methods,
    .tp_getset = Writer_getset,
};
