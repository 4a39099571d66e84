"""The host process's C allocator: glibc's malloc asked for transparent huge pages, by re-executing once.

XLA's CPU runtime allocates every execution's temporary buffer afresh (``posix_memalign`` from a worker thread's
arena), and glibc serves a block that large with a new ``mmap``, so each training step of the demo faults in
its ~160 MiB of temporaries one 4 KiB page at a time (about 42,000 minor faults and 80-100 ms of kernel time
per step on 2 cores). With glibc's ``glibc.malloc.hugetlb=1`` tunable malloc advises transparent huge pages
for those blocks (where the kernel's THP mode is ``madvise``), which takes the faults to a few hundred per step
(``benchmarks/host_malloc.py`` measures both, interleaved). A tunable is read once, when the process starts, so
``sora-jax`` (and the benchmark scripts) re-execute themselves with it added to ``GLIBC_TUNABLES`` before
anything else runs. ``SORA_JAX_HOST_MALLOC=default`` keeps the process as it started.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "SORA_JAX_HOST_MALLOC"  # "default": no re-execution
THP_MODE_PATH = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)  # the release that added glibc.malloc.hugetlb


def thp_mode(path: str = THP_MODE_PATH) -> str:
    """The kernel's transparent-huge-page mode ("always", "madvise" or "never"); "" where it cannot be read."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else ""


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library when it is glibc, else None (musl, macOS, Windows)."""
    try:
        name = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):
        return None
    if not name or not name.startswith("glibc "):
        return None
    parts = name.split()[1].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def tuned_environment(
    environ: Mapping[str, str], mode: str, version: tuple[int, int] | None
) -> dict[str, str] | None:
    """The environment to re-execute with, or None when this process should run as it is: the user opted out,
    the tunable is already set (this is the re-executed process), glibc is missing or older than 2.35, or the
    kernel's THP mode is not "madvise" (under "always" huge pages come anyway, under "never" not at all)."""
    if environ.get(OPT_OUT, "") == "default" or "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", ""):
        return None
    if version is None or version < MIN_GLIBC or mode != "madvise":
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    return dict(environ) | {"GLIBC_TUNABLES": f"{current}:{TUNABLE}" if current else TUNABLE}


def reexec_with_huge_pages() -> None:
    """Replaces this process with the same command line under ``tuned_environment`` (no return) when there is
    one; otherwise returns at once. Call it first thing in a program's entry point, before threads or JAX."""
    env = tuned_environment(os.environ, thp_mode(), glibc_version())
    argv = getattr(sys, "orig_argv", None)
    if env is None or not argv or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)
