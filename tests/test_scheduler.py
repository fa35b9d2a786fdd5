"""The worker's deadline scheduler under synthetic load, on a fake engine with a known cost.

The fake engine sleeps ``cost`` seconds per request and records which requests it ran, so ordering,
pausing of partials and the overload state can be asserted without a model (and without timing
assertions: the tests compare orders and states, not speeds).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pytest

from streamsed.core.languages import Target
from streamsed.engine.engine import DecodeInterrupted, DecodeStats, EncodedBatch, Hypothesis
from streamsed.engine.worker import EngineWorker

T = [Target("en", "en")]


@dataclass
class FakeEngine:
    """Encodes instantly, 'decodes' by sleeping ``cost`` per request; the text is the request's id."""

    cost: float = 0.05
    ran: list[str] = field(default_factory=list)
    batches: list[list[str]] = field(default_factory=list)
    last_stats: DecodeStats = field(default_factory=DecodeStats)
    twin_cost: float | None = None  # set: it has an "int8 twin" (partial_dtype auto) of that cost
    twin: FakeEngine | None = None
    quantized = None

    @property
    def device(self):
        import torch

        return torch.device("cpu")

    @property
    def dtype(self):
        import torch

        return torch.float32

    def int8_twin(self):
        assert self.twin_cost is not None
        self.twin = FakeEngine(cost=self.twin_cost)
        return self.twin

    def resolve_window(self, window):
        return "exact"

    def check_target(self, target):
        pass

    def encode(self, audios, window="exact"):
        import torch

        ids = [str(int(a[0])) for a in audios]
        self.batches.append(ids)
        return EncodedBatch(torch.zeros(len(audios), 1, 1), None, [1.0] * len(audios), window, [1] * len(audios))

    def decode(self, encoded, rows, max_new_tokens=None, should_stop=None, drafts=None):
        end = time.monotonic() + self.cost * len(encoded)
        while time.monotonic() < end:  # "decoder steps" of 10 ms, polling should_stop like the engine
            if should_stop is not None and should_stop():
                raise DecodeInterrupted("stopped")
            time.sleep(0.01)
        ids = self.batches[-1]
        self.ran.extend(ids)
        self.last_stats = DecodeStats(steps=1, rows=len(rows), batch_sizes=[len(rows)])
        return [Hypothesis([], ids[u], target) for u, target in rows]


def audio(request_id: int) -> np.ndarray:
    return np.full(160, request_id, dtype=np.float32)


async def test_finals_go_first_in_deadline_order_then_partials():
    engine = FakeEngine(cost=0.01)
    worker = EngineWorker(engine, max_batch_utterances=1, batch_window_ms=0)
    partial = worker.submit(audio(1), T, "partial", key="a")
    finals = [worker.submit(audio(i), T, "final") for i in (2, 3, 4)]
    worker.start()
    try:
        await asyncio.gather(partial, *finals)
    finally:
        worker.stop()
    assert engine.ran == ["2", "3", "4", "1"]  # finals by deadline (= arrival order), the partial last
    assert all(h[0].queued_ms >= 0 and h[0].compute_ms >= 0 for h in [await f for f in finals])


async def test_partials_pause_while_finals_would_miss_their_deadline():
    # Each request costs 0.2 s and finals are due 0.5 s after arrival: with three finals queued
    # there is no room for a partial in their batch, although the batch has free slots.
    engine = FakeEngine(cost=0.2)
    worker = EngineWorker(engine, max_batch_utterances=4, batch_window_ms=50, final_deadline_ms=500)
    worker.start()
    try:
        await worker.transcribe(audio(0), T, "final")  # teaches the worker what a final costs
        finals = [worker.submit(audio(i), T, "final") for i in (1, 2, 3)]
        partial = worker.submit(audio(9), T, "partial", key="s")
        await asyncio.gather(*finals, partial)
    finally:
        worker.stop()
    assert engine.batches == [["0"], ["1", "2", "3"], ["9"]]
    assert worker.stats.deferred > 0  # the partial was considered and left queued


