"""MQTT edge: partials, finals and captions to a broker, Home Assistant discovery, and a control
topic that changes a live stream's targets. Topics and payloads are documented in docs/mqtt.md.

How it works:

* The CaptionsHub calls ``_on_event`` synchronously for every partial/final of every stream. It only
  turns the event into outbound messages and appends them to a bounded deque: no I/O, no waiting.
* One task owns the broker connection. It connects with the Last Will ``offline`` (retained) on
  ``<prefix>/status``, publishes ``online`` (retained), subscribes to the control topics and to Home
  Assistant's birth topic, then runs a sender (drains the deque in order, one publish at a time) and
  a receiver (control and birth messages) until the connection drops. Then it waits, with
  exponential backoff and jitter, and connects again, for as long as the daemon runs.
* Delivery is at least once: a message leaves the deque only once its publish completed (PUBACK at
  QoS 1); one cut off by a disconnect goes back to the front and is sent again after the reconnect.
  Consumers dedupe finals by ``stream`` + ``segment`` + ``target_lang``. Partials are not queued
  while disconnected (they would be stale). Beyond ``queue_size`` the oldest partial, else the
  oldest message, is dropped, counted in ``stats`` and logged.
* ``stop()`` (daemon shutdown, after the sessions' last finals) waits up to ``flush_timeout_s`` for
  the deque to drain, publishes ``offline`` (retained) and disconnects cleanly, so the broker does
  not publish the will as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import re
import socket
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aiomqtt

from .. import __version__
from ..core.languages import UnsupportedTarget
from ..core.protocol import ProtocolError, encode, parse_languages
from .config import ConfigError, MqttConfig

if TYPE_CHECKING:
    from .server import Daemon

log = logging.getLogger(__name__)

ONLINE, OFFLINE = "online", "offline"
HA_STATE_MAX = 250  # Home Assistant refuses states over 255 characters
CONNECT_TIMEOUT_S = 10.0  # CONNACK, SUBACK, PUBACK and clean-disconnect waits
_HA_ID = re.compile(r"[^A-Za-z0-9_-]")  # Home Assistant's node_id / object_id alphabet
_TOPIC_UNSAFE = re.compile(r"[/+#\x00]")
_AUTO_STREAM_ID = re.compile(r"^s-[0-9a-f]{12}$")  # protocol.start_options' id for unnamed streams
# CONNACK codes of a refused login: MQTT 3.1.1 (4, 5) and MQTT 5 / paho reason codes (134, 135).
_LOGIN_REFUSED = {4, 5, 134, 135}


@dataclass(frozen=True)
class Outbound:
    topic: str
    payload: str
    qos: int
    retain: bool
    durable: bool = True  # False: a partial, which may be dropped


@dataclass
class MqttStats:
    connect_attempts: int = 0
    connects: int = 0
    published: int = 0
    dropped: int = 0  # durable messages dropped because the queue went over queue_size
    dropped_partials: int = 0  # partials dropped (disconnected, or evicted from a full queue)
    control_errors: int = 0


class ControlError(Exception):
    """A rejected control message; published on ``<prefix>/error``."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def default_node_id() -> str:
    return ha_id(socket.gethostname().split(".")[0].lower())[:64] or "streamsed"


def ha_id(text: str) -> str:
    """``text`` with every character Home Assistant does not allow in discovery ids replaced by ``_``."""
    return _HA_ID.sub("_", text)


def object_id(stream: str, target_lang: str) -> str:
    """``<stream>_<lang>`` as a discovery object id; a short hash keeps sanitized ids apart."""
    raw = f"{stream}_{target_lang}"
    safe = ha_id(raw)
    return safe if safe == raw else f"{safe}_{hashlib.sha1(raw.encode()).hexdigest()[:6]}"


def ha_state(text: str) -> str:
    """A caption as a Home Assistant sensor state: at most HA_STATE_MAX characters."""
    return text if len(text) <= HA_STATE_MAX else text[: HA_STATE_MAX - 1] + "…"


