"""The engine worker: its threads own the model and schedule the work of every session.

Sessions never run torch. They hand a request (audio, targets, kind, optional drafts) to
``EngineWorker.submit`` or ``await EngineWorker.transcribe(...)``; the request is plain data in a
queue. The worker thread is a small deadline scheduler:

1. It blocks until a request is pending, waits ``batch_window_ms`` so that requests submitted at
   about the same time travel together, then takes up to ``max_batch_utterances`` requests:
   **finals first**, earliest deadline first (deadline = arrival + ``final_deadline_ms``);
   **partials only in spare capacity**: none while finals are overdue or while the finals already
   queued would take the engine past their deadline (measured cost per final, kept as a moving
   average). With no final queued, a batch of partials is kept short enough that a final arriving
   just after it starts still meets its deadline (an encoder pass cannot be interrupted). Partials
   of segments that had no partial yet go first, then the one whose last partial is oldest.
   A partial that is not taken stays queued and is superseded by its stream's next one.
   **File jobs** (``kind="file"``: segments of an uploaded file, the HTTP API) come last, in the
   spare capacity partials leave, and are never superseded: a long file advances between live
   finals and never holds one back by more than the batch already running.
2. It checks every request's targets, failing only the requests whose targets the model rejects.
3. It runs ONE encoder pass per window kind (``final_window``/``partial_window``: exact, fast,
   auto) over the taken requests and ONE decode over all their rows (utterance x target), so rows
   of different streams advance in one lockstep, KV-cached loop; drafts (the segment's latest
   partial, read after the encoder pass, so a partial that just finished on the other lane counts)
   are verified in one forward and only their confirmed prefix is kept.
4. It hands each request its hypotheses through ``loop.call_soon_threadsafe``; each hypothesis
   carries ``queued_ms`` (wait before its batch started) and ``compute_ms`` (its batch's run time).
   If a batch raises, its requests are retried one by one so that the exception reaches only the
   request that caused it. The worker itself keeps running.

**Lanes.** On a CPU the worker runs two *lanes* by default (``lanes``; ``[model] lanes``): threads
that each take the next batch from the one queue and run it on their own ``Engine.replica()`` (the
same weight tensors) with half the cores each. On this project's 2-core machine one torch thread
team of two stalls whenever the VAD, the event loop or a client needs a core, so under live load two
single-threaded lanes get more done, and two finals that arrive together both start at once
(README "Capacity" has the measurements). CUDA keeps one lane: there one batched pass is what is
fast. A CPU lane takes its share of the queued finals (usually one, alone) and no partials beside
them: the other lane takes those.

**int8 partials.** A float32 model on the CPU can decode partials on its ``Engine.int8_twin()``:
the Linear layers dynamically quantized, all other weights shared; such a partial costs less than
half as much, but its text is a little worse and, as a draft, the final accepts less of it.
``partial_dtype`` auto (the daemon's default) runs the *first* partial of each segment on the twin,
so a viewer sees words soon, and its later partials, which become the final's draft, on the model
itself ("int8-first"); int8 runs every partial on the twin. Finals and files always run on the
model as loaded, and a draft only decides how many decoder steps the final saves, never its tokens.

**Overload.** When finals fall behind their deadline the worker is ``overloaded`` (partials pause
as above; the server refuses new ingest sessions with ``overloaded``). The episode is logged once
when it starts and once when the backlog is gone, with its length and worst final wait.

Requests may carry a ``key`` (a session uses itself): a newer request with the same key, a partial
or the final of the utterance, supersedes a pending older partial, which then resolves with ``None``
without costing any model time. Finals are never superseded. A batch made only of partials is also *preempted* when a final
arrives while it decodes and letting it finish would make the final late: it stops before its next
decoder step and its partials resolve with ``None``, so such a final waits for at most one decoder
step (plus an encoder pass already running).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import os
import threading
import time
from collections.abc import Hashable, MutableMapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..core.languages import Target
from .engine import DecodeInterrupted, Engine, Hypothesis, run_rows

log = logging.getLogger(__name__)

__all__ = ["EngineWorker", "WorkerStats", "KINDS", "DEFAULT_FINAL_DEADLINE_MS", "PARTIAL_DTYPES", "auto_lanes",
           "resolve_partial_dtype"]

KINDS = ("final", "partial", "file")
DEFAULT_FINAL_DEADLINE_MS = 2000.0
_COST_SMOOTHING = 0.3  # weight of the newest batch in the moving average of cost per request


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
    decoder_forwards: int = 0  # decoder forward passes over all batches
    draft_offered: int = 0  # draft tokens offered over all rows
    draft_accepted: int = 0  # of those, confirmed by greedy decoding
    deferred: int = 0  # times a partial was left queued to keep finals on time
    int8_partials: int = 0  # partials decoded on the int8 twin
    overload_episodes: int = 0
    max_final_wait_seconds: float = 0.0  # longest a final waited in the queue
    answered_by_window: dict[str, int] = field(default_factory=dict)  # hypotheses per window that made them

    def record(self, utterances: int, rows: int, step_rows: int, seconds: float) -> None:
        self.batches += 1
        self.encoder_batches[utterances] = self.encoder_batches.get(utterances, 0) + 1
        self.decoder_batches[rows] = self.decoder_batches.get(rows, 0) + 1
        self.max_encoder_batch = max(self.max_encoder_batch, utterances)
        self.max_decoder_rows = max(self.max_decoder_rows, rows)
        self.max_decoder_step_rows = max(self.max_decoder_step_rows, step_rows)
        self.busy_seconds += seconds
        self.max_batch_seconds = max(self.max_batch_seconds, seconds)

    def record_decode(self, hypotheses: list[Hypothesis], forwards: int) -> None:
        self.decoder_forwards += forwards
        for hypothesis in hypotheses:
            self.draft_offered += hypothesis.draft_offered
            self.draft_accepted += hypothesis.draft_accepted
            self.answered_by_window[hypothesis.window] = self.answered_by_window.get(hypothesis.window, 0) + 1


@dataclass(eq=False)
class _Request:
    audio: np.ndarray
    targets: list[Target]
    kind: str
    key: Hashable | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    drafts: list[list[int] | None] | None = None  # one per target
    word_timings: bool = False
    shown: float | None = None  # partials: when their segment's last partial came back (None: never)
    draft_source: MutableMapping[Target, list[int]] | None = None  # live drafts, read when the decode starts
    submitted: float = field(default_factory=time.monotonic)
    deadline: float = float("inf")  # finals only


_LaneEngines = tuple[Engine, Engine]  # a lane's engine for finals and files, and for partials
PARTIAL_DTYPES = ("auto", "same", "int8")


def resolve_partial_dtype(engine: Engine, setting: str) -> str:
    """What partials run on: "same" (the engine itself), "int8" (its ``int8_twin()``) or
    "int8-first" (a segment's first partial on the twin, the rest on the engine). ``auto`` is
    int8-first for a float32 model on a CPU whose torch has int8 kernels, where the twin makes a
    partial 2-2.5x cheaper (README "Capacity"); finals always run on the engine as loaded."""
    if setting not in PARTIAL_DTYPES:
        raise ValueError(f"partial_dtype must be one of {', '.join(PARTIAL_DTYPES)}, not {setting!r}")
    if setting == "same" or engine.quantized == "int8":  # an int8 model is int8 for partials too
        return "same"
    float_cpu = engine.device.type == "cpu" and engine.dtype == torch.float32
    if setting == "int8" and not float_cpu:
        raise ValueError(f"partial_dtype int8 needs a float32 model on the CPU (this one is {engine.dtype} "
                         f"on {engine.device}); use same or auto")
    kernels = set(torch.backends.quantized.supported_engines) & {"fbgemm", "x86", "qnnpack"}
    if setting == "int8":
        return "int8"
    return "int8-first" if float_cpu and kernels else "same"


def auto_lanes(engine) -> int:
    """Lanes for ``lanes=0`` (auto): one on CUDA or on a single core, else two (see the module docstring)."""
    if getattr(engine, "device", torch.device("cpu")).type != "cpu" or getattr(engine, "static_decoder", None):
        return 1
    return 2 if (os.cpu_count() or 1) >= 2 else 1


_INT8_PARTIAL = "partial_int8"  # cost key of the partials that run on the int8 twin


def _staleness(request: _Request) -> tuple[bool, float]:
    """Sort key of waiting partials: segments that had no partial yet first (oldest request first),
    then the one whose last partial is oldest."""
    return (request.shown is not None, request.submitted if request.shown is None else request.shown)


def _drafts_now(request: _Request) -> list[list[int] | None]:
    """The request's drafts, one per target, as they stand now (see ``submit``'s ``draft_source``)."""
    drafts = request.drafts or [None] * len(request.targets)
    if request.draft_source is None:
        return drafts
    return [request.draft_source.get(target) or draft for target, draft in zip(request.targets, drafts)]


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
        final_window: str = "exact",  # the daemon passes its [model] settings (auto / fast by default)
        partial_window: str = "exact",
        final_deadline_ms: float = DEFAULT_FINAL_DEADLINE_MS,
        lanes: int = 1,  # 0: auto_lanes()
        partial_dtype: str = "same",  # the daemon passes [model] partial_dtype (auto by default)
    ):
        if lanes < 0:
            raise ValueError(f"lanes must be 0 (auto) or more, got {lanes}")
        if max_batch_utterances < 1:
            raise ValueError(f"max_batch_utterances must be at least 1, got {max_batch_utterances}")
        if final_deadline_ms <= 0:
            raise ValueError(f"final_deadline_ms must be positive, got {final_deadline_ms}")
        self.engine = engine
        self.lanes = lanes or auto_lanes(engine)
        self.partial_dtype = resolve_partial_dtype(engine, partial_dtype)
        finals = [engine] + [engine.replica() for _ in range(self.lanes - 1)]
        partials = finals
        if self.partial_dtype != "same":
            twin = engine.int8_twin()
            partials = [twin] + [twin.replica() for _ in range(self.lanes - 1)]
        self._engines = list(zip(finals, partials))  # per lane: (engine of finals and files, of partials)
        # Lanes split the cores; one lane keeps torch's setting (what the user or the machine chose).
        self._torch_threads = torch.get_num_threads()
        self._threads_per_lane = max(1, self._torch_threads // self.lanes) if self.lanes > 1 else None
        self.max_batch_utterances = max_batch_utterances
        self.batch_window_s = max(batch_window_ms, 0.0) / 1000
        self.max_new_tokens = max_new_tokens
        self.windows = {"final": engine.resolve_window(final_window), "partial": engine.resolve_window(partial_window)}
        self.final_deadline_s = final_deadline_ms / 1000
        self.windows["file"] = self.windows["final"]  # a file's segments decode as live finals do
        self._cost = dict.fromkeys(KINDS, 0.0)  # moving average of seconds per request, by kind
        if self.partial_dtype != "same":
            self._cost[_INT8_PARTIAL] = 0.0  # partials on the twin cost their own
        self._overloaded_since: float | None = None
        self.started_at = time.monotonic()
        self._episode_worst = 0.0
        self._pending: list[_Request] = []
        self._finals_pending = 0  # read without the lock by the decode loop's should_stop
        self._idle_lanes = 0  # lanes waiting for work: a final then needs no partial to yield
        self._yielding = 0  # lanes that stopped a partial batch for a waiting final and have not taken it yet
        self._lane = threading.local()  # per lane thread: .yielded
        self._condition = threading.Condition()
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._stats = WorkerStats()
        self._stats_lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Launch the lane threads (daemon threads, so a crashed main cannot hang on them)."""
        with self._condition:
            if self._stopping:
                raise RuntimeError("EngineWorker cannot be restarted after stop()")
            if not self._threads:
                self._launch()

    def stop(self) -> None:
        """Refuse new requests, finish every pending one, then join the thread. Idempotent.

        It blocks until the queue is drained: from async code call ``await asyncio.to_thread(worker.stop)``
        so the loop keeps delivering the drained results meanwhile.
        """
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
            if not self._threads and self._pending:  # never started: start now so the work drains
                self._launch()
            threads = list(self._threads)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join()

    def _launch(self) -> None:
        for lane, engines in enumerate(self._engines):
            name = "streamsed-engine" if self.lanes == 1 else f"streamsed-engine-{lane}"
            thread = threading.Thread(target=self._serve, args=(engines,), name=name, daemon=True)
            self._threads.append(thread)
            thread.start()

    @property
    def running(self) -> bool:
        return any(thread.is_alive() for thread in self._threads) and not self._stopping

    @property
    def stats(self) -> WorkerStats:
        """A snapshot of the counters (safe to read from any thread)."""
        with self._stats_lock:
            return copy.deepcopy(self._stats)

    # -- requests -----------------------------------------------------------------------------------
    def submit(
        self, audio: np.ndarray, targets: Sequence[Target], kind: str = "final", *, key: Hashable | None = None,
        drafts: Sequence[list[int] | None] | None = None, word_timings: bool | None = None,
        shown: float | None = None, draft_source: MutableMapping[Target, list[int]] | None = None,
    ) -> asyncio.Future:
        """Queue a request now and return a future of the running loop for its hypotheses.

        Synchronous on purpose: the request is queued before the caller yields, so the worker can
        start on it at once. The future resolves to one Hypothesis per target, in target order, or
        to None for a partial superseded by a newer one with the same ``key``. ``drafts`` (one per
        target, each may be None) are guesses at the tokens, e.g. the stream's previous partial:
        they save decoder steps and never change the result. ``word_timings`` (default: finals
        only) adds ``words`` to the hypotheses. ``shown`` (partials): the ``time.monotonic()`` when
        the segment's last partial came back, None if none has; it orders waiting partials.
        ``draft_source`` (a session passes one per segment): the segment's latest tokens by target,
        read when this request's decode starts, after its encoder pass, so a final drafts from a
        partial that finished on another lane meanwhile; a partial writes its own tokens into it as
        soon as they are decoded. It takes the place of ``drafts`` for the targets it has.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
        if not targets:
            raise ValueError("a request needs at least one target")
        if drafts is not None and len(drafts) != len(targets):
            raise ValueError(f"{len(drafts)} drafts for {len(targets)} targets")
        loop = asyncio.get_running_loop()
        request = _Request(np.asarray(audio, dtype=np.float32), list(targets), kind, key, loop, loop.create_future(),
                           [list(d) if d else None for d in drafts] if drafts is not None else None,
                           kind == "final" if word_timings is None else word_timings, shown, draft_source)
        if kind == "final":
            request.deadline = request.submitted + self.final_deadline_s
        with self._condition:
            if self._stopping:
                raise RuntimeError("the engine worker is stopped")
            if key is not None:  # a newer partial, or the final of the same stream, makes pending partials moot
                self._supersede_partials(key)
            self._pending.append(request)
            self._finals_pending += kind == "final"
            self._condition.notify()
        return request.future

    async def transcribe(
        self, audio: np.ndarray, targets: list[Target], kind: str = "final", *, key: Hashable | None = None,
        drafts: Sequence[list[int] | None] | None = None, word_timings: bool | None = None,
    ) -> list[Hypothesis] | None:
        """Decode ``audio`` for every target on the worker thread; see ``submit``."""
        return await self.submit(audio, targets, kind, key=key, drafts=drafts, word_timings=word_timings)

    # -- load ---------------------------------------------------------------------------------------
    @property
    def overloaded(self) -> bool:
        """True while finals miss their deadline: the server then admits no new ingest session."""
        return self._overloaded_since is not None

    @property
    def costs(self) -> dict[str, float]:
        """The measured engine seconds per request, by kind (moving averages; 0 until one ran)."""
        return {kind: round(cost, 4) for kind, cost in self._cost.items()}

    @property
    def queue_depth(self) -> int:
        """Requests waiting for the engine (read without the lock: a gauge, not an invariant)."""
        return len(self._pending)

    @property
    def overloaded_for(self) -> float:
        """Seconds the current overload episode has lasted; 0 when not overloaded."""
        since = self._overloaded_since
        return 0.0 if since is None else time.monotonic() - since

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
    def _serve(self, engines: _LaneEngines) -> None:
        if self._threads_per_lane is None:
            return self._serve_batches(engines)
        # With torch's OpenMP backend (the Linux wheels) this sizes this thread's own team; it also
        # becomes the default of threads that start using torch meanwhile (the VAD thread: 1 is right).
        torch.set_num_threads(self._threads_per_lane)
        try:
            self._serve_batches(engines)
        finally:  # torch also keeps the count as the default of new threads: give the process its own back
            torch.set_num_threads(self._torch_threads)

    def _serve_batches(self, engines: _LaneEngines) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run(batch, engines)
            except Exception as error:  # a bug here must not leave awaiters hanging or kill the thread
                log.exception("engine worker batch crashed")
                for request in batch:
                    self._fail(request, error)
            with self._condition:  # an episode also ends when the last late final is answered
                finals = [r for r in self._pending if r.kind == "final" and not r.future.cancelled()]
                self._track_overload(time.monotonic(), finals)

    def _next_batch(self) -> list[_Request] | None:
        """Block for work; None once stopped with nothing left to do."""
        with self._condition:
            self._idle_lanes += 1
            try:
                while not self._pending and not self._stopping:
                    self._condition.wait()
                if not self._pending:
                    return None
            finally:
                self._idle_lanes -= 1
        if self.batch_window_s:
            time.sleep(self.batch_window_s)  # let requests submitted together arrive together
        with self._condition:
            if getattr(self._lane, "yielded", False):
                self._lane.yielded = False
                self._yielding -= 1
            return self._take_batch()

    def _take_batch(self) -> list[_Request]:
        """Called with the lock held: finals by deadline, then partials, then file segments, these
        two only if there is time for them."""
        now = time.monotonic()
        live = [r for r in self._pending if not r.future.cancelled()]
        finals = sorted((r for r in live if r.kind == "final"), key=lambda r: (r.deadline, r.submitted))
        # One lane (CUDA) batches every queued final. CPU lanes split the queue: usually that is one
        # final each, alone (batching saves a CPU little, and a batch answers its finals only at its
        # end), while a backlog is still decoded in batches, whose decoder steps rows share.
        batch = finals[: min(self.max_batch_utterances, math.ceil(len(finals) / self.lanes))]
        self._track_overload(now, finals)
        spare = self._spare_seconds(now, finals) if self.lanes == 1 or not batch else 0.0
        kinds = ("partial", "file")
        if any(r.kind == "file" and now - r.submitted > self.final_deadline_s for r in live):
            kinds = ("file", "partial")  # file work that waited a whole deadline goes before partials: it never starves
        for kind in kinds:
            waiting = [r for r in live if r.kind == kind]
            if kind == "partial":
                waiting.sort(key=_staleness)
            room = min(self._fits(spare, waiting), self.max_batch_utterances - len(batch))
            if not batch and not self.overloaded:
                room = max(room, 1)  # an idle engine always runs one, even if it costs more than the budget
            taken = waiting[: max(room, 0)]
            batch += taken
            spare -= sum(map(self._cost_of, taken))
            if kind == "partial" and len(taken) < len(waiting):
                with self._stats_lock:
                    self._stats.deferred += len(waiting) - len(taken)
        self._pending = [r for r in live if r not in batch]
        self._finals_pending = sum(r.kind == "final" for r in self._pending)
        return batch

    def _spare_seconds(self, now: float, finals: list[_Request]) -> float:
        """Engine time left before the earliest queued final's deadline once every queued final
        has run (a batch with a final in it is never preempted, so what joins it delays the final).
        With no final queued: what a final arriving now could wait and still be on time after
        running, with half its deadline to spare for the finals of other streams arriving with it."""
        if self.overloaded:
            return 0.0
        if not finals:
            return self.final_deadline_s / 2 - self._cost["final"]
        return min(r.deadline for r in finals) - now - len(finals) * self._cost["final"] / self.lanes

    def _fits(self, spare: float, waiting: list[_Request]) -> int:
        """How many of ``waiting``, in order, fit in ``spare`` seconds at the measured cost of each
        one's cost key (one whose key has no measured cost yet always fits)."""
        if spare <= 0:
            return 0
        if math.isinf(spare):
            return self.max_batch_utterances
        count = 0
        for request in waiting:
            cost = self._cost_of(request)
            if cost > spare:
                break
            spare -= cost
            count += 1
        return count

    def _on_twin(self, request: _Request) -> bool:
        """Whether ``request`` runs on the int8 twin: a partial, and for int8-first its segment's first."""
        if request.kind != "partial" or self.partial_dtype == "same":
            return False
        return self.partial_dtype == "int8" or request.shown is None

    def _cost_key(self, request: _Request) -> str:
        return _INT8_PARTIAL if self._on_twin(request) else request.kind

    def _cost_of(self, request: _Request) -> float:
        """Measured engine seconds for ``request`` (0 while its cost key has none)."""
        return self._cost[self._cost_key(request)]

    def _track_overload(self, now: float, finals: list[_Request]) -> None:
        """Enter overload when the oldest final is past its deadline; leave once no final is late and
        the oldest queued final has waited at most half a deadline. Logged once per episode."""
        worst = max((now - r.submitted for r in finals), default=0.0)
        late = any(now > r.deadline for r in finals)
        if self._overloaded_since is None:
            if late:
                self._overloaded_since = now
                self._episode_worst = worst
                with self._stats_lock:
                    self._stats.overload_episodes += 1
                log.warning("overloaded: %d finals queued, the oldest %.1f s (deadline %.1f s); partials paused, "
                            "new ingest sessions refused", len(finals), worst, self.final_deadline_s)
            return
        self._episode_worst = max(self._episode_worst, worst)
        if not late and worst <= self.final_deadline_s / 2:
            log.warning("overload over after %.1f s; the longest a final waited was %.1f s",
                        now - self._overloaded_since, self._episode_worst)
            self._overloaded_since = None

    def _run(self, batch: list[_Request], engines: _LaneEngines) -> None:
        runnable = [r for r in batch if self._targets_ok(r, engines[0])]
        if not runnable:
            return
        try:
            results = self._transcribe(runnable, engines)
        except DecodeInterrupted:
            self._lane.yielded = True  # counted back when this lane takes its next batch (the final)
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
                self._run([request], engines)
            return
        with self._stats_lock:
            self._stats.requests += len(runnable)
        for request, hypotheses in zip(runnable, results):
            if request.kind == "partial" and request.draft_source is not None:
                for target, hypothesis in zip(request.targets, hypotheses):  # its segment's draft from now on
                    request.draft_source[target] = hypothesis.tokens
            self._resolve(request, hypotheses)

    def _targets_ok(self, request: _Request, engine: Engine) -> bool:
        """Reject a request with a target the model cannot produce before it can spoil the batch."""
        try:
            for target in request.targets:
                engine.check_target(target)  # the lane's own engine: checks may tokenize a prompt
        except Exception as error:
            self._fail(request, error)
            return False
        return True

    def _transcribe(self, batch: list[_Request], engines: _LaneEngines) -> list[list[Hypothesis]]:
        started = time.perf_counter()
        begun = time.monotonic()
        only_partials = all(r.kind == "partial" for r in batch)
        costs = [self._cost_of(r) for r in batch]
        expected = sum(costs) if all(costs) else 0.0  # 0: not every request's cost is known yet
        should_stop = (lambda: self._partials_must_yield(started, expected)) if only_partials else None
        groups: dict[tuple[int, str], list[int]] = {}  # one encoder pass per (engine, window)
        for index, request in enumerate(batch):
            which = int(self._on_twin(request))
            groups.setdefault((which, self.windows[request.kind]), []).append(index)
        results: list[list[Hypothesis]] = [[] for _ in batch]
        rows_total = step_rows = forwards = 0
        for (which, window), members in groups.items():
            group_started = time.perf_counter()
            engine = engines[which]
            rows, timed = [], []
            for n, index in enumerate(members):
                request = batch[index]
                rows += [(n, target) for target in request.targets]
                timed += [request.word_timings] * len(request.targets)
            requests = [batch[i] for i in members]
            hypotheses = run_rows(engine, [r.audio for r in requests], rows, window=window,
                                  max_new_tokens=self.max_new_tokens, should_stop=should_stop,
                                  drafts=lambda requests=requests: [d for r in requests for d in _drafts_now(r)],
                                  word_timings=timed)
            stats = engine.last_stats
            rows_total += len(rows)
            step_rows = max(step_rows, max(stats.batch_sizes, default=0))
            forwards += stats.steps
            first = 0
            for index in members:
                count = len(batch[index].targets)
                results[index] = hypotheses[first : first + count]
                first += count
            self._learn_cost(requests, time.perf_counter() - group_started)
        seconds = time.perf_counter() - started
        for request, hypotheses in zip(batch, results):
            for hypothesis in hypotheses:
                hypothesis.queued_ms = round((begun - request.submitted) * 1000)
                hypothesis.compute_ms = round(seconds * 1000)
        with self._stats_lock:
            self._stats.record(len(batch), rows_total, step_rows, seconds)
            self._stats.record_decode([h for hyps in results for h in hyps], forwards)
            self._stats.int8_partials += sum(self._on_twin(r) for r in batch)
            for request in batch:
                if request.kind == "final":
                    self._stats.max_final_wait_seconds = max(self._stats.max_final_wait_seconds,
                                                             begun - request.submitted)
        return results

    def _partials_must_yield(self, started: float, expected: float) -> bool:
        """Polled between decoder steps of a partials-only batch: stop it when a final is waiting and
        letting the batch finish would make that final late. ``expected``: the batch's measured
        cost, 0 while some of its kinds of partial have none; then any waiting final stops it (an
        aborted partial wastes its encoder pass, so partials that fit before the deadline are let
        through)."""
        if self._finals_pending == 0 or self._idle_lanes:  # an idle lane takes the final at once
            return False
        remaining = max(expected - (time.perf_counter() - started), 0.0)
        with self._condition:
            finals = [r for r in self._pending if r.kind == "final"]
            if not finals or self._yielding >= len(finals):  # other lanes already make room for them
                return False
            finish = time.monotonic() + remaining + len(finals) * self._cost["final"] / self.lanes
            if expected and finish <= min(r.deadline for r in finals):
                return False
            self._yielding += 1  # this lane raises DecodeInterrupted now and takes the final next
            return True

    def _learn_cost(self, group: list[_Request], seconds: float) -> None:
        """Moving average of engine seconds per request, split between the cost keys of one encoder
        and decoder group (requests of one engine and window)."""
        per_request = seconds / len(group)
        for key in {self._cost_key(r) for r in group}:
            old = self._cost[key]
            self._cost[key] = per_request if old == 0 else old + _COST_SMOOTHING * (per_request - old)

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
