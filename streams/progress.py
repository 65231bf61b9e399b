"""A rich progress bar for training runs (what ``operators.training.trainer.Progress`` shows)."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class TrainingBar:
    """Spans of the current epoch as a bar; one log line per finished epoch."""

    def __init__(self) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
        )
        self._epochs = 0
        self._spans = 0

    def start(self, epochs: int, spans: int) -> None:
        self._epochs, self._spans = epochs, spans
        self._task = self._progress.add_task(f"epoch 1/{epochs}", total=spans)
        self._progress.start()

    def span(self, span: int, loss: float) -> None:
        self._progress.update(self._task, completed=span + 1)

    def epoch_done(self, epoch: int, loss: float, mrr: float, seconds: float) -> None:
        self._progress.console.log(
            f"epoch {epoch + 1}/{self._epochs}: loss {loss:.2f}, valid MRR (frozen) {mrr:.4f}, "
            f"{seconds:.1f} s"
        )
        if epoch + 1 < self._epochs:
            self._progress.reset(
                self._task, total=self._spans, description=f"epoch {epoch + 2}/{self._epochs}"
            )

    def close(self) -> None:
        self._progress.stop()
