"""``sora_jax.host_malloc``: when the process re-executes with glibc's huge-page tunable, that it does, and that
the tunable takes a large block's page faults from one per 4 KiB page to a few."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sora_jax import host_malloc

GLIBC = host_malloc.glibc_version()
ACTIVE = GLIBC is not None and GLIBC >= host_malloc.MIN_GLIBC and host_malloc.thp_mode() == "madvise"


@pytest.mark.parametrize(
    "environ, mode, version, expected",
    [
        ({}, "madvise", (2, 36), host_malloc.TUNABLE),
        (
            {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
            "madvise",
            (2, 36),
            "glibc.malloc.arena_max=2:" + host_malloc.TUNABLE,
        ),
        ({"GLIBC_TUNABLES": host_malloc.TUNABLE}, "madvise", (2, 36), None),  # the re-executed process
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", (2, 36), None),  # the user's own choice
        ({host_malloc.OPT_OUT: "default"}, "madvise", (2, 36), None),
        ({}, "always", (2, 36), None),  # huge pages come without asking
        ({}, "never", (2, 36), None),
        ({}, "", (2, 36), None),  # no THP file (not Linux, or a kernel without THP)
        ({}, "madvise", (2, 34), None),  # before the tunable existed
        ({}, "madvise", None, None),  # musl, macOS
    ],
)
def test_when_the_process_re_executes(environ, mode, version, expected):
    env = host_malloc.tuned_environment(environ, mode, version)
    assert (env if env is None else env["GLIBC_TUNABLES"]) == expected
    if env is not None:
        assert {k: v for k, v in env.items() if k != "GLIBC_TUNABLES"} == {
            k: v for k, v in environ.items() if k != "GLIBC_TUNABLES"
        }


@pytest.mark.parametrize(
    "text, mode", [("always [madvise] never\n", "madvise"), ("[always] madvise never", "always"), ("", "")]
)
def test_thp_mode_reads_the_bracketed_choice(tmp_path, text, mode):
    (tmp_path / "enabled").write_text(text)
    assert host_malloc.thp_mode(str(tmp_path / "enabled")) == mode
    assert host_malloc.thp_mode(str(tmp_path / "missing")) == ""


# a child that re-executes (or not), then writes a fresh 160 MiB block from malloc and reports its minor faults
CHILD = """
import ctypes, json, os, resource, sys
from sora_jax import host_malloc
host_malloc.reexec_with_huge_pages()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 160 * 2**20
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ctypes.memset(libc.malloc(size), 1, size)  # glibc's malloc as XLA calls it (numpy advises huge pages itself)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES", ""), "argv": sys.argv[1:], "faults": faults}))
"""


def run_child(**env: str) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_malloc.OPT_OUT)}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, "an", "argument"],
        env=base | env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not ACTIVE, reason="needs glibc >= 2.35 and the kernel's THP mode 'madvise'")
def test_re_executed_with_the_tunable_and_the_faults_fall():
    tuned, default = run_child(), run_child(**{host_malloc.OPT_OUT: "default"})
    assert tuned["tunables"] == host_malloc.TUNABLE and default["tunables"] == ""
    assert tuned["argv"] == default["argv"] == ["an", "argument"]  # the same command line, run again
    pages = 160 * 2**20 // 4096
    assert pages <= default["faults"] < 1.1 * pages  # one fault per 4 KiB page of the block
    assert tuned["faults"] < pages / 10  # 2 MiB pages: 80 for the block (some fall back to 4 KiB)
