"""Workers' resident memory, sampled while they run."""

from __future__ import annotations

import threading

import psutil


class RssSampler:
    """Samples each worker's resident memory (alone, and with its ffmpeg children)."""

    def __init__(self, pids: dict[str, int], every: float = 0.1) -> None:
        self.pids, self.every = pids, every
        self.peak: dict[str, int] = dict.fromkeys(pids, 0)
        self.peak_tree: dict[str, int] = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        procs = {name: psutil.Process(pid) for name, pid in self.pids.items()}
        while not self._stop.is_set():
            for name, proc in procs.items():
                try:
                    own = proc.memory_info().rss
                    children = sum(c.memory_info().rss for c in proc.children(recursive=True))
                except psutil.Error:
                    continue
                self.peak[name] = max(self.peak[name], own)
                self.peak_tree[name] = max(self.peak_tree[name], own + children)
            self._stop.wait(self.every)


def mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


Peaks = dict[str, tuple[int, int]]  # worker → (own RSS, RSS with its children), bytes


def merge_peaks(into: Peaks, sampler: RssSampler, label: str) -> None:
    """Keeps the highest peak per worker slot (`label` w0, w1) across runs and restarts."""
    for name, own in sampler.peak.items():
        key = f"{label}, {name.rsplit('-', 1)[-1]}"
        old_own, old_tree = into.get(key, (0, 0))
        into[key] = (max(old_own, own), max(old_tree, sampler.peak_tree[name]))


def peaks_text(peaks: Peaks) -> str:
    return "; ".join(
        f"{key}: {mib(own)} MiB ({mib(tree)} MiB with ffmpeg children alive at a sample)"
        for key, (own, tree) in peaks.items()
    )
