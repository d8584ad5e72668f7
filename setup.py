"""The compiled core's build: everything else about the package is in pyproject.toml.

An ``ext_modules`` table in pyproject.toml needs setuptools >= 74; Debian 12
builds the package with its own setuptools 66, which reads extensions only
from here.  The flags are the project's: every warning is an error.
"""

import os

from setuptools import Extension, setup

# SHMD_CFLAGS adds flags for one build (packaging/dev sanitize uses it).
extra = os.environ.get("SHMD_CFLAGS", "").split()

setup(
    ext_modules=[
        Extension(
            "shmd._sys._core",
            sources=["shmd/_sys/_core.c", "shmd/_sys/_writer.c", "shmd/_sys/_reader.c"],
            depends=["shmd/_sys/_bus.h"],
            extra_compile_args=["-std=c11", "-Wall", "-Wextra", "-Werror", "-O2", *extra],
            extra_link_args=[f for f in extra if f.startswith("-fsanitize")],
        )
    ],
)
