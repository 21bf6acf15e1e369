"""The loss history the demo's own training loops report: the mean loss over each window of steps."""

from __future__ import annotations

from tqdm import tqdm


class LossHistory:
    """(step, mean loss since the previous row) every `every` steps and at the last one, shown on `progress`."""

    def __init__(self, progress: tqdm, steps: int, every: int, fmt: str) -> None:
        self.progress, self.steps, self.every, self.fmt = progress, steps, every, fmt
        self.rows: list[tuple[int, float]] = []
        self._running = 0.0

    def add(self, step: int, loss: float) -> None:
        self._running += loss
        if step % self.every == 0 or step == self.steps:
            self.rows.append((step, self._running / (step - (self.rows[-1][0] if self.rows else 0))))
            self._running = 0.0
            self.progress.set_postfix(loss=format(self.rows[-1][1], self.fmt))
