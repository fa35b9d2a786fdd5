"""Fan-out of a stream's partial/final events to any number of caption listeners.

Publishing is synchronous and never waits for a listener: each listener has its own queue that
its connection drains at its own pace. Drop policy, per listener:

* up to ``queue_size`` events are queued;
* when the queue is full, a new event first evicts the oldest queued *partial* (partials are
  superseded by later partials and by the final anyway); a new partial with no partial to evict
  is dropped itself;
* finals are never dropped: when the queue holds only finals, a final is queued beyond
  ``queue_size``. Such a backlog only builds while a listener reads slower than finals arrive
  (one per utterance and target); a listener that stops reading altogether is disconnected by
  the websocket keepalive (ping timeout), not by dropping its finals.

A listener may subscribe before its stream has started, and stays subscribed across stream
restarts (a new ingest connection with the same stream id).

Other edges (MQTT) register an *observer*: a plain callable that gets every caption event and must
not block. The hub also keeps each stream's finals (up to ``MAX_FINALS_KEPT``) for caption export.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict, deque
from collections.abc import Callable

from ..core.protocol import CAPTION_EVENTS

log = logging.getLogger(__name__)

MAX_FINALS_KEPT = 10_000  # per stream: hours of captions, bounded memory
MAX_STREAMS_KEPT = 1_000  # streams whose finals are kept; the least recently active idle one goes first


class Listener:
    """One subscriber's queue; ``await get()`` returns events in order, None once closed and drained."""

    def __init__(self, stream: str, target_lang: str | None, queue_size: int):
        self.stream = stream
        self.target_lang = target_lang
        self.queue_size = queue_size
        self.dropped_partials = 0
        self._queue: deque[dict] = deque()
        self._wakeup = asyncio.Event()
        self._closed = False

    def wants(self, event: dict) -> bool:
        return self.target_lang is None or event.get("target_lang") == self.target_lang

    def offer(self, event: dict) -> None:
        if self._closed:
            return
        if len(self._queue) >= self.queue_size:
            oldest_partial = next((e for e in self._queue if e["type"] == "partial"), None)
            if oldest_partial is not None:
                self._queue.remove(oldest_partial)
                self.dropped_partials += 1
            elif event["type"] == "partial":
                self.dropped_partials += 1
                return
        self._queue.append(event)
        self._wakeup.set()

    def close(self) -> None:
        """No more events; get() returns what is queued, then None."""
        self._closed = True
        self._wakeup.set()

    def __len__(self) -> int:
        return len(self._queue)

    async def get(self) -> dict | None:
        while not self._queue:
            if self._closed:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        return self._queue.popleft()


class CaptionsHub:
    """Listeners per stream id, plus which stream ids currently have an ingest connection."""

    def __init__(self, queue_size: int = 64):
        self.queue_size = queue_size
        self._listeners: dict[str, set[Listener]] = defaultdict(set)
        self._live: set[str] = set()
        self._observers: list[Callable[[dict], None]] = []
        self._finals: dict[str, deque[dict]] = {}  # insertion order = least recently active first
        self.dropped: dict[str, int] = {}  # finals the hallucination guard rejected, by reason
        self.event_hook: Callable[[dict], None] | None = None  # sees every event of every stream (metrics)

    def add_observer(self, observer: Callable[[dict], None]) -> None:
        """Call ``observer(event)`` for every partial/final of every stream (it must not block)."""
        self._observers.append(observer)

    def _keep_final(self, event: dict) -> None:
        stream = event["stream"]
        kept = self._finals.pop(stream, None) or deque(maxlen=MAX_FINALS_KEPT)
        kept.append(event)
        self._finals[stream] = kept  # re-inserted: now the most recently active
        if len(self._finals) > MAX_STREAMS_KEPT:
            idle = next((s for s in self._finals if s not in self._live), None)
            if idle is not None:
                del self._finals[idle]

    def finals(self, stream: str) -> list[dict]:
        """The stream's finals so far, in the order they were produced."""
        return list(self._finals.get(stream, ()))

    def streams(self) -> list[str]:
        """Stream ids that have produced finals or are being ingested now."""
        return sorted(set(self._finals) | self._live)

    def subscribe(self, stream: str, target_lang: str | None = None) -> Listener:
        listener = Listener(stream, target_lang, self.queue_size)
        self._listeners[stream].add(listener)
        return listener

    def unsubscribe(self, listener: Listener) -> None:
        listener.close()
        listeners = self._listeners.get(listener.stream)
        if listeners is not None:
            listeners.discard(listener)
            if not listeners:
                del self._listeners[listener.stream]

    def listener_count(self) -> int:
        return sum(len(listeners) for listeners in self._listeners.values())

    def listeners(self, stream: str) -> list[Listener]:
        return list(self._listeners.get(stream, ()))

    def publish(self, event: dict) -> None:
        """Queue a partial/final for every interested listener of its stream; other events are ignored."""
        if self.event_hook is not None:
            try:
                self.event_hook(event)
            except Exception:
                log.exception("event hook failed")
        if event.get("type") not in CAPTION_EVENTS:
            return
        dropped = event["type"] == "final" and event.get("dropped")
        if dropped:  # not speech (core/guard.py): no export, no MQTT; listeners only learn to clear the line
            self.dropped[dropped] = self.dropped.get(dropped, 0) + 1
        elif event["type"] == "final":
            self._keep_final(event)
        for observer in () if dropped else self._observers:
            try:
                observer(event)
            except Exception:  # an edge's bug must not cost the websocket listeners their captions
                log.exception("caption observer %r failed", observer)
        for listener in self._listeners.get(event["stream"], ()):
            if listener.wants(event):
                listener.offer(event)

    def claim(self, stream: str) -> bool:
        """Reserve ``stream`` for one ingest connection; False when another one holds it."""
        if stream in self._live:
            return False
        self._live.add(stream)
        return True

    def release(self, stream: str) -> None:
        self._live.discard(stream)

    def close_all(self) -> None:
        """Shutdown: every listener gets what is queued, then None."""
        for listeners in self._listeners.values():
            for listener in listeners:
                listener.close()
