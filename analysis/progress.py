"""A tqdm progress bar over the tasks of a dask computation."""

from __future__ import annotations

from dask.callbacks import Callback
from tqdm.auto import tqdm


class TaskProgress(Callback):
    """Use as ``with TaskProgress(): result.compute()``; counts finished tasks of the graph."""

    def __init__(self, desc: str = "compute"):
        super().__init__()
        self.desc = desc
        self.bar = None

    def _start_state(self, dsk, state) -> None:
        total = sum(len(state[key]) for key in ("ready", "waiting", "running", "finished"))
        self.bar = tqdm(total=total, desc=self.desc, unit="task")

    def _posttask(self, key, result, dsk, state, worker_id) -> None:
        self.bar.update(1)

    def _finish(self, dsk, state, errored) -> None:
        self.bar.close()
