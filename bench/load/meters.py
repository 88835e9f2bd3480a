"""What a run costs: CPU of the server, of this generator and of each core over one
window (so a reader can tell which side was saturated, and how noisy the machine was),
RSS of a process, and the percentiles every scenario reports."""

from __future__ import annotations

import contextlib
import os
import resource
import time

now = time.monotonic  # CLOCK_MONOTONIC: one clock for every process on the machine

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def proc_rss_kb(pid: int) -> int:
    """Resident memory of process ``pid`` in KiB (0 if /proc does not say)."""
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1])
    return 0


def own_cpu_s() -> float:
    """User + system CPU seconds of this generator."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def cores_busy_s() -> dict[str, float]:
    """Busy seconds of each CPU since boot (/proc/stat: all but idle and iowait)."""
    out = {}
    with open("/proc/stat", "rb") as f:
        for line in f:
            if not line.startswith(b"cpu") or line.startswith(b"cpu "):
                continue
            name, *ticks = line.split()
            t = [int(x) for x in ticks[:8]]
            out[name.decode()] = (sum(t) - t[3] - t[4]) / CLK_TCK
    return out


class Meter:
    """CPU of the server and of this generator over one window, and how busy each core
    was: the server is pinned to core 0 and the generator to core 1, so a core's busy
    share beyond its own process (plus the kernel's loopback work) is noise from other
    programs on a shared machine.

    A process sharing the generator's core (``--upstream-pid``: the fake upstream of the
    proxy scenario, the redis-server of sseserver-redis) is measured too
    (``upstream_cpu_s``, ``upstream_util``; ``--upstream-name redis``: ``redis_cpu_s``,
    ``redis_util``) and is not counted as noise."""

    upstream_pid = 0  # set from --upstream-pid
    upstream_name = "upstream"  # set from --upstream-name: the prefix of its keys

    def __init__(self, server_pid: int | None) -> None:
        self.pid = server_pid
        self.t = now()
        self.gen = own_cpu_s()
        self.srv = proc_cpu_s(server_pid) if server_pid else 0.0
        self.up = proc_cpu_s(self.upstream_pid) if self.upstream_pid else 0.0
        self.cores = cores_busy_s()

    def read(self) -> dict[str, float]:
        wall = now() - self.t
        gen = own_cpu_s() - self.gen
        out = {
            "wall_s": round(wall, 3),
            "gen_cpu_s": round(gen, 3),
            "gen_util": round(gen / wall, 3) if wall > 0 else 0.0,
        }
        if self.pid:
            srv = proc_cpu_s(self.pid) - self.srv
            out["server_cpu_s"] = round(srv, 3)
            out["server_util"] = round(srv / wall, 3) if wall > 0 else 0.0
        name = self.upstream_name
        if self.upstream_pid:
            with contextlib.suppress(OSError):
                up = proc_cpu_s(self.upstream_pid) - self.up
                out[f"{name}_cpu_s"] = round(up, 3)
                out[f"{name}_util"] = round(up / wall, 3) if wall > 0 else 0.0
        if wall > 0:
            cores = cores_busy_s()
            for core in ("cpu0", "cpu1"):
                if core in cores and core in self.cores:
                    out[f"{core}_busy"] = round((cores[core] - self.cores[core]) / wall, 3)
            # Busy time of each core beyond our own process on it. On core 1 that is other
            # programs (noise); on core 0 it also holds the kernel's softirq work for the
            # server's loopback traffic, which is not charged to the server process.
            if "cpu0_busy" in out and "server_util" in out:
                out["core0_other"] = round(max(0.0, out["cpu0_busy"] - out["server_util"]), 3)
            if "cpu1_busy" in out:
                ours = out["gen_util"] + out.get(f"{name}_util", 0.0)
                out["core1_other"] = round(max(0.0, out["cpu1_busy"] - ours), 3)
        return out


def percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float | int]:
    """p50/p90/p99/p99.9/max (nearest rank), in ms by default."""
    if not values:
        return {"n": 0}
    values.sort()
    n = len(values)

    def at(p: float) -> float:
        return round(values[min(n - 1, max(0, int(p / 100 * n + 0.5) - 1))] * scale, 3)

    return {
        "n": n,
        "p50": at(50),
        "p90": at(90),
        "p99": at(99),
        "p999": at(99.9),
        "max": round(values[-1] * scale, 3),
        "mean": round(sum(values) / n * scale, 3),
    }