async def test_partials_fill_spare_capacity_next_to_finals():
    engine = FakeEngine(cost=0.01)
    worker = EngineWorker(engine, max_batch_utterances=4, batch_window_ms=0, final_deadline_ms=5000)
    futures = [worker.submit(audio(1), T, "final"), worker.submit(audio(2), T, "partial", key="x")]
    worker.start()
    try:
        await asyncio.gather(*futures)
    finally:
        worker.stop()
    assert engine.batches == [["1", "2"]] and worker.stats.deferred == 0


async def test_a_late_final_starts_an_overload_episode_logged_once(caplog):
    engine = FakeEngine(cost=0.15)
    worker = EngineWorker(engine, max_batch_utterances=1, batch_window_ms=0, final_deadline_ms=200)
    seen = []
    with caplog.at_level(logging.WARNING, logger="streamsed.engine.worker"):
        worker.start()
        try:
            futures = [worker.submit(audio(i), T, "final") for i in range(6)]
            partials = [worker.submit(audio(10 + i), T, "partial", key=i) for i in range(2)]
            while not all(f.done() for f in futures):
                seen.append(worker.overloaded)
                await asyncio.sleep(0.02)
            await asyncio.gather(*partials)
        finally:
            worker.stop()
    assert True in seen  # finals 2.. waited past 0.2 s
    assert not worker.overloaded  # and it ended once they were answered
    assert worker.stats.overload_episodes == 1
    starts = [r for r in caplog.records if r.getMessage().startswith("overloaded:")]
    ends = [r for r in caplog.records if r.getMessage().startswith("overload over")]
    assert len(starts) == 1 and len(ends) == 1
    assert engine.ran[:6] == [str(i) for i in range(6)]  # partials only after the backlog
    assert worker.stats.max_final_wait_seconds > 0.2


@pytest.mark.parametrize("deadline", [0, -5])
def test_the_deadline_must_be_positive(deadline):
    with pytest.raises(ValueError, match="final_deadline_ms"):
        EngineWorker(FakeEngine(), final_deadline_ms=deadline)


async def test_an_overload_episode_ends_when_the_queue_drains_even_if_nothing_else_comes():
    engine = FakeEngine(cost=0.15)
    worker = EngineWorker(engine, max_batch_utterances=1, batch_window_ms=0, final_deadline_ms=100)
    worker.start()
    try:
        futures = [worker.submit(audio(i), T, "final") for i in range(4)]
        seen = []
        while not all(f.done() for f in futures):
            seen.append(worker.overloaded)
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # the worker is idle now, waiting for work
        assert True in seen and not worker.overloaded  # new streams are admitted again
    finally:
        worker.stop()


async def test_a_batch_with_a_final_takes_only_the_partials_that_fit_its_deadline():
    engine = FakeEngine(cost=0.1)
    worker = EngineWorker(engine, max_batch_utterances=16, batch_window_ms=50, final_deadline_ms=500)
    worker.start()
    try:
        await worker.transcribe(audio(0), T, "final")  # teaches the costs: 0.1 s a final
        await worker.transcribe(audio(1), T, "partial", key="warm")  # and 0.1 s a partial
        futures = [worker.submit(audio(2), T, "final")]
        futures += [worker.submit(audio(10 + i), T, "partial", key=i) for i in range(10)]
        await asyncio.gather(*futures)
    finally:
        worker.stop()
    with_final = next(b for b in engine.batches if "2" in b)
    assert 1 <= len(with_final) - 1 <= 4  # about (0.5 s - 0.05 s - 0.1 s) / 0.1 s partials, not all 10
    assert sorted(engine.ran[2:], key=int) == ["2"] + [str(10 + i) for i in range(10)]  # the rest ran later


