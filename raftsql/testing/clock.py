"""Wall-clock offsets for one node process: an LD_PRELOAD shim (C source compiled on first use)
that moves CLOCK_REALTIME and leaves CLOCK_MONOTONIC alone, or libfaketime as a fallback. Used by
the clock nemesis (raftsql.testing.nemesis.ClockNemesis) and the fault tests' clock-jump case."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

LIBFAKETIME_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/local/lib/faketime/libfaketimeMT.so.1",
    "/usr/lib/faketime/libfaketimeMT.so.1",
)


def libfaketime() -> str | None:
    for p in LIBFAKETIME_CANDIDATES:
        if os.path.exists(p):
            return p
    return None


# An LD_PRELOAD library that offsets the wall clock only (CLOCK_REALTIME, gettimeofday, time:
# what Python's time.time(), SQLite and OpenSSL read) by $RAFTSQL_CLOCK_OFFSET_MS, and leaves
# CLOCK_MONOTONIC alone. libfaketime 0.9.10 cannot do that for a Python 3.11 process: with the
# monotonic clock faked, every timed wait (Event.wait(t), Lock.acquire(timeout=t): glibc's
# sem_clockwait, which it does not wrap) sleeps until notified, because the absolute deadline
# is computed on the fake clock and waited for on the real one; with
# FAKETIME_DONT_FAKE_MONOTONIC=1 its clock_nanosleep wrapper fails every time.sleep() with
# EINVAL. See tests/faults/DESIGN.md.
CLOCK_SHIM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>

static long long offset_ns;
static int (*real_clock_gettime)(clockid_t, struct timespec *);

__attribute__((constructor)) static void init(void) {
    const char *s = getenv("RAFTSQL_CLOCK_OFFSET_MS");
    offset_ns = s ? atoll(s) * 1000000LL : 0;
    real_clock_gettime = (int (*)(clockid_t, struct timespec *))dlsym(RTLD_NEXT, "clock_gettime");
}

int clock_gettime(clockid_t c, struct timespec *ts) {
    if (!real_clock_gettime) init();
    int r = real_clock_gettime(c, ts);
    if (r == 0 && offset_ns && (c == CLOCK_REALTIME || c == CLOCK_REALTIME_COARSE || c == CLOCK_TAI)) {
        long long ns = (long long)ts->tv_sec * 1000000000LL + ts->tv_nsec + offset_ns;
        ts->tv_sec = ns / 1000000000LL;
        ts->tv_nsec = ns % 1000000000LL;
    }
    return r;
}

int gettimeofday(struct timeval *tv, void *tz) {
    struct timespec ts;
    (void)tz;
    int r = clock_gettime(CLOCK_REALTIME, &ts);
    if (r == 0 && tv) { tv->tv_sec = ts.tv_sec; tv->tv_usec = ts.tv_nsec / 1000; }
    return r;
}

time_t time(time_t *t) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (t) *t = ts.tv_sec;
    return ts.tv_sec;
}
"""


def build_clock_shim(directory: str | os.PathLike) -> str | None:
    """Compile CLOCK_SHIM_C into directory/clockshim.so (once); None without a C compiler."""
    out = Path(directory) / "clockshim.so"
    if out.exists():
        return str(out)
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src = Path(directory) / "clockshim.c"
    src.write_text(CLOCK_SHIM_C)
    r = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(src), "-ldl"],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        return None
    return str(out)


def clock_offset_env(directory: str | os.PathLike, offset_s: int, mechanism: str | None = None) -> dict[str, str] | None:
    """Environment that runs a process with its wall clock offset_s seconds off.

    mechanism "shim" (the default: CLOCK_SHIM_C) or "libfaketime" (set
    RAFTSQL_FAULTS_CLOCK=libfaketime; see the comment above for why it misbehaves)."""
    mechanism = mechanism or os.environ.get("RAFTSQL_FAULTS_CLOCK", "shim")
    if mechanism == "libfaketime":
        lib = libfaketime()
        return {"LD_PRELOAD": lib, "FAKETIME": f"{offset_s:+d}s"} if lib else None
    lib = build_clock_shim(directory)
    return {"LD_PRELOAD": lib, "RAFTSQL_CLOCK_OFFSET_MS": str(offset_s * 1000)} if lib else None
