/*
 * shmd._sys._core: the compiled bottom of shmd.
 *
 * One extension module, three files: this one holds the module, the
 * segment's process-shared robust pthread mutex, its POSIX semaphore and
 * memory barriers for what stays in Python; _writer.c (Writer) and
 * _reader.c (Reader) hold the bus's hot path, publishing, reading and the
 * sleep handshake, with every shared access a C11 atomic (_bus.h).
 *
 * Contract with shmd/_sys/libc.py for the functions here: addresses are
 * plain integers that libc.Pinned took from a writable buffer it keeps
 * exported, so the memory cannot be unmapped under us; the pthread and
 * semaphore functions return their error number (0 for success) as a
 * Python int, and libc.py maps each errno to the exception and the reason a
 * user reads (its per-call tables).  Argument errors and interrupted waits
 * raise here, as any C function of CPython does.  Writer and Reader take the
 * Segment's mmaps themselves, as buffer exports held until their close().
 */
#include "_bus.h"

#include <errno.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

/* The address argument: a non-zero integer (libc.Pinned.address). */
static void *
as_address(PyObject *arg)
{
    unsigned long long value = PyLong_AsUnsignedLongLong(arg);
    if (value == (unsigned long long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    if (value == 0) {
        PyErr_SetString(PyExc_ValueError,
                        "Failed to use the address since it is 0 (a released Pinned?)");
        return NULL;
    }
    return (void *)(uintptr_t)value;
}

/* now + timeout seconds on CLOCK_MONOTONIC; 0 or -1 with ValueError set. */
static int
deadline(double timeout, struct timespec *ts)
{
    if (!(timeout >= 0.0) || timeout > 1e9) {  /* also refuses NaN */
        PyErr_SetString(PyExc_ValueError,
                        "Failed to wait since the timeout is not between 0 and 1e9 seconds");
        return -1;
    }
    clock_gettime(CLOCK_MONOTONIC, ts);
    long long whole = (long long)timeout;
    long long ns = (long long)ts->tv_nsec + (long long)((timeout - (double)whole) * 1e9);
    ts->tv_sec += (time_t)whole + (time_t)(ns / 1000000000LL);
    ts->tv_nsec = (long)(ns % 1000000000LL);
    return 0;
}

/* -- the robust mutex ------------------------------------------------------ */

PyDoc_STRVAR(mutex_init_doc,
"mutex_init(address) -> errno\n\n"
"pthread_mutex_init a process-shared, robust, error-checking mutex at address.");

static PyObject *
core_mutex_init(PyObject *Py_UNUSED(module), PyObject *arg)
{
    void *address = as_address(arg);
    if (address == NULL) {
        return NULL;
    }
    pthread_mutexattr_t attr;
    int rc = pthread_mutexattr_init(&attr);
    if (rc != 0) {
        return PyLong_FromLong(rc);
    }
    /* Error-checking type: glibc's robust *normal* mutex deadlocks forever
     * when its owner thread locks it again (even pthread_mutex_clocklock
     * waits out its whole timeout); the error-checking one says EDEADLK. */
    if ((rc = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED)) == 0
        && (rc = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST)) == 0
        && (rc = pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ERRORCHECK)) == 0) {
        rc = pthread_mutex_init((pthread_mutex_t *)address, &attr);
    }
    pthread_mutexattr_destroy(&attr);
    return PyLong_FromLong(rc);
}

PyDoc_STRVAR(mutex_lock_doc,
"mutex_lock(address, timeout) -> errno\n\n"
"Lock, waiting at most timeout seconds (None: forever; 0: try once).\n"
"0: acquired.  EOWNERDEAD: acquired, and already marked consistent; the\n"
"caller must repair what the dead owner protected.  ETIMEDOUT: not\n"
"acquired.  Anything else: pthread's error number.");

