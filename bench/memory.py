"""Process memory for the benches, from /proc: RSS counts pages shared with other processes
(torch's own ~0.5 GB included) in every process that maps them; PSS shares them out; USS is
what a process alone holds."""
from __future__ import annotations

import os


def memory_mib(pid: int | str = "self") -> dict[str, float]:
    """rss / pss / uss of a process in MiB (from /proc/PID/smaps_rollup)."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1]) / 1024
    uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return {"rss": fields.get("Rss", 0), "pss": fields.get("Pss", 0), "uss": uss}


def children(pid: int) -> list[int]:
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(k) for k in f.read().split()]
        except OSError:
            pass
    return kids
