"""The thin unsafe layer: ctypes into libc, raw fds, raw addresses, epoll.

Layer 0: imports nothing of shmd but :mod:`shmd.errors`.  Nothing outside
``shmd._sys`` imports ctypes.

* :mod:`~shmd._sys.libc`: shm_open/unlink, the robust mutex, the semaphore, fences;
* :mod:`~shmd._sys.fd`: one owner per raw fd;
* :mod:`~shmd._sys.proc`: whether a pid is alive;
* :mod:`~shmd._sys.reactor`: the epoll loop and signal wake-ups.
"""
