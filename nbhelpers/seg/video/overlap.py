"""Two helper threads that overlap CPU work with GPU work in the video loop.

Decoding, drawing and encoding run on the CPU while SAM 2 runs on the GPU; both release the GIL for most of
their time (OpenCV, numpy, CUDA kernels, the ffmpeg pipe), so a prefetching reader and an ordered writer
thread hide most of the CPU time behind the model.
"""
from __future__ import annotations

import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

T = TypeVar("T")


def prefetch(items: Iterator[T], depth: int = 4) -> Iterator[T]:
    """Yield `items`, produced by a background thread up to `depth` ahead; errors surface in the caller."""
    pending: queue.Queue = queue.Queue(maxsize=depth)
    stop, finished = threading.Event(), object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                pending.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(finished)
        except BaseException as error:  # handed to the consumer, raised there
            put(_Failure(error))

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while (item := pending.get()) is not finished:
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()
        if hasattr(items, "close"):
            items.close()  # runs the source's cleanup (e.g. releasing the capture) in this thread


@dataclass
class _Failure:
    error: BaseException


class OrderedWorker:
    """Run jobs one after another on one background thread, at most `pending` queued (bounded memory).

    `submit` re-raises a failed job's error; `finish` waits for all; `cancel` drops what has not started.
    """

    def __init__(self, pending: int = 3):
        self.pending = pending
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ordered-worker")
        self.futures: deque[Future] = deque()

    def submit(self, job: Callable[..., Any], *args: Any) -> None:
        while len(self.futures) >= self.pending:
            self.futures.popleft().result()
        self.futures.append(self.executor.submit(job, *args))

    def finish(self) -> None:
        try:
            while self.futures:
                self.futures.popleft().result()
        finally:
            self.executor.shutdown(wait=True)

    def cancel(self) -> None:
        for future in self.futures:
            future.cancel()
        self.futures.clear()
        self.executor.shutdown(wait=True)
