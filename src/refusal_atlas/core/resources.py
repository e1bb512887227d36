"""Memory and disk as a job sees them: sizes as people write them, what is free now, and disk-full errors.

A 7B model in bfloat16 is 15 GB; on a 24 GB machine a job that needs one copy more is killed by the kernel
minutes into its work, and a disk that fills up mid-write used to end in a library's traceback. The checks
built on this module (``workflows/validate.py``) compare an estimate with what is free *before* anything
loads or writes. Linux reports free memory as ``MemAvailable`` (``/proc/meminfo``: free pages plus the page
cache the kernel can drop), and a container may be capped lower by its cgroup (``memory.max``); the smaller
of the two is what a job can count on. Imports neither torch nor anything heavy.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

from refusal_atlas.core.errors import ArtifactError, ConfigError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
GiB = 2**30


def parse_size(text: str | int | float, what: str = "size") -> int:
    """``"20GiB"``, ``"512 MB"``, ``"1.5G"`` or a plain byte count → bytes (G = 10⁹, GiB = 2³⁰)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise ConfigError(f"{what} must be >= 0, got {text}")
        return int(text)
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise ConfigError(f"{what} {text!r}: expected a size like 20GiB, 512MB or a byte count")
    return int(float(m.group(1)) * _UNITS[unit])


def format_size(n: float) -> str:
    """Bytes as people read them: ``15.2 GiB``, ``840 MiB``."""
    for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except OSError:
        pass
    return out


def _cgroup_room() -> int | None:
    """Bytes this process's cgroup (v2) may still allocate, None when it has no limit or no cgroup."""
    try:
        rel = Path("/proc/self/cgroup").read_text(encoding="ascii").strip().split("\n")[0].split(":", 2)[2]
        base = Path("/sys/fs/cgroup") / rel.lstrip("/")
        limit = (base / "memory.max").read_text(encoding="ascii").strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((base / "memory.current").read_text(encoding="ascii").strip()))
    except (OSError, ValueError, IndexError):
        return None


def available_memory() -> tuple[int, str]:
    """(bytes a new allocation can count on, where that number came from)."""
    info = _meminfo()
    if "MemAvailable" in info:
        free, source = info["MemAvailable"], "MemAvailable in /proc/meminfo"
    else:  # not Linux: what the OS reports as physically free
        try:
            import psutil

            free, source = int(psutil.virtual_memory().available), "psutil available memory"
        except ImportError:
            free, source = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free physical pages"
    room = _cgroup_room()
    if room is not None and room < free:
        return room, "this container's cgroup memory.max"
    return free, source


def free_disk(path: str | os.PathLike) -> int:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def is_disk_full(exc: BaseException) -> bool:
    """An OSError for a full disk or quota (also as the message of a wrapping error, e.g. safetensors')."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc)


def disk_full_error(path: str | os.PathLike) -> ArtifactError:
    """The one-line error for a write that ran out of disk (the partial output is removed by the caller)."""
    try:
        left = f" ({format_size(free_disk(path))} free now)"
    except OSError:
        left = ""
    return ArtifactError(f"no space left on the device while writing {path}{left}; nothing was kept. Free some "
                         "space or write elsewhere")