class MqttEdge:
    """The daemon's MQTT edge: ``await start(daemon)`` once the model is ready, ``await stop()`` at exit.

    Raises ConfigError at construction for a password or TLS file that cannot be read.
    """

    def __init__(self, config: MqttConfig):
        self.config = config
        self.node_id = config.node_id or default_node_id()
        self.prefix = config.topic_prefix or f"streamsed/{self.node_id}"
        self.client_id = config.client_id or f"streamsed-{self.node_id}"
        self.status_topic = f"{self.prefix}/status"
        self.error_topic = f"{self.prefix}/error"
        self.ha_status_topic = f"{config.ha_prefix}/status"
        self._password = self._read_password()
        self._tls = self._tls_parameters()
        self.stats = MqttStats()
        self.connected = False
        self._queue: deque[Outbound] = deque()
        self._inflight: Outbound | None = None
        self._wakeup = asyncio.Event()  # the queue got a message
        self._wake = asyncio.Event()  # stop waiting to reconnect
        self._stopping = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._daemon: Daemon | None = None
        self._entities: dict[tuple[str, str], Outbound] = {}  # discovery config per (stream, lang)
        self._attempt = 0  # failed connection attempts in a row
        self._delay = 0.0  # before the next attempt
        self._last_failure: str | None = None
        self._dropped_logged = 0

    # -- settings -------------------------------------------------------------------------------
    def _read_password(self) -> str | None:
        if not self.config.password_file:
            return self.config.password or None
        path = Path(self.config.password_file).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or error
            raise ConfigError(f"[mqtt] password_file {path} cannot be read ({reason})") from None
        if not lines or not lines[0]:
            raise ConfigError(f"[mqtt] password_file {path} is empty (the password is its first line)")
        return lines[0]

    def _tls_parameters(self) -> aiomqtt.TLSParameters | None:
        if not self.config.tls:
            return None
        for key in ("tls_ca", "tls_cert", "tls_key"):
            value = getattr(self.config, key)
            if value and not Path(value).expanduser().is_file():
                raise ConfigError(f"[mqtt] {key} {value}: file not found")

        def path(value: str) -> str | None:
            return str(Path(value).expanduser()) if value else None

        return aiomqtt.TLSParameters(
            ca_certs=path(self.config.tls_ca), certfile=path(self.config.tls_cert), keyfile=path(self.config.tls_key)
        )

    @property
    def where(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    def topic(self, stream: str, target_lang: str, kind: str) -> str:
        """``<prefix>/<stream>/<target_lang>/<kind>``; kind is partial, final, caption or state."""
        return f"{self.prefix}/{_TOPIC_UNSAFE.sub('_', stream)}/{target_lang}/{kind}"

    def discovery_topic(self, stream: str, target_lang: str) -> str:
        return f"{self.config.ha_prefix}/sensor/{self.node_id}/{object_id(stream, target_lang)}/config"

    @property
    def queued(self) -> int:
        """Messages not yet confirmed by the broker."""
        return len(self._queue) + (self._inflight is not None)

    # -- Edge -----------------------------------------------------------------------------------
    async def start(self, daemon: Daemon) -> None:
        self._daemon = daemon
        daemon.hub.add_observer(self._on_event)
        self._task = asyncio.create_task(self._run(), name="mqtt-edge")
        log.info("MQTT: publishing to %s under %s/ as client %s", self.where, self.prefix, self.client_id)

    async def stop(self) -> None:
        """Deliver what is queued (up to flush_timeout_s), publish ``offline``, disconnect."""
        if self._task is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.flush_timeout_s
        self._wake.set()  # waiting to reconnect? try now: the queue may still get through
        while self.queued and not self._task.done() and loop.time() < deadline:
            await asyncio.sleep(0.02)
        if self.queued:
            log.warning("MQTT: %d messages were not delivered before shutdown (broker %s %s, flush_timeout_s = %g)",
                        self.queued, self.where, "connected" if self.connected else "unreachable",
                        self.config.flush_timeout_s)
        self._stopping.set()
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), CONNECT_TIMEOUT_S + 1)
        except TimeoutError:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    # -- events in ------------------------------------------------------------------------------
    def _on_event(self, event: dict) -> None:
        """CaptionsHub observer: queue the messages for one partial/final (never blocks)."""
        kind, stream = event.get("type"), event.get("stream")
        if kind not in ("partial", "final") or not isinstance(stream, str):
            return
        lang = event.get("target_lang") or "und"
        if self.config.ha_discovery and (stream, lang) not in self._entities and not _AUTO_STREAM_ID.match(stream):
            self._entities[(stream, lang)] = announcement = self._discovery(stream, lang)
            self._enqueue(announcement)
        payload = encode(event)
        if kind == "partial":
            if not self.connected:
                self.stats.dropped_partials += 1  # stale by the time the broker is back
                return
            self._enqueue(Outbound(self.topic(stream, lang, "partial"), payload, self.config.qos_partial, False,
                                   durable=False))
            return
        qos = self.config.qos_final
        self._enqueue(Outbound(self.topic(stream, lang, "final"), payload, qos, False))
        self._enqueue(Outbound(self.topic(stream, lang, "caption"), payload, qos, True))
        if (stream, lang) in self._entities:
            self._enqueue(Outbound(self.topic(stream, lang, "state"), ha_state(str(event.get("text", ""))), qos, True))

    def _enqueue(self, message: Outbound) -> None:
        self._queue.append(message)
        if len(self._queue) > self.config.queue_size:
            self._drop_oldest()
        self._wakeup.set()

    def _drop_oldest(self) -> None:
        partial = next((m for m in self._queue if not m.durable), None)
        if partial is not None:
            self._queue.remove(partial)
            self.stats.dropped_partials += 1
            return
        victim = self._queue.popleft()
        self.stats.dropped += 1
        if self.stats.dropped - self._dropped_logged == 1 or self.stats.dropped % 100 == 0:
            log.warning("MQTT: %d messages queued (queue_size) while the broker %s is unreachable: dropped the "
                        "oldest (%s); %d dropped so far", len(self._queue), self.where, victim.topic,
                        self.stats.dropped)

    # -- Home Assistant -------------------------------------------------------------------------
    def _discovery(self, stream: str, lang: str) -> Outbound:
        """The retained discovery config of the sensor that shows ``stream``'s last ``lang`` caption."""
        engine = getattr(self._daemon, "engine", None)
        config = {
            "name": f"{stream} {lang}",
            "unique_id": f"streamsed_{self.node_id}_{object_id(stream, lang)}",
            "state_topic": self.topic(stream, lang, "state"),
            "json_attributes_topic": self.topic(stream, lang, "caption"),
            "availability_topic": self.status_topic,
            "payload_available": ONLINE,
            "payload_not_available": OFFLINE,
            "qos": self.config.qos_final,
            "icon": "mdi:closed-caption",
            "device": {
                "identifiers": [f"streamsed_{self.node_id}"],
                "name": f"streamsed {self.node_id}",
                "manufacturer": "streamsed",
                "model": f"speech translation ({getattr(engine, 'name', 'model')})",
                "sw_version": __version__,
            },
            "origin": {"name": "streamsed", "sw_version": __version__},
        }
        return Outbound(self.discovery_topic(stream, lang), json.dumps(config, ensure_ascii=False), 1, True)

    def _announce_all(self) -> None:
        for announcement in self._entities.values():
            self._enqueue(announcement)

    # -- connection -----------------------------------------------------------------------------
    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self._connection()
            except aiomqtt.MqttError as error:
                if not self._stopping.is_set():
                    self._report_failure(error, self.connected, self._next_delay())
            except Exception:  # a bug: log it, keep the edge alive
                log.exception("MQTT: the connection to %s failed unexpectedly", self.where)
                self._next_delay()
            finally:
                self.connected = False
            if self._stopping.is_set():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._delay)
            self._wake.clear()

    def _next_delay(self) -> float:
        """Exponential backoff with jitter: uniformly in [ceiling/2, ceiling], ceiling doubling."""
        ceiling = min(self.config.reconnect_max_s, self.config.reconnect_min_s * 2 ** min(self._attempt, 30))
        self._attempt += 1
        self._delay = ceiling / 2 + random.uniform(0, ceiling / 2)
        return self._delay

    def _report_failure(self, error: aiomqtt.MqttError, was_connected: bool, delay: float) -> None:
        if was_connected:
            log.warning("MQTT: lost the connection to %s (%s); reconnecting in %.3g s, %d messages queued",
                        self.where, error, delay, self.queued)
            return
        code = getattr(getattr(error, "rc", None), "value", getattr(error, "rc", None))
        if isinstance(error, aiomqtt.MqttCodeError) and code in _LOGIN_REFUSED:
            user = self.config.username or "(anonymous)"
            log.error("MQTT: broker %s refused the login of user %s (%s): check [mqtt] username and "
                      "password/password_file; retrying in %.3g s", self.where, user, error, delay)
            return
        text = str(error)
        level = logging.WARNING if text != self._last_failure else logging.DEBUG
        self._last_failure = text
        log.log(level, "MQTT: cannot connect to broker %s (%s); retrying in %.3g s (backoff up to %g s), "
                "%d messages queued", self.where, text, delay, self.config.reconnect_max_s, self.queued)

    def _client(self) -> aiomqtt.Client:
        return aiomqtt.Client(
            self.config.host, self.config.port,
            username=self.config.username or None, password=self._password, identifier=self.client_id,
            will=aiomqtt.Will(self.status_topic, OFFLINE, qos=1, retain=True),
            keepalive=self.config.keepalive_s, tls_params=self._tls, timeout=CONNECT_TIMEOUT_S,
        )

    async def _connection(self) -> None:
        """One connection: returns after a clean stop, raises MqttError when it fails or drops."""
        self.stats.connect_attempts += 1
        async with self._client() as client:
            self.connected = True
            self._attempt = 0
            self._last_failure = None
            self.stats.connects += 1
            log.info("MQTT: connected to %s as %s; %d messages queued", self.where, self.client_id, self.queued)
            if self.stats.dropped > self._dropped_logged:
                log.warning("MQTT: %d messages were dropped while the broker was unreachable (queue_size = %d)",
                            self.stats.dropped - self._dropped_logged, self.config.queue_size)
                self._dropped_logged = self.stats.dropped
            await client.publish(self.status_topic, ONLINE, qos=1, retain=True)
            filters = [(f"{self.prefix}/+/set", 1)]
            if self.config.ha_discovery:
                filters.append((self.ha_status_topic, 1))
            await client.subscribe(filters)
            if self.stats.connects > 1:
                self._announce_all()  # the broker may have restarted without its retained messages
            tasks = [asyncio.create_task(self._send(client)), asyncio.create_task(self._receive(client)),
                     asyncio.create_task(self._stopping.wait())]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            for task in tasks[:2]:
                if task in done and not task.cancelled() and task.exception() is not None:
                    raise task.exception()
            if not self._stopping.is_set():
                raise aiomqtt.MqttError("the message stream ended")
            await client.publish(self.status_topic, OFFLINE, qos=1, retain=True)
            log.info("MQTT: published %s on %s; disconnecting", OFFLINE, self.status_topic)

    async def _send(self, client: aiomqtt.Client) -> None:
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            message = self._queue.popleft()
            self._inflight = message
            try:
                await client.publish(message.topic, message.payload, qos=message.qos, retain=message.retain)
            except BaseException:
                if message.durable:
                    self._queue.appendleft(message)  # sent again after the reconnect
                raise
            finally:
                self._inflight = None
            self.stats.published += 1

    async def _receive(self, client: aiomqtt.Client) -> None:
        control = f"{self.prefix}/+/set"
        async for message in client.messages:
            try:
                if message.topic.matches(self.ha_status_topic):
                    if message.payload == ONLINE.encode():
                        log.info("MQTT: Home Assistant is online: announcing %d sensors", len(self._entities))
                        self._announce_all()
                elif message.topic.matches(control):
                    self._control(message)
            except Exception:  # a bug must not cost the connection
                log.exception("MQTT: handling a message on %s failed", message.topic.value)

    # -- control topic --------------------------------------------------------------------------
    def _control(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        stream = topic[len(self.prefix) + 1: -len("/set")]
        try:
            targets = self._parse_control(message.payload)
            session = self._daemon.sessions.get(stream) if self._daemon is not None else None
            if session is None or session.finished:
                if message.retain:  # a stale retained command for a stream that is not running now
                    log.info("MQTT: ignoring the retained control message on %s (stream not live)", topic)
                    return
                raise ControlError("unknown_stream", f"stream {stream!r} is not live on this daemon")
            try:
                resolved = session.set_targets(targets)
            except UnsupportedTarget as error:
                raise ControlError("unsupported_language", str(error)) from None
        except ControlError as error:
            self.stats.control_errors += 1
            log.warning("MQTT: control message on %s rejected (%s): %s", topic, error.code, error.message)
            payload = {"type": "error", "code": error.code, "message": error.message, "topic": topic}
            self._enqueue(Outbound(self.error_topic, json.dumps(payload, ensure_ascii=False), self.config.qos_final,
                                   False))
            return
        langs = [target.target_lang for target in resolved]
        log.info("MQTT: stream %s now produces %s", stream, langs)
        ack = {"stream": stream, "source_lang": resolved[0].source_lang, "targets": langs}
        self._enqueue(Outbound(f"{self.prefix}/{stream}/targets", json.dumps(ack), self.config.qos_final, False))

    @staticmethod
    def _parse_control(payload: bytes) -> list[str | None]:
        try:
            request = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as error:
            raise ControlError("bad_json", f"the payload is not UTF-8 JSON ({error})") from None
        if not isinstance(request, dict) or set(request) != {"targets"}:
            shown = json.dumps(request, ensure_ascii=False)[:100]
            raise ControlError("bad_option", f'expected {{"targets": ["de", "en"]}}, got {shown}')
        try:
            return parse_languages(None, request["targets"])[1]
        except ProtocolError as error:
            raise ControlError(error.code, error.message) from None