@pytest.mark.parametrize("deadline_ms, preempted", [(2000, 0), (250, 1)])
async def test_a_partial_batch_yields_to_a_final_only_when_the_final_would_be_late(deadline_ms, preempted):
    engine = FakeEngine(cost=0.3)
    worker = EngineWorker(engine, max_batch_utterances=1, batch_window_ms=0, final_deadline_ms=deadline_ms)
    worker.start()
    try:
        await worker.transcribe(audio(0), T, "final")  # the costs are known from here on
        await worker.transcribe(audio(1), T, "partial", key="warm")
        partial = worker.submit(audio(2), T, "partial", key="s")
        await asyncio.sleep(0.1)  # the partial is decoding
        final = worker.submit(audio(3), T, "final")
        results = await asyncio.gather(partial, final)
    finally:
        worker.stop()
    assert worker.stats.preempted == preempted
    assert (results[0] is None) == bool(preempted) and results[1] is not None


async def test_file_segments_come_after_finals_and_partials_and_are_never_superseded():
    engine = FakeEngine(cost=0.01)
    worker = EngineWorker(engine, max_batch_utterances=1, batch_window_ms=0)
    files = [worker.submit(audio(i), T, "file", key="job") for i in (1, 2)]
    partial = worker.submit(audio(3), T, "partial", key="job")  # a key shared with file work supersedes nothing
    final = worker.submit(audio(4), T, "final")
    worker.start()
    try:
        results = await asyncio.gather(*files, partial, final)
    finally:
        worker.stop()
    assert engine.ran == ["4", "3", "1", "2"]
    assert [r[0].text for r in results] == ["1", "2", "3", "4"]  # every file segment answered, none dropped


async def test_a_long_file_never_holds_a_live_final_back_by_more_than_the_running_batch():
    """200 file segments queued at once; live finals keep arriving. Each final runs in the batch
    after the one running when it came: at most ``max_batch_utterances`` file segments before it."""
    engine = FakeEngine(cost=0.005)
    worker = EngineWorker(engine, max_batch_utterances=2, batch_window_ms=0)
    worker.start()
    try:
        job = [worker.submit(audio(1000 + i), T, "file") for i in range(200)]
        marks = {}
        finals = []
        for i in range(8):
            await asyncio.sleep(0.03)
            marks[str(i)] = len(engine.ran)
            finals.append(worker.submit(audio(i), T, "final"))
        await asyncio.gather(*finals)
        assert sum(f.done() for f in job) < len(job), "the file finished before the finals: nothing was tested"
        await asyncio.gather(*job)
    finally:
        worker.stop()
    for final_id, mark in marks.items():
        assert engine.ran.index(final_id) <= mark + 2, (final_id, mark, engine.ran[mark : mark + 4])
    assert worker.stats.requests == 208


async def test_with_no_final_queued_a_partial_batch_stays_short_enough_for_a_final_to_be_on_time():
    # Deadline 1 s, 0.1 s a request: a final arriving just after a partial batch starts must still be
    # on time with half its deadline to spare, so a batch holds at most (0.5 s - 0.1 s) / 0.1 s = 4.
    engine = FakeEngine(cost=0.1)
    worker = EngineWorker(engine, max_batch_utterances=16, batch_window_ms=20, final_deadline_ms=1000)
    worker.start()
    try:
        await worker.transcribe(audio(0), T, "final")  # teaches the costs
        await worker.transcribe(audio(1), T, "partial", key="warm")
        await asyncio.gather(*(worker.submit(audio(10 + i), T, "partial", key=i) for i in range(10)))
    finally:
        worker.stop()
    sizes = [len(b) for b in engine.batches[2:]]
    assert sum(sizes) == 10 and max(sizes) <= 4 and len(sizes) >= 3