static PyObject *
core_mutex_lock(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "mutex_lock() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    pthread_mutex_t *mutex = as_address(args[0]);
    if (mutex == NULL) {
        return NULL;
    }
    double timeout = -1.0;  /* None: forever */
    if (args[1] != Py_None) {
        timeout = PyFloat_AsDouble(args[1]);
        if (timeout == -1.0 && PyErr_Occurred()) {
            return NULL;
        }
        if (timeout < 0.0) {
            timeout = 0.0;
        }
    }
    /* Uncontended (nearly always): one trylock, the GIL kept, no deadline. */
    int rc = pthread_mutex_trylock(mutex);
    if (rc == EBUSY) {
        if (timeout == 0.0) {
            return PyLong_FromLong(ETIMEDOUT);
        }
        struct timespec ts;
        if (timeout > 0.0 && deadline(timeout, &ts) < 0) {
            return NULL;
        }
        Py_BEGIN_ALLOW_THREADS
        rc = timeout < 0.0 ? pthread_mutex_lock(mutex)
                           : pthread_mutex_clocklock(mutex, CLOCK_MONOTONIC, &ts);
        Py_END_ALLOW_THREADS
    }
    if (rc == EOWNERDEAD) {
        /* Acquired: the kernel handed us the lock because its owner died
         * (robust futex list).  Marked consistent at once: unlocking it
         * without that would make it ENOTRECOVERABLE for everyone after us.
         * pthread_mutex_consistent can only fail with EINVAL, which
         * EOWNERDEAD rules out. */
        int again = pthread_mutex_consistent(mutex);
        if (again != 0) {
            return PyLong_FromLong(again);
        }
    }
    return PyLong_FromLong(rc);
}

PyDoc_STRVAR(mutex_unlock_doc,
"mutex_unlock(address) -> errno\n\nUnlock a mutex this thread holds.");

static PyObject *
core_mutex_unlock(PyObject *Py_UNUSED(module), PyObject *arg)
{
    pthread_mutex_t *mutex = as_address(arg);
    if (mutex == NULL) {
        return NULL;
    }
    return PyLong_FromLong(pthread_mutex_unlock(mutex));
}

/* -- the semaphore ---------------------------------------------------------- */

PyDoc_STRVAR(sem_init_doc,
"sem_init(address) -> errno\n\nA process-shared semaphore of value 0 at address.");

static PyObject *
core_sem_init(PyObject *Py_UNUSED(module), PyObject *arg)
{
    sem_t *sem = as_address(arg);
    if (sem == NULL) {
        return NULL;
    }
    return PyLong_FromLong(sem_init(sem, 1, 0) == 0 ? 0 : errno);
}

PyDoc_STRVAR(sem_post_doc, "sem_post(address) -> errno\n\nAdd one, waking a waiter.");

static PyObject *
core_sem_post(PyObject *Py_UNUSED(module), PyObject *arg)
{
    sem_t *sem = as_address(arg);
    if (sem == NULL) {
        return NULL;
    }
    return PyLong_FromLong(sem_post(sem) == 0 ? 0 : errno);
}

PyDoc_STRVAR(sem_wait_doc,
"sem_wait(address, timeout) -> errno\n\n"
"Take one once the value is positive, waiting at most timeout seconds:\n"
"0 taken, ETIMEDOUT not.  A signal runs its Python handler and the wait\n"
"goes on to the same deadline (or the handler's exception is raised).");

