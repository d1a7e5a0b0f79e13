"""Peak resident memory of the current process, for tests that measure a fresh subprocess.

``resource.getrusage(...).ru_maxrss`` is not usable there: Linux carries the parent's peak over ``exec``,
so a child of a large pytest process starts with the parent's high-water mark. ``VmHWM`` belongs to the
process's own address space.
"""


def peak_rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
