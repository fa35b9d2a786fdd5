"""The engine worker: one thread owns the model and serves every session in batches.

Sessions never run torch. They hand a request (audio, targets, kind) to ``EngineWorker.submit`` or
``await EngineWorker.transcribe(...)``; the request is plain data in a queue. The worker thread:

1. blocks until a request is pending, waits ``batch_window_ms`` (a couple of milliseconds) so that
   requests submitted at about the same time travel together, then takes up to
   ``max_batch_utterances`` pending requests, finals before partials (oldest first within a kind);
   the rest wait for the next round;
2. checks every request's targets, failing only the requests whose targets the model rejects;
3. runs ONE ``engine.encode`` over the audio of all taken requests and ONE ``engine.decode`` over
   all their rows (utterance x target), so rows from different streams advance in one lockstep,
   KV-cached decoding loop;
4. hands each request its hypotheses through ``loop.call_soon_threadsafe`` on the loop that
   submitted it. If the batch raises, its requests are retried one by one so that the exception
   reaches only the request that caused it. The worker itself keeps running.

Partial requests may carry a ``key`` (a session uses itself): a newer partial with the same key
supersedes a pending older one, which then resolves with ``None`` without costing any model time.
Finals are never superseded. A batch made only of partials is also *preempted* when a final
arrives while it decodes: it stops before its next decoder step and its partials resolve with
``None``, so a final waits for at most one decoder step (plus an encoder pass already running)
instead of a whole partial decode. Partials are disposable: the next chunk brings a fresher one.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..core.languages import Target
from .engine import DecodeInterrupted, Engine, Hypothesis

log = logging.getLogger(__name__)

__all__ = ["EngineWorker", "WorkerStats", "KINDS"]

KINDS = ("final", "partial")


@dataclass
class WorkerStats:
    """Counters since start. Histograms map a batch size to how many batches had it (bounded memory)."""

    batches: int = 0  # encode+decode rounds run
    requests: int = 0  # requests answered with hypotheses
    failed: int = 0  # requests answered with an exception
    superseded: int = 0  # partial requests answered None because a newer one with their key came
    preempted: int = 0  # partial requests answered None because a final arrived while they decoded
    encoder_batches: dict[int, int] = field(default_factory=dict)  # utterances per engine.encode call
    decoder_batches: dict[int, int] = field(default_factory=dict)  # rows per engine.decode call
    max_encoder_batch: int = 0
    max_decoder_rows: int = 0
    max_decoder_step_rows: int = 0  # most rows that ran one decoder step together (lockstep)
    busy_seconds: float = 0.0  # time spent in batches
    max_batch_seconds: float = 0.0

    def record(self, utterances: int, rows: int, step_rows: int, seconds: float) -> None:
        self.batches += 1
        self.encoder_batches[utterances] = self.encoder_batches.get(utterances, 0) + 1
        self.decoder_batches[rows] = self.decoder_batches.get(rows, 0) + 1
        self.max_encoder_batch = max(self.max_encoder_batch, utterances)
        self.max_decoder_rows = max(self.max_decoder_rows, rows)
        self.max_decoder_step_rows = max(self.max_decoder_step_rows, step_rows)
        self.busy_seconds += seconds
        self.max_batch_seconds = max(self.max_batch_seconds, seconds)


@dataclass(eq=False)
class _Request:
    audio: np.ndarray
    targets: list[Target]
    kind: str
    key: Hashable | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


def _settle(future: asyncio.Future, result=None, error: BaseException | None = None) -> None:
    """Runs on the submitting loop. A future cancelled by its awaiter is left alone."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class EngineWorker:
    """Runs all model work of the process on one dedicated thread; see the module docstring."""

    def __init__(
        self,
        engine: Engine,
        max_batch_utterances: int = 16,
        *,
        batch_window_ms: float = 2.0,
        max_new_tokens: int | None = None,
    ):
        if max_batch_utterances < 1:
            raise ValueError(f"max_batch_utterances must be at least 1, got {max_batch_utterances}")
        self.engine = engine
        self.max_batch_utterances = max_batch_utterances
        self.batch_window_s = max(batch_window_ms, 0.0) / 1000
        self.max_new_tokens = max_new_tokens
        self._pending: list[_Request] = []
        self._finals_pending = 0  # read without the lock by the decode loop's should_stop
        self._condition = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._stats = WorkerStats()
        self._stats_lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Launch the worker thread (a daemon thread, so a crashed main cannot hang on it)."""
        with self._condition:
            if self._stopping:
                raise RuntimeError("EngineWorker cannot be restarted after stop()")
            if self._thread is None:
                self._launch()

    def stop(self) -> None:
        """Refuse new requests, finish every pending one, then join the thread. Idempotent.

        It blocks until the queue is drained: from async code call ``await asyncio.to_thread(worker.stop)``
        so the loop keeps delivering the drained results meanwhile.
        """
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
            if self._thread is None and self._pending:  # never started: start now so the work drains
                self._launch()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _launch(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="streamsed-engine", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def stats(self) -> WorkerStats:
        """A snapshot of the counters (safe to read from any thread)."""
        with self._stats_lock:
            return copy.deepcopy(self._stats)

    # -- requests -----------------------------------------------------------------------------------
    def submit(
        self, audio: np.ndarray, targets: Sequence[Target], kind: str = "final", *, key: Hashable | None = None
    ) -> asyncio.Future:
        """Queue a request now and return a future of the running loop for its hypotheses.

        Synchronous on purpose: the request is queued before the caller yields, so the worker can
        start on it at once. The future resolves to one Hypothesis per target, in target order, or
        to None for a partial superseded by a newer one with the same ``key``.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
        if not targets:
            raise ValueError("a request needs at least one target")
        loop = asyncio.get_running_loop()
        request = _Request(np.asarray(audio, dtype=np.float32), list(targets), kind, key, loop, loop.create_future())
        with self._condition:
            if self._stopping:
                raise RuntimeError("the engine worker is stopped")
            if kind == "partial" and key is not None:
                self._supersede_partials(key)
            self._pending.append(request)
            self._finals_pending += kind == "final"
            self._condition.notify()
        return request.future

    async def transcribe(
        self, audio: np.ndarray, targets: list[Target], kind: str = "final", *, key: Hashable | None = None
    ) -> list[Hypothesis] | None:
        """Decode ``audio`` for every target on the worker thread; see ``submit``."""
        return await self.submit(audio, targets, kind, key=key)

    def _supersede_partials(self, key: Hashable) -> None:
        """Called with the lock held: answer None to pending partials with ``key``."""
        stale = [r for r in self._pending if r.kind == "partial" and r.key == key]
        for request in stale:
            self._pending.remove(request)
            self._resolve(request, None)
        if stale:
            with self._stats_lock:
                self._stats.superseded += len(stale)

    # -- the worker thread --------------------------------------------------------------------------
    def _serve(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            except Exception as error:  # a bug here must not leave awaiters hanging or kill the thread
                log.exception("engine worker batch crashed")
                for request in batch:
                    self._fail(request, error)

    def _next_batch(self) -> list[_Request] | None:
        """Block for work; None once stopped with nothing left to do."""
        with self._condition:
            while not self._pending and not self._stopping:
                self._condition.wait()
            if not self._pending:
                return None
        if self.batch_window_s:
            time.sleep(self.batch_window_s)  # let requests submitted together arrive together
        with self._condition:
            return self._take_batch()

    def _take_batch(self) -> list[_Request]:
        """Called with the lock held: finals first, then partials, oldest first within each kind."""
        live = [r for r in self._pending if not r.future.cancelled()]
        ordered = [r for r in live if r.kind == "final"] + [r for r in live if r.kind == "partial"]
        batch = ordered[: self.max_batch_utterances]
        self._pending = [r for r in live if r not in batch]
        self._finals_pending = sum(r.kind == "final" for r in self._pending)
        return batch

    def _run(self, batch: list[_Request]) -> None:
        runnable = [r for r in batch if self._targets_ok(r)]
        if not runnable:
            return
        try:
            results = self._transcribe(runnable)
        except DecodeInterrupted:
            with self._stats_lock:
                self._stats.preempted += len(runnable)
            for request in runnable:
                self._resolve(request, None)
            return
        except Exception as error:
            if len(runnable) == 1:
                self._fail(runnable[0], error)
                return
            log.warning("batch of %d requests failed (%s); retrying them one by one", len(runnable), error)
            for request in runnable:
                self._run([request])
            return
        with self._stats_lock:
            self._stats.requests += len(runnable)
        for request, hypotheses in zip(runnable, results):
            self._resolve(request, hypotheses)

    def _targets_ok(self, request: _Request) -> bool:
        """Reject a request with a target the model cannot produce before it can spoil the batch."""
        try:
            for target in request.targets:
                self.engine.check_target(target)
        except Exception as error:
            self._fail(request, error)
            return False
        return True

    def _transcribe(self, batch: list[_Request]) -> list[list[Hypothesis]]:
        started = time.perf_counter()
        encoded = self.engine.encode([r.audio for r in batch])
        rows = [(index, target) for index, request in enumerate(batch) for target in request.targets]
        only_partials = all(r.kind == "partial" for r in batch)
        should_stop = (lambda: self._finals_pending > 0) if only_partials else None
        hypotheses = self.engine.decode(encoded, rows, self.max_new_tokens, should_stop)
        step_rows = max(self.engine.last_stats.batch_sizes, default=0)
        with self._stats_lock:
            self._stats.record(len(batch), len(rows), step_rows, time.perf_counter() - started)
        results, first = [], 0
        for request in batch:
            results.append(hypotheses[first : first + len(request.targets)])
            first += len(request.targets)
        return results

    def _fail(self, request: _Request, error: BaseException) -> None:
        with self._stats_lock:
            self._stats.failed += 1
        self._resolve(request, error=error)

    @staticmethod
    def _resolve(request: _Request, result=None, *, error: BaseException | None = None) -> None:
        try:
            request.loop.call_soon_threadsafe(_settle, request.future, result, error)
        except RuntimeError:  # the submitting loop is closed: nobody is waiting any more
            log.debug("dropping a result for a closed event loop")