static PyObject *
core_sem_wait(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "sem_wait() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    sem_t *sem = as_address(args[0]);
    if (sem == NULL) {
        return NULL;
    }
    double timeout = PyFloat_AsDouble(args[1]);
    if (timeout == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    struct timespec ts;
    if (deadline(timeout < 0.0 ? 0.0 : timeout, &ts) < 0) {
        return NULL;
    }
    for (;;) {
        int rc, err = 0;
        Py_BEGIN_ALLOW_THREADS
        rc = sem_clockwait(sem, CLOCK_MONOTONIC, &ts);
        if (rc != 0) {
            err = errno;
        }
        Py_END_ALLOW_THREADS
        if (rc == 0) {
            return PyLong_FromLong(0);
        }
        if (err != EINTR) {
            return PyLong_FromLong(err);
        }
        /* A signal interrupted the wait: its Python handler runs now (shmd's
         * handlers only queue the signal), then we wait out the rest. */
        if (PyErr_CheckSignals() < 0) {
            return NULL;
        }
    }
}

PyDoc_STRVAR(sem_drain_doc, "sem_drain(address)\n\nTake every pending post without waiting.");

static PyObject *
core_sem_drain(PyObject *Py_UNUSED(module), PyObject *arg)
{
    sem_t *sem = as_address(arg);
    if (sem == NULL) {
        return NULL;
    }
    while (sem_trywait(sem) == 0) {
    }
    Py_RETURN_NONE;
}

/* -- memory barriers --------------------------------------------------------
 *
 * For what stays in Python, off the hot path: the block policy's
 * writer_waiting handshake, deactivate(), the slowest-cursor scan and
 * Subscriber.still_valid().  Candidly: they order the interpreter's plain
 * loads and stores into the mapping (memoryview item access is a plain C
 * access) only in the way a C compiler and CPU honour a fence between
 * non-atomic accesses; the C11 model promises more only for atomics, which
 * is why everything per record or per sleep is in _writer.c and _reader.c.
 * Measured here (timeit, one run, a loaded 2-core VM): fence() 23 ns.
 */

PyDoc_STRVAR(fence_doc,
"fence()\n\nA full barrier (StoreLoad included): atomic_thread_fence(seq_cst).");

static PyObject *
core_fence(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(unused))
{
    atomic_thread_fence(memory_order_seq_cst);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(load_fence_doc,
"load_fence()\n\nLoads before it complete before loads after it (acquire fence).");

static PyObject *
core_load_fence(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(unused))
{
    atomic_thread_fence(memory_order_acquire);
    Py_RETURN_NONE;
}

/* -- shared with _writer.c and _reader.c --------------------------------------- */

uint64_t
shmd_monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

void
shmd_views_release(shmd_views *v)
{
    if (v->ctl.obj != NULL) {
        PyBuffer_Release(&v->ctl);
    }
    if (v->ring.obj != NULL) {
        PyBuffer_Release(&v->ring);
    }
    v->ctl.buf = v->ring.buf = NULL;
}

int
shmd_views_take(shmd_views *v, PyObject *control, PyObject *ring, int ring_writable,
                Py_ssize_t control_size, Py_ssize_t ring_size)
{
    /* The control part is written by both sides; the ring only by the writer
     * (readers map it PROT_READ: a stray store faults in the reader). */
    if (PyObject_GetBuffer(control, &v->ctl, PyBUF_WRITABLE) < 0) {
        return -1;
    }
    if (PyObject_GetBuffer(ring, &v->ring, ring_writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&v->ctl);
        return -1;
    }
    if (v->ctl.len < control_size || v->ring.len < ring_size
        || ((uintptr_t)v->ctl.buf % 8) != 0 || ((uintptr_t)v->ring.buf % 8) != 0) {
        shmd_views_release(v);
        PyErr_SetString(PyExc_ValueError,
                        "Failed to use the segment since its mappings are smaller than its geometry");
        return -1;
    }
    return 0;
}

static PyMethodDef core_methods[] = {
    {"mutex_init", core_mutex_init, METH_O, mutex_init_doc},
    {"mutex_lock", (PyCFunction)(void (*)(void))core_mutex_lock, METH_FASTCALL, mutex_lock_doc},
    {"mutex_unlock", core_mutex_unlock, METH_O, mutex_unlock_doc},
    {"sem_init", core_sem_init, METH_O, sem_init_doc},
    {"sem_post", core_sem_post, METH_O, sem_post_doc},
    {"sem_wait", (PyCFunction)(void (*)(void))core_sem_wait, METH_FASTCALL, sem_wait_doc},
    {"sem_drain", core_sem_drain, METH_O, sem_drain_doc},
    {"fence", core_fence, METH_NOARGS, fence_doc},
    {"load_fence", core_load_fence, METH_NOARGS, load_fence_doc},
    {NULL, NULL, 0, NULL},
};

/* The layout as _bus.h knows it, for tests/test_core.py to hold against
 * shmd/bus/layout.py. */
static int
add_layout(PyObject *module)
{
    PyObject *d = Py_BuildValue(
        "{sisisisisisisisisisisisisisisisisisisisisisisi}",
        "OFF_ACTIVE", OFF_ACTIVE, "OFF_WRITE_SEQ", OFF_WRITE_SEQ,
        "OFF_RESERVE_SEQ", OFF_RESERVE_SEQ, "OFF_WRITER_WAITING", OFF_WRITER_WAITING,
        "OFF_SLEEP_COUNT", OFF_SLEEP_COUNT, "OFF_BYTES_PUBLISHED", OFF_BYTES_PUBLISHED,
        "OFF_SEM", OFF_SEM, "OFF_READERS", OFF_READERS, "READER_ENTRY_SIZE", READER_ENTRY_SIZE,
        "R_STATE", R_STATE, "R_CURSOR", R_CURSOR, "R_DELIVERED", R_DELIVERED, "R_LOST", R_LOST,
        "R_LAST_ACTIVE_NS", R_LAST_ACTIVE_NS, "R_SLEEP_SEQ", R_SLEEP_SEQ,
        "R_WAKE_SEQ", R_WAKE_SEQ, "R_TOPICS", R_TOPICS, "R_TOKEN", R_TOKEN, "R_TAKEN", R_TAKEN,
        "RECORD_HEADER_SIZE", RECORD_HEADER_SIZE, "TOPIC_MAX", TOPIC_MAX,
        "STATE_ATTACHED", STATE_ATTACHED, "REC_TOPIC", REC_TOPIC);
    if (d == NULL) {
        return -1;
    }
    int rc = PyModule_AddObjectRef(module, "LAYOUT", d);
    Py_DECREF(d);
    return rc;
}

static int
core_exec(PyObject *module)
{
    /* The shared words are plain memory another process also touches: that
     * is sound only with lock-free atomics (no hidden lock in this process). */
    if (ATOMIC_LLONG_LOCK_FREE != 2 || ATOMIC_INT_LOCK_FREE != 2) {
        PyErr_SetString(PyExc_ImportError,
                        "Failed to load shmd's core since this CPU has no lock-free 64-bit atomics");
        return -1;
    }
    if (PyModule_AddIntConstant(module, "MUTEX_SIZE", (long)sizeof(pthread_mutex_t)) < 0
        || PyModule_AddIntConstant(module, "SEM_SIZE", (long)sizeof(sem_t)) < 0
        || PyModule_AddIntConstant(module, "COPY_BATCH_BYTES", COPY_BATCH_BYTES) < 0
        || PyModule_AddIntConstant(module, "DEFER_CURSOR_MIN_CAPACITY", DEFER_CURSOR_MIN_CAPACITY) < 0
        || add_layout(module) < 0
        || shmd_writer_init() < 0
        || PyModule_AddType(module, &shmd_WriterType) < 0
        || PyModule_AddType(module, &shmd_ReservationType) < 0
        || PyModule_AddType(module, &shmd_ReaderType) < 0
        || PyModule_AddType(module, &shmd_LoanType) < 0) {
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot core_slots[] = {
    {Py_mod_exec, core_exec},
    {0, NULL},
};

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "shmd._sys._core",
    .m_doc = "shmd's compiled core: the robust mutex, the semaphore, memory barriers.",
    .m_size = 0,
    .m_methods = core_methods,
    .m_slots = core_slots,
};

PyMODINIT_FUNC
PyInit__core(void)
{
    return PyModuleDef_Init(&core_module);
}
