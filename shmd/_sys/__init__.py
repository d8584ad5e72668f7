"""The thin unsafe layer: ctypes into libc, raw fds, raw addresses.

Nothing outside ``shmd._sys`` imports ctypes.
"""
