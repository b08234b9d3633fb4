"""The one compiled part: the loader's read loop (``shards/_fastread.c``, with the vendored
xxHash). Everything else is in pyproject.toml. The extension is optional: without a C compiler
the install goes on and the loader reads with its Python loop (``shards.reader._read_plain``)."""

import platform

from setuptools import Extension, setup

XXHASH = "shards/vendor/xxhash"
sources = ["shards/_fastread.c", f"{XXHASH}/xxhash.c"]
macros = []
if platform.machine().lower() in ("x86_64", "amd64"):
    # Built with baseline flags only: the dispatcher chooses the instruction set when it runs.
    sources.append(f"{XXHASH}/xxh_x86dispatch.c")
    macros.append(("FASTREAD_X86_DISPATCH", "1"))

setup(
    ext_modules=[
        Extension(
            "shards._fastread",
            sources,
            include_dirs=[XXHASH],
            define_macros=macros,
            depends=[f"{XXHASH}/xxhash.h", f"{XXHASH}/xxh_x86dispatch.h"],
            extra_compile_args=["-O3", "-fvisibility=hidden"],
            optional=True,
        )
    ]
)
