/*
 * shmd._sys._core: the compiled bottom of shmd.
 *
 * This first part of the core holds what every sleep and every repair goes
 * through: the segment's process-shared robust pthread mutex, its POSIX
 * semaphore, and real memory barriers.  Each function is a direct libc call
 * (no ctypes on these paths) with the GIL released wherever it may block.
 *
 * Contract with shmd/_sys/libc.py, the one Python module that imports this:
 * addresses are plain integers that libc.Pinned took from a writable buffer
 * it keeps exported, so the memory cannot be unmapped under us; the pthread
 * and semaphore functions return their error number (0 for success) as a
 * Python int, and libc.py maps each errno to the exception and the reason a
 * user reads (its per-call tables).  Argument errors and interrupted waits
 * raise here, as any C function of CPython does.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

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
 * Candidly: these order the interpreter's plain loads and stores into the
 * mapping (memoryview item assignment is a plain C store) only in the way a
 * C compiler and CPU honour a fence between non-atomic accesses, which is
 * what every ring written from Python relies on today.  The C11 model makes
 * promises only about atomics; the hot paths move into this module as C11
 * atomics with their orders next (issue #15), and these calls go with them.
 * Measured here (timeit, one run, a loaded 2-core VM): fence() 23 ns; the
 * _thread.lock round trip that was x86-64's full barrier 118 ns.  A mutex
 * lock+unlock through libc.py's wrappers: 300 ns, against 1.05 us by ctypes.
 */

PyDoc_STRVAR(fence_doc,
"fence()\n\nA full barrier (StoreLoad included): atomic_thread_fence(seq_cst).");

static PyObject *
core_fence(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(unused))
{
    atomic_thread_fence(memory_order_seq_cst);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(store_fence_doc,
"store_fence()\n\nStores before it are visible before stores after it (release fence).");

static PyObject *
core_store_fence(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(unused))
{
    atomic_thread_fence(memory_order_release);
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

static PyMethodDef core_methods[] = {
    {"mutex_init", core_mutex_init, METH_O, mutex_init_doc},
    {"mutex_lock", (PyCFunction)(void (*)(void))core_mutex_lock, METH_FASTCALL, mutex_lock_doc},
    {"mutex_unlock", core_mutex_unlock, METH_O, mutex_unlock_doc},
    {"sem_init", core_sem_init, METH_O, sem_init_doc},
    {"sem_post", core_sem_post, METH_O, sem_post_doc},
    {"sem_wait", (PyCFunction)(void (*)(void))core_sem_wait, METH_FASTCALL, sem_wait_doc},
    {"sem_drain", core_sem_drain, METH_O, sem_drain_doc},
    {"fence", core_fence, METH_NOARGS, fence_doc},
    {"store_fence", core_store_fence, METH_NOARGS, store_fence_doc},
    {"load_fence", core_load_fence, METH_NOARGS, load_fence_doc},
    {NULL, NULL, 0, NULL},
};

static int
core_exec(PyObject *module)
{
    if (PyModule_AddIntConstant(module, "MUTEX_SIZE", (long)sizeof(pthread_mutex_t)) < 0
        || PyModule_AddIntConstant(module, "SEM_SIZE", (long)sizeof(sem_t)) < 0) {
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
