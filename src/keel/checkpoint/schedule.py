"""When the loop saves: every `checkpoint.every` steps, at the last step, and before any requested stop."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from keel.callback import Callback, LoopControl, StepOutcome
from keel.checkpoint.checkpointer import Checkpointer
from keel.observe.step_timer import StepTimer


class CheckpointSchedule(Callback):
    """Saves on schedule (in the background with `checkpoint.async_save`); waits for the save in flight at exit."""

    def __init__(
        self,
        checkpointer: Checkpointer,
        every: int,
        async_save: bool,
        control: LoopControl,
        timer: StepTimer,
        saved: Callable[[int, Path], None],
    ):
        self.checkpointer, self.every, self.async_save = checkpointer, every, async_save
        self.control, self.timer, self.saved = control, timer, saved
        self._owed = False  # a save fell on a step the loss guard refused: it is made at the next good one

    def after_step(self, outcome: StepOutcome) -> None:
        step = outcome.step
        self._owed = self._owed or bool(self.every and step % self.every == 0) or outcome.last or self.control.stopping
        # A step whose update was refused (a non-finite loss, a spike) or undone is never committed: every
        # checkpoint is one a rollback can trust, and retention, which keeps the newest, keeps a good one.
        if not self._owed or outcome.discarded or not outcome.updated:
            return
        with self.timer.phase("checkpoint"):
            save = self.checkpointer.save_async if self.async_save else self.checkpointer.save
            path = save(step)
        self._owed = False
        self.saved(step, path)

    def on_exit(self, state: str) -> None:
        self.checkpointer.wait()  # an asynchronous save counts only once committed: never exit before it is
