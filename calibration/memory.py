"""Peak host and device memory of this process, for the calibration command's last line.

    peak = PeakMemory(device).start()
    ...                                   # load the model, calibrate
    print(peak.stop().line())             # peak memory: host RSS 3.1 GiB (...), cuda:0 30.2 GiB ...

Host: the peak resident set of the whole process (getrusage ru_maxrss, the kernel's own
high-water mark, as /usr/bin/time -v reports it), and on Linux the peaks of its two parts,
sampled from /proc/self/status every `interval` seconds: anonymous memory (what the process
allocated: a model materialised on the host shows here) and file-backed pages (mapped
safetensors files being read: page cache the kernel can drop, not a demand on host memory).
Device: torch.cuda.max_memory_allocated / max_memory_reserved since start().
"""
from __future__ import annotations

import resource
import sys
import threading

import torch

GIB = 2**30


def peak_rss_bytes() -> int:
    """The process's peak resident set so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _status_bytes(fields=("RssAnon", "RssFile")) -> dict[str, int]:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in fields:
                    out[name] = int(value.split()[0]) * 1024  # "123 kB"
    except OSError:
        pass
    return out


class PeakMemory:
    def __init__(self, device: torch.device | str | None = None, interval: float = 0.05):
        self.device = torch.device(device) if device is not None else None
        self.interval = interval
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rss = 0
        self.allocated = self.reserved = None

    def _cuda(self) -> bool:
        return self.device is not None and self.device.type == "cuda" and torch.cuda.is_available()

    def sample(self) -> None:
        for name, value in _status_bytes().items():
            self.peaks[name] = max(self.peaks.get(name, 0), value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> "PeakMemory":
        if self._cuda():
            torch.cuda.reset_peak_memory_stats(self.device)
        self.sample()
        if self.interval > 0:
            self._thread = threading.Thread(target=self._run, name="sere-peak-memory", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> "PeakMemory":
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.sample()
        self.rss = peak_rss_bytes()
        if self._cuda():
            self.allocated = torch.cuda.max_memory_allocated(self.device)
            self.reserved = torch.cuda.max_memory_reserved(self.device)
        return self

    def line(self) -> str:
        host = f"host RSS {self.rss / GIB:.2f} GiB"
        if self.peaks:
            parts = [f"{label} {self.peaks[name] / GIB:.2f} GiB" for name, label in
                     (("RssAnon", "anonymous"), ("RssFile", "file-backed")) if name in self.peaks]
            host += f" (peaks: {', '.join(parts)})"
        device = ""
        if self.allocated is not None:
            device = (f", {self.device} {self.allocated / GIB:.2f} GiB allocated, "
                      f"{self.reserved / GIB:.2f} GiB reserved")
        return f"peak memory: {host}{device}"
