"""Micro-batching for the v2 server: concurrent requests concatenated along the batch axis.

Requests are joined only when company is likely (a request is being read, or the previous batch held
several), so a lone client never waits; a batch holds at most ``max_batch`` rows and waits at most
``max_delay_s`` for more.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np


# -- micro-batching --------------------------------------------------------------------------------
@dataclass
class Done:
    """A finished request: its outputs, how long it queued and how long the model ran (seconds)."""

    outputs: list[np.ndarray]
    queue_s: float
    infer_s: float


@dataclass
class _Job:
    feed: dict[str, np.ndarray]
    rows: int
    key: tuple[Any, ...]
    future: asyncio.Future[Done]
    submitted: float = field(default_factory=time.perf_counter)


@dataclass
class MicroBatcher:
    """Runs requests on one inference thread, concatenating concurrent ones along the batch axis.

    A batch is closed when it has ``max_batch`` rows, or when ``max_delay_s`` has passed, or at once
    when no company is likely (no request being read, and the previous batch held a single one): a lone
    client never waits for company that cannot come, so micro-batching costs nothing at concurrency 1.
    """

    infer: Callable[[dict[str, np.ndarray]], list[np.ndarray]]
    max_batch: int
    max_delay_s: float
    batchable: bool
    on_batch: Callable[[int], None] = lambda rows: None
    #: requests inside a handler that have not been submitted yet (being read or checked)
    arriving: int = 0
    _pending: deque[_Job] = field(default_factory=deque)
    _last_jobs: int = 0
    _wakeup: asyncio.Event | None = None
    _task: asyncio.Task[None] | None = None
    _executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="onnxkit-infer"))

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    @contextlib.contextmanager
    def arrival(self) -> Iterator[None]:
        """Held while a request is read and checked, so the batcher knows more work is coming."""
        self.arriving += 1
        try:
            yield
        finally:
            self.arriving -= 1

    async def submit(self, feed: dict[str, np.ndarray]) -> Done:
        assert self._wakeup is not None, "MicroBatcher.start() was not called"
        first = next(iter(feed.values()))
        key = tuple((n, a.shape[1:], a.dtype.str) for n, a in sorted(feed.items())) if self.batchable else (id(feed),)
        job = _Job(feed, int(first.shape[0]) if first.ndim else 1, key, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        self._wakeup.set()
        return await job.future

    def _take(self, batch: list[_Job], rows: int) -> int:
        """Move queued jobs that fit (same trailing shapes, within max_batch) into ``batch``."""
        if not self.batchable:
            return rows
        keep: deque[_Job] = deque()
        while self._pending:
            job = self._pending.popleft()
            if job.key == batch[0].key and rows + job.rows <= self.max_batch:
                batch.append(job)
                rows += job.rows
            else:
                keep.append(job)
        self._pending.extendleft(reversed(keep))
        return rows

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = [self._pending.popleft()]
            rows = self._take(batch, batch[0].rows)
            deadline = loop.time() + self.max_delay_s
            # Wait for company only when some is likely: a request is being read now, or the last batch had
            # several requests (their clients are about to send again). A lone client never waits.
            while self.batchable and rows < self.max_batch and (self.arriving > 0 or self._last_jobs > 1):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                rows = self._take(batch, rows)
            self._last_jobs = len(batch)
            await self._execute(loop, batch, rows)

    async def _execute(self, loop: asyncio.AbstractEventLoop, batch: list[_Job], rows: int) -> None:
        feed = batch[0].feed if len(batch) == 1 else {
            n: np.concatenate([j.feed[n] for j in batch]) for n in batch[0].feed}
        t0 = time.perf_counter()
        try:
            outputs = await loop.run_in_executor(self._executor, self.infer, feed)
        except Exception as exc:
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        infer_s = time.perf_counter() - t0
        self.on_batch(rows)
        start = 0
        for job in batch:
            part = outputs if len(batch) == 1 else [o[start:start + job.rows] for o in outputs]
            start += job.rows
            if not job.future.done():
                job.future.set_result(Done(part, t0 - job.submitted, infer_s))
