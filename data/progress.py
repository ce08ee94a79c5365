"""Progress of the data tools' long phases (downloads, encoding): a tqdm bar on a terminal, otherwise a
`progress` line every EVERY_S seconds, so that a log file shows the phase moving without a bar's
carriage returns. train_gpt.py has its own (it imports nothing from data/)."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

EVERY_S = 30.0


class Progress:
    def __init__(self, phase: str, total: int, enabled: bool = True, unit: str = "item",
                 every_s: float = EVERY_S, bar: bool | None = None, out=None, clock=time.perf_counter):
        self.phase, self.total, self.unit, self.every_s, self.out, self.clock = phase, total, unit, every_s, out, clock
        self.enabled, self.done = enabled and total > 0, 0
        self.t0 = self.last = clock()
        bar = sys.stderr.isatty() if bar is None else bar
        self.bar = tqdm(total=total, desc=phase, unit=unit, leave=False) if self.enabled and bar else None

    def update(self, n: int = 1) -> None:
        if not self.enabled:
            return
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = self.clock()
        if now - self.last >= self.every_s and self.done < self.total:
            self.last = now
            elapsed = now - self.t0
            left = elapsed / self.done * (self.total - self.done)
            print(f"progress phase:{self.phase} done:{self.done}/{self.total} unit:{self.unit} "
                  f"elapsed:{elapsed:.0f}s eta:{left:.0f}s", file=self.out or sys.stdout, flush=True)

    def wrap(self, items):
        """Yield the items, counting each one as done; closes at the end."""
        try:
            for item in items:
                yield item
                self.update()
        finally:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
