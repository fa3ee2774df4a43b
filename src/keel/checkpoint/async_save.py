"""An asynchronous save in flight: its writes finish in the background, then it is committed once all agree."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future

import torch
import torch.distributed as dist


class InFlightSave:
    """Waits for this rank's DCP upload, agrees with every rank on the dedicated group, then runs `commit`.

    The agreement is a collective on the checkpoint's own gloo group, so it never meets the
    training collectives; `commit` runs only if every rank's write finished without error.
    """

    def __init__(
        self,
        step: int,
        upload: Future,
        group: dist.ProcessGroup | None,
        commit: Callable[[], None],
        describe_error: Callable[[BaseException], Exception],
    ):
        self._upload, self._group, self._commit, self._describe = upload, group, commit, describe_error
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._finish, name=f"keel-checkpoint-{step}", daemon=True)
        self._thread.start()

    def _finish(self) -> None:
        try:
            failure: BaseException | None = None
            try:
                self._upload.result()
            except BaseException as e:  # DCP's CheckpointException is a BaseException
                failure = e
            if not self._everyone_ok(failure is None):
                raise failure or RuntimeError("another rank failed to write its shards")
            self._commit()
        except BaseException as e:
            self._error = self._describe(e)

    def _everyone_ok(self, ok: bool) -> bool:
        if self._group is None:
            return ok
        flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
        dist.all_reduce(flag, group=self._group)
        return int(flag.item()) == 0

    def wait(self) -> None:
        """Block until the save is committed (or failed); raise its CheckpointError if it failed."""
        self._thread.join()
        if self._error is not None:
            raise self._error
