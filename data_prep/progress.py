"""Progress of one part (a folder or an archive): a bar on a terminal, else a plain line per 10% (large parts)."""
from __future__ import annotations

import sys
import time
from typing import TextIO

QUIET_BELOW = 5000  # parts this small finish in a moment: no plain lines


class Progress:
    """Count decoded images of LABEL out of TOTAL; MB/s over PACKED_BYTES (the archive) when known."""

    def __init__(self, label: str, total: int, packed_bytes: int = 0, stream: TextIO | None = None) -> None:
        self.label, self.total, self.packed_bytes = label, total, packed_bytes
        self.stream = stream or sys.stderr
        self.done, self.started, self.next_tenth = 0, time.perf_counter(), 1
        self.bar = None
        if self.stream.isatty() and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", desc=label, file=self.stream, leave=True)

    def update(self, images: int) -> None:
        """IMAGES more are done."""
        self.done += images
        if self.bar is not None:
            self.bar.update(images)
            if self.packed_bytes:
                self.bar.set_postfix_str(f"{self._mb_per_s():.1f} MB/s", refresh=False)
            return
        if self.total < QUIET_BELOW or self.done * 10 < self.next_tenth * self.total:
            return
        tenth = self.done * 10 // self.total
        print(f"{self.label}: {self.done:,}/{self.total:,} images ({tenth * 10}%), {self.done / self._elapsed():,.0f} images/s"
              + (f", {self._mb_per_s():.1f} MB/s" if self.packed_bytes else ""), file=self.stream, flush=True)
        self.next_tenth = tenth + 1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def _elapsed(self) -> float:
        return max(time.perf_counter() - self.started, 1e-9)

    def _mb_per_s(self) -> float:
        """Packed MB per second, assuming the archive is read in proportion to the images done."""
        return self.packed_bytes * self.done / max(self.total, 1) / self._elapsed() / 1e6