async def test_an_idle_engine_runs_one_partial_even_when_it_costs_more_than_the_budget():
    engine = FakeEngine(cost=0.3)  # a final alone takes more than half the 0.4 s deadline
    worker = EngineWorker(engine, max_batch_utterances=16, batch_window_ms=20, final_deadline_ms=400)
    worker.start()
    try:
        await worker.transcribe(audio(0), T, "final")
        await worker.transcribe(audio(1), T, "partial", key="warm")
        results = await asyncio.gather(*(worker.submit(audio(10 + i), T, "partial", key=i) for i in range(3)))
    finally:
        worker.stop()
    assert [len(b) for b in engine.batches[2:]] == [1, 1, 1] and all(r is not None for r in results)


async def test_partials_of_segments_that_showed_nothing_go_first_then_the_stalest():
    engine = FakeEngine(cost=0.01)
    worker = EngineWorker(engine, max_batch_utterances=1, batch_window_ms=0)
    now = time.monotonic()
    futures = [worker.submit(audio(1), T, "partial", key="a", shown=now - 1.0),  # shown 1 s ago
               worker.submit(audio(2), T, "partial", key="b", shown=now - 3.0),  # shown 3 s ago: stalest
               worker.submit(audio(3), T, "partial", key="c"),  # nothing shown yet
               worker.submit(audio(4), T, "partial", key="d")]  # nothing shown yet, submitted later
    worker.start()
    try:
        await asyncio.gather(*futures)
    finally:
        worker.stop()
    assert engine.ran == ["3", "4", "2", "1"]


@dataclass
class LaneEngine(FakeEngine):
    """A FakeEngine whose replicas record into the same lists (one per worker lane)."""

    def replica(self):
        twin = LaneEngine(cost=self.cost)
        twin.ran, twin.batches = self.ran, self.batches
        return twin

    def encode(self, audios, window="exact"):
        encoded = super().encode(audios, window)
        self.mine = [str(int(a[0])) for a in audios]  # not batches[-1]: the other lane may have appended since
        self.ran.append("start " + self.mine[0])
        return encoded

    def decode(self, encoded, rows, max_new_tokens=None, should_stop=None, drafts=None):
        end = time.monotonic() + self.cost * len(encoded)
        while time.monotonic() < end:
            if should_stop is not None and should_stop():
                raise DecodeInterrupted("stopped")
            time.sleep(0.01)
        self.ran.extend(self.mine)
        self.last_stats = DecodeStats(steps=1, rows=len(rows), batch_sizes=[len(rows)])
        return [Hypothesis([], self.mine[u], target) for u, target in rows]


async def test_with_two_lanes_a_final_takes_the_idle_lane_instead_of_preempting_a_partial():
    # With one lane this deadline preempts the running partial (test above); with two, the idle
    # lane takes the final at once and the partial finishes.
    engine = LaneEngine(cost=0.3)
    worker = EngineWorker(engine, max_batch_utterances=16, batch_window_ms=0, final_deadline_ms=250, lanes=2)
    worker.start()
    try:
        await worker.transcribe(audio(0), T, "final")
        await worker.transcribe(audio(1), T, "partial", key="warm")
        partial = worker.submit(audio(2), T, "partial", key="s")
        await asyncio.sleep(0.1)  # the partial is decoding on one lane
        final = worker.submit(audio(3), T, "final")
        results = await asyncio.gather(partial, final)
    finally:
        worker.stop()
    assert worker.stats.preempted == 0 and all(r is not None for r in results)
    assert engine.ran.index("start 3") < engine.ran.index("2")  # the final started while the partial ran


async def test_cpu_lanes_split_the_queued_finals_and_take_no_partials_beside_them():
    engine = LaneEngine(cost=0.05)
    worker = EngineWorker(engine, max_batch_utterances=16, batch_window_ms=0, lanes=2)
    futures = [worker.submit(audio(i), T, "final") for i in range(6)]
    futures.append(worker.submit(audio(9), T, "partial", key="p"))
    worker.start()
    try:
        await asyncio.gather(*futures)
        one = await worker.transcribe(audio(7), T, "final")  # a final queued alone runs alone
    finally:
        worker.stop()
    finals = [b for b in engine.batches[:-1] if b != ["9"]]
    assert sorted(len(b) for b in finals) == [1, 2, 3]  # 6 queued: 3 for one lane, 2 of the rest for the other, 1
    assert [r for b in finals for r in b] == [str(i) for i in range(6)]  # by deadline
    assert ["9"] in engine.batches and engine.batches[-1] == ["7"] and one[0].text == "7"


