"""Progress lines a person can follow, and running averages of training metrics."""
from __future__ import annotations

import sys
import time
from collections import defaultdict


def fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """Averages metrics between reports and prints `step N/T | k v | ... | img/s | eta`. Metrics named
    in `latest` are positions (epochs so far), not per-step figures: they report their last value."""

    def __init__(self, total_steps: int, start_step: int = 0, every: int = 100, unit: str = "img",
                 prefix: str = "vqtok", stream=None, latest: tuple[str, ...] = ()):
        self.total, self.every, self.unit, self.prefix = total_steps, max(1, every), unit, prefix
        self.latest = frozenset(latest)
        self.stream = stream or sys.stdout
        self.sums: dict[str, float] = defaultdict(float)
        self.n = 0
        self.items = 0
        self.t_last = self.t_start = time.time()
        self.step_start = start_step
        self.last: dict[str, float] = {}

    def update(self, step: int, items: int, **metrics: float) -> None:
        for k, v in metrics.items():
            self.sums[k] = float(v) if k in self.latest else self.sums[k] + float(v)
        self.n += 1
        self.items += items
        if step % self.every == 0 or step == self.total:
            self.report(step)

    def report(self, step: int) -> dict[str, float]:
        now = time.time()
        rate = self.items / max(now - self.t_last, 1e-9)
        self.last = {k: v if k in self.latest else v / max(self.n, 1) for k, v in self.sums.items()}
        done = step - self.step_start
        eta = (now - self.t_start) / max(done, 1) * (self.total - step)
        parts = [f"step {step}/{self.total}"] + [f"{k} {_fmt(v)}" for k, v in self.last.items()]
        parts += [f"{rate:.0f} {self.unit}/s", f"eta {fmt_duration(eta)}"]
        print(f"{self.prefix}: " + " | ".join(parts), file=self.stream, flush=True)
        self.last[f"{self.unit}_per_s"] = rate
        self.sums.clear()
        self.n = self.items = 0
        self.t_last = now
        return self.last


def _fmt(v: float) -> str:
    if v == 0 or 0.01 <= abs(v) < 10_000:
        return f"{v:.4g}"
    return f"{v:.3e}"
