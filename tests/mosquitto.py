"""A real Mosquitto broker for tests, plus subscribers that record what it delivers.

``Mosquitto(folder)`` writes a config with free loopback ports and ``per_listener_settings true``:

* ``port``: anonymous;
* ``auth_port``: ``password_file`` (made with ``mosquitto_passwd -b``) + ``acl_file``: user
  ``streamsed`` may publish under ``streamsed/#`` and ``homeassistant/#``, user ``viewer`` may only
  read them;
* ``tls_port`` (``tls=True``): TLS with a throwaway CA made by openssl; clients must present a
  certificate signed by it (``client.crt`` / ``client.key`` in the folder).

Persistence is on, so a broker stopped with SIGTERM and started again keeps its retained messages
and the sessions of persistent subscribers (with the messages queued for them meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
HOST = "127.0.0.1"
USERS = {"streamsed": "s3cret-pass", "viewer": "view-only"}
ACL = """\
user streamsed
topic readwrite streamsed/#
topic readwrite homeassistant/#

user viewer
topic read streamsed/#
topic read homeassistant/#
"""


def available() -> bool:
    return Path(MOSQUITTO).is_file() and shutil.which("mosquitto_passwd") is not None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def accepts(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex((HOST, port)) == 0


class Mosquitto:
    """One broker process; ``start()`` returns once every listener accepts connections."""

    def __init__(self, folder: Path, *, tls: bool = False):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port, self.auth_port = free_port(), free_port()
        self.tls_port = free_port() if tls else None
        self.log_path = self.folder / "mosquitto.log"
        self.process: subprocess.Popen | None = None
        passwords = self.folder / "passwd"
        for n, (user, password) in enumerate(USERS.items()):
            create = ["-c"] if n == 0 else []
            subprocess.run(["mosquitto_passwd", *create, "-b", str(passwords), user, password], check=True,
                           capture_output=True)
        (self.folder / "acl").write_text(ACL)
        lines = [
            "user root" if os.geteuid() == 0 else "",  # as root it would switch to "mosquitto", who cannot read tmp
            "per_listener_settings true",
            "persistence true",
            f"persistence_location {self.folder}/",
            "log_dest stderr",
            "log_type error", "log_type warning", "log_type notice", "log_type information",
            "connection_messages true",
            f"listener {self.port} {HOST}",
            "allow_anonymous true",
            f"listener {self.auth_port} {HOST}",
            "allow_anonymous false",
            f"password_file {passwords}",
            f"acl_file {self.folder / 'acl'}",
        ]
        if tls:
            make_certificates(self.folder)
            lines += [
                f"listener {self.tls_port} {HOST}",
                "allow_anonymous true",
                f"cafile {self.folder / 'ca.crt'}",
                f"certfile {self.folder / 'server.crt'}",
                f"keyfile {self.folder / 'server.key'}",
                "require_certificate true",
            ]
        self.config_path = self.folder / "mosquitto.conf"
        self.config_path.write_text("\n".join(lines) + "\n")

    @property
    def ports(self) -> list[int]:
        return [p for p in (self.port, self.auth_port, self.tls_port) if p is not None]

    def start(self, timeout: float = 10.0) -> "Mosquitto":
        assert self.process is None, "already running"
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen([MOSQUITTO, "-c", str(self.config_path)], stdout=log,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not all(accepts(port) for port in self.ports):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"mosquitto did not start:\n{self.log}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """SIGTERM (saves retained messages and sessions), wait, and the ports are free again."""
        if self.process is None:
            return
        process, self.process = self.process, None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def kill(self) -> None:
        if self.process is not None:
            process, self.process = self.process, None
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


def make_certificates(folder: Path) -> None:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate (EC keys: instant)."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=streamsed test CA")
    (folder / "server.ext").write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")
    for name, subject, extra in (("server", "/CN=localhost", ["-extfile", "server.ext"]),
                                 ("client", "/CN=streamsed", [])):
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "2", *extra)


@dataclass(frozen=True)
class Received:
    topic: str
    payload: str
    qos: int
    retain: bool


def received(message: aiomqtt.Message) -> Received:
    return Received(message.topic.value, message.payload.decode(errors="replace"), message.qos, bool(message.retain))


class Recorder:
    """An aiomqtt subscriber recording every message it gets, in the background.

    MQTT 5 with *retain as published* and QoS 2 subscriptions, so each message shows the QoS and retain
    flag it was published with (a plain 3.1.1 subscriber sees retain only on stored messages).
    """

    def __init__(self, port: int, topics=("#",), **client_options):
        self.port, self.topics, self.client_options = port, list(topics), client_options
        self.messages: list[Received] = []
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> "Recorder":
        self._client = aiomqtt.Client(HOST, self.port, protocol=aiomqtt.ProtocolVersion.V5, **self.client_options)
        await self._client.__aenter__()
        options = SubscribeOptions(qos=2, retainAsPublished=True)
        await self._client.subscribe([(topic, options) for topic in self.topics])
        self._task = asyncio.create_task(self._pump())
        return self

    async def _pump(self) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            async for message in self._client.messages:
                self.messages.append(received(message))

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        with contextlib.suppress(aiomqtt.MqttError):
            await self._client.__aexit__(None, None, None)

    async def publish(self, topic: str, payload: str, **options) -> None:
        await self._client.publish(topic, payload, **options)

    def on(self, suffix: str) -> list[Received]:
        """Messages whose topic ends with ``suffix``."""
        return [m for m in self.messages if m.topic.endswith(suffix)]

    async def wait_for(self, predicate, timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate(self.messages):
                await asyncio.sleep(0.02)


class PersistentRecorder:
    """A consumer with a persistent session (clean_session false, QoS 1) that reconnects forever.

    Once its subscription exists, the broker keeps QoS 1 messages for it while it is away, also
    across a broker restart (persistence), as a real home-automation consumer would rely on.
    """

    def __init__(self, port: int, topics, identifier: str = "test-consumer"):
        self.port, self.topics, self.identifier = port, list(topics), identifier
        self.messages: list[Received] = []
        self.connected = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> "PersistentRecorder":
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self.connected.wait(), 10)
        return self

    async def _run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(HOST, self.port, identifier=self.identifier, clean_session=False) as client:
                    await client.subscribe([(topic, 1) for topic in self.topics])
                    self.connected.set()
                    async for message in client.messages:
                        self.messages.append(received(message))
            except aiomqtt.MqttError:
                self.connected.clear()
                await asyncio.sleep(0.05)

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def wait_for(self, predicate, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate(self.messages):
                await asyncio.sleep(0.02)


def mosquitto_sub(port: int, topic: str, *args: str, timeout: float = 10.0) -> "SubProcess":
    """A running ``mosquitto_sub`` printing ``%q %r %t %p`` lines (QoS, retain flag, topic, payload).

    Returns once it is subscribed (its ``-d`` debug output says so); ``stop()`` ends it and returns
    the messages it printed.
    """
    return SubProcess(["mosquitto_sub", "-d", "-h", HOST, "-p", str(port), "-t", topic, "-F", "%q %r %t %p", *args],
                      timeout)


class SubProcess:
    def __init__(self, command: list[str], timeout: float):
        line_buffered = ["stdbuf", "-oL"] if shutil.which("stdbuf") else []  # it block-buffers into a pipe
        self.process = subprocess.Popen(line_buffered + command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)
        self.lines: queue.Queue = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            assert line is not None, f"mosquitto_sub ended before subscribing: {self.output}"
            if line.startswith("Subscribed"):
                break

    def _read(self) -> None:
        for line in self.process.stdout:
            self.output.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def stop(self) -> list[Received]:
        self.process.terminate()
        self.process.wait(10)
        time.sleep(0.1)  # the reader thread takes the last lines
        return parse_sub_lines("".join(self.output))


_SUB_LINE = re.compile(r"^([0-2]) ([01]) (\S+) (.*)$")


def parse_sub_lines(text: str) -> list[Received]:
    """Messages from mosquitto_sub's ``%q %r %t %p`` lines (its debug lines are skipped)."""
    received = []
    for line in text.splitlines():
        if match := _SUB_LINE.match(line):
            qos, retain, topic, payload = match.groups()
            received.append(Received(topic, payload, int(qos), retain == "1"))
    return received


def retained(port: int, topic: str, wait_s: int = 1, count: int | None = None) -> list[Received]:
    """The retained messages a new plain (MQTT 3.1.1) subscriber to ``topic`` gets, via mosquitto_sub
    (within ``wait_s`` seconds, or as soon as ``count`` arrived)."""
    limit = ["-C", str(count)] if count else []
    result = subprocess.run(["mosquitto_sub", "-h", HOST, "-p", str(port), "-t", topic, "-q", "1", "-F", "%q %r %t %p",
                             "-W", str(max(1, round(wait_s))), *limit], capture_output=True, text=True,
                            timeout=wait_s + 10)
    return parse_sub_lines(result.stdout)
