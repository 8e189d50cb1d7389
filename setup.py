"""Build of tierrt's native layer: one pybind11 extension, ``tierrt._native``.

The extension is plain C++17 and does not link against libtorch: memory crosses the boundary as
buffers, addresses and sizes. io_uring is used through liburing when its headers are found
(Debian: ``liburing-dev``); liburing is linked statically so that the built module has no run-time
dependency on it. Without liburing the thread-pool I/O backend is the only one, and
``tierrt.info()`` says so. Set ``TIERRT_NO_LIBURING=1`` to build without it on purpose.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _compiles(code: str, extra_args: list[str]) -> bool:
    """True when ``code`` compiles and links with the C++ compiler and ``extra_args``."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as handle:
            handle.write(code)
        result = subprocess.run(
            [compiler, src, "-o", os.path.join(tmp, "probe"), *extra_args],
            capture_output=True,
        )
        return result.returncode == 0


def _liburing_link_args() -> list[str] | None:
    """Linker arguments for liburing (static archive preferred), or None when it is not usable."""
    if os.environ.get("TIERRT_NO_LIBURING"):
        return None
    probe = (
        "#include <liburing.h>\n"
        "int main(){ struct io_uring r; (void)io_uring_queue_init(4, &r, 0); return 0; }\n"
    )
    for libdir in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib"):
        archive = os.path.join(libdir, "liburing.a")
        if os.path.exists(archive) and _compiles(probe, [archive]):
            return [archive]
    if _compiles(probe, ["-luring"]):
        return ["-luring"]
    return None


def _sources() -> list[str]:
    files = sorted(glob.glob("native/**/*.cpp", recursive=True))
    files += sorted(glob.glob("allocators/**/*.cpp", recursive=True))
    return files


uring_args = _liburing_link_args()
macros: list[tuple[str, str]] = []
link_args = ["-pthread"]
if uring_args is not None:
    macros.append(("TIERRT_HAVE_LIBURING", "1"))
    link_args += uring_args
    print("tierrt: building with io_uring (liburing)", file=sys.stderr)
else:
    print("tierrt: liburing not found; building the thread-pool I/O backend only", file=sys.stderr)

ext = Pybind11Extension(
    "tierrt._native",
    _sources(),
    include_dirs=["native", "allocators"],
    define_macros=macros,
    cxx_std=17,
    extra_compile_args=["-O3", "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    extra_link_args=link_args,
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