async def test_file_work_that_waited_a_deadline_goes_before_partials():
    # Partials keep coming (a live stream re-submits as soon as one is answered); file work must not starve.
    engine = FakeEngine(cost=0.05)
    worker = EngineWorker(engine, max_batch_utterances=1, batch_window_ms=0, final_deadline_ms=200)
    worker.start()
    try:
        job = worker.submit(audio(1), T, "file")
        for i in range(12):  # 12 partials one after another, about 0.6 s of work
            await worker.transcribe(audio(10 + i % 2), T, "partial", key="live")
            if job.done():
                break
        assert job.done() and (await job)[0].text == "1"
    finally:
        worker.stop()
    assert engine.ran.index("1") <= 5  # after about one deadline (0.2 s) of partials, not after all of them


async def test_when_both_lanes_run_partials_one_of_them_yields_to_a_final():
    engine = LaneEngine(cost=0.4)
    worker = EngineWorker(engine, max_batch_utterances=16, batch_window_ms=0, final_deadline_ms=300, lanes=2)
    worker.start()
    try:
        await worker.transcribe(audio(0), T, "final")  # the costs: 0.4 s each, more than the deadline allows
        await worker.transcribe(audio(1), T, "partial", key="warm")
        partials = [worker.submit(audio(2 + i), T, "partial", key=i) for i in range(2)]
        await asyncio.sleep(0.1)  # one partial decoding on each lane
        final = worker.submit(audio(5), T, "final")
        results = await asyncio.gather(*partials, final)
    finally:
        worker.stop()
    assert worker.stats.preempted == 1  # one lane made room; the other partial finished
    assert sum(r is None for r in results[:2]) == 1 and results[2] is not None


async def test_int8_first_partials_run_on_the_twin_and_each_kind_is_priced_at_its_own_cost():
    engine = FakeEngine(cost=0.08, twin_cost=0.02)
    worker = EngineWorker(engine, max_batch_utterances=1, batch_window_ms=0, partial_dtype="auto")
    assert worker.partial_dtype == "int8-first"
    shown = time.monotonic()
    firsts = [worker.submit(audio(i), T, "partial", key=f"first{i}") for i in (1, 2)]
    laters = [worker.submit(audio(i), T, "partial", key=f"later{i}", shown=shown) for i in (3, 4)]
    worker.start()
    try:
        await asyncio.gather(*firsts, *laters)
    finally:
        worker.stop()
    assert engine.twin.ran == ["1", "2"] and engine.ran == ["3", "4"]  # a segment's first on the twin
    assert worker.stats.int8_partials == 2
    assert 0 < worker.costs["partial_int8"] < worker.costs["partial"]

    # A batch's room is filled request by request at each one's own cost: two twin partials (0.02 s
    # each) and one float partial (0.08 s) fit in 0.13 s, a second float one does not.
    worker = EngineWorker(FakeEngine(cost=0.08, twin_cost=0.02), max_batch_utterances=8, partial_dtype="auto")
    worker._cost.update(partial=0.08, partial_int8=0.02)
    futures = [worker.submit(audio(i), T, "partial", key=i) for i in (1, 2)]
    futures += [worker.submit(audio(i), T, "partial", key=i, shown=shown) for i in (3, 4)]
    waiting = sorted(worker._pending, key=lambda r: (r.shown is not None, r.submitted))
    assert worker._fits(0.13, waiting) == 3
    assert worker._fits(0.03, waiting) == 1
    worker.stop()  # never started: it drains the queue
    await asyncio.gather(*futures)
