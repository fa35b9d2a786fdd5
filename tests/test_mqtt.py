"""The MQTT edge against a real Mosquitto broker (tests/mosquitto.py), in process with the tiny random
Whisper: topics, QoS and retain flags, no lost finals across broker outages, Home Assistant
discovery, the control topic, logins, TLS and the queue bound."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from streamsed.daemon.captions_hub import CaptionsHub
from streamsed.daemon.config import ConfigError, MqttConfig, load_config, with_overrides
from streamsed.daemon.mqtt import HA_STATE_MAX, MqttEdge, ha_state, object_id
from streamsed.daemon.server import Daemon
from streamsed.engine.loading import engine_from_model
from tests import mosquitto
from tests.mosquitto import Mosquitto, PersistentRecorder, Recorder, mosquitto_sub, retained
from tests.speech import espeak, silence
from tests.tiny_models import NO_GUARD, tiny_whisper
from tests.waiting import eventually

pytestmark = pytest.mark.skipif(not mosquitto.available(), reason="needs Debian's mosquitto (see README)")

NODE = "testnode"
PREFIX = f"streamsed/{NODE}"


# -- fixtures and helpers -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine():
    model, extractor, tokenizer = tiny_whisper()
    return engine_from_model(model, extractor, tokenizer, name="tiny-whisper", device="cpu")


def pcm(*parts) -> bytes:
    return (np.concatenate(parts) * 32767).astype("<i2").tobytes()


@pytest.fixture(scope="module")
def speech():
    """Two utterances ending in silence."""
    return pcm(silence(0.3), espeak("Hello everyone, welcome to the kitchen.", "en", 140), silence(1.0),
               espeak("Thank you for coming.", "en", 140), silence(1.0))


@pytest.fixture(scope="module")
def long_speech():
    """Five utterances: long enough to stop the broker in the middle."""
    sentences = ["Hello everyone.", "The dishwasher has finished.", "Dinner is ready in ten minutes.",
                 "Please close the window.", "Good night and sleep well."]
    parts = [silence(0.3)]
    for sentence in sentences:
        parts += [espeak(sentence, "en", 140), silence(1.0)]
    return pcm(*parts)


@pytest.fixture(scope="module")
def open_speech():
    """One utterance with no silence after it: open until the stream ends."""
    return pcm(silence(0.3), espeak("Hello everyone, this keeps going.", "en", 140))


@pytest.fixture
def broker(tmp_path):
    broker = Mosquitto(tmp_path / "broker").start()
    yield broker
    broker.kill()


def mqtt_config(port: int, **mqtt):
    settings = {"enabled": True, "host": mosquitto.HOST, "port": port, "node_id": NODE, "reconnect_min_s": 0.05,
                "reconnect_max_s": 0.4, "flush_timeout_s": 5.0, **mqtt}
    # Exact windows: the tiny random model's text loops on the fast window, and every fallback would
    # double the cost of the partials this file expects to see published.
    return with_overrides(load_config(env={}), server={"port": 0}, mqtt=settings, guard=NO_GUARD,
                          model={"final_window": "exact", "partial_window": "exact"})


@contextlib.asynccontextmanager
async def serving(engine, port: int, **mqtt):
    """A Daemon with the MQTT edge, the way `streamsed serve` registers it."""
    config = mqtt_config(port, **mqtt)
    daemon = Daemon(config, engine)
    edge = MqttEdge(config.mqtt)
    daemon.add_edge(edge)
    await daemon.start()
    await daemon.wait_ready()
    try:
        yield daemon, edge
    finally:
        await daemon.stop()


async def until_closed(ws, timeout=60.0) -> list[dict]:
    events = []
    async with asyncio.timeout(timeout):
        with contextlib.suppress(ConnectionClosed):
            while True:
                events.append(json.loads(await ws.recv()))
    return events


async def start_stream(daemon, **options):
    ws = await connect(f"{daemon.url}/v1/stream")
    await ws.send(json.dumps({"type": "start", **options}))
    ready = json.loads(await asyncio.wait_for(ws.recv(), 30))
    assert ready["type"] == "ready", ready
    return ws


async def send_paced(ws, data: bytes, pace: float = 0.025) -> None:
    """100 ms frames at 4x real time: partials get decoded while utterances are open."""
    for first in range(0, len(data), 3200):
        await ws.send(data[first: first + 3200])
        await asyncio.sleep(pace)


async def stream(daemon, data: bytes, **options) -> list[dict]:
    """One whole ingest connection; the events it got."""
    ws = await start_stream(daemon, **options)
    await send_paced(ws, data)
    await ws.send(json.dumps({"type": "stop"}))
    return await until_closed(ws)


def finals(events) -> list[dict]:
    return [e for e in events if e["type"] == "final"]


def key(final: dict) -> tuple:
    return final["stream"], final["segment"], final["target_lang"]


def deduped(messages) -> dict[tuple, dict]:
    """Final payloads by stream + segment + target_lang, as a consumer dedupes them."""
    seen = {}
    for message in messages:
        if message.topic.endswith("/final"):
            final = json.loads(message.payload)
            seen.setdefault(key(final), final)
    return seen


# -- topics, QoS, retain ----------------------------------------------------------------------------
async def test_finals_partials_and_captions_arrive_with_their_qos_and_retain(engine, broker, speech):
    cli = mosquitto_sub(broker.port, f"{PREFIX}/#", "-V", "5", "--retain-as-published", "-q", "2")
    async with Recorder(broker.port, [f"{PREFIX}/#"]) as recorder:
        async with serving(engine, broker.port) as (daemon, edge):
            await recorder.wait_for(lambda ms: any(m.topic == f"{PREFIX}/status" for m in ms))
            events = await stream(daemon, speech, stream="kitchen", source_lang="de", targets=["de", "en"])
            sent = finals(events)
            assert [key(f) for f in sent] == [("kitchen", s, lang) for s in (0, 1) for lang in ("de", "en")]
            await recorder.wait_for(lambda ms: len([m for m in ms if m.topic.endswith("/caption")]) == 4)
            async with asyncio.timeout(10):
                while edge.queued:  # the broker confirmed everything
                    await asyncio.sleep(0.05)
            metrics = {s.name + str(sorted(s.labels.items())): s.value for family in
                       text_string_to_metric_families(daemon.metrics.render().decode()) for s in family.samples}
            assert metrics["streamsed_mqtt_queue_depth[]"] == 0
            assert metrics["streamsed_mqtt_dropped_total[('kind', 'final')]"] == edge.stats.dropped == 0
            assert metrics["streamsed_mqtt_dropped_total[('kind', 'partial')]"] == edge.stats.dropped_partials
            assert metrics["streamsed_finals_total[]"] == len(sent) == 4
        await recorder.wait_for(lambda ms: ms[-1].topic == f"{PREFIX}/status")
    lines = cli.stop()

    for received in (recorder.messages, lines):  # aiomqtt and mosquitto_sub see the same
        status = [(m.payload, m.qos, m.retain) for m in received if m.topic == f"{PREFIX}/status"]
        assert status == [("online", 1, True), ("offline", 1, True)]
        for lang in ("de", "en"):
            base = f"{PREFIX}/kitchen/{lang}"
            got = [m for m in received if m.topic == f"{base}/final"]
            assert [json.loads(m.payload) for m in got] == [f for f in sent if f["target_lang"] == lang]
            assert {(m.qos, m.retain) for m in got} == {(1, False)}
            captions = [m for m in received if m.topic == f"{base}/caption"]
            assert [m.payload for m in captions] == [m.payload for m in got]  # same JSON as the final
            assert {(m.qos, m.retain) for m in captions} == {(1, True)}
            partials = [m for m in received if m.topic == f"{base}/partial"]
            assert partials and {(m.qos, m.retain) for m in partials} == {(0, False)}
            for partial in map(json.loads, (m.payload for m in partials)):
                assert partial["type"] == "partial" and partial["target_lang"] == lang
                assert set(partial) == {"type", "stream", "segment", "target_lang", "stable", "unstable", "start"}
        topics = {m.topic for m in received}
        assert topics <= {f"{PREFIX}/status"} | {f"{PREFIX}/kitchen/{lang}/{kind}" for lang in ("de", "en")
                                                 for kind in ("partial", "final", "caption", "state")}
    # The whole websocket final event, byte for byte as JSON.
    assert recorder.on("/kitchen/en/final")[0].payload == json.dumps(sent[1], ensure_ascii=False)

    # A late plain subscriber (MQTT 3.1.1, mosquitto_sub) gets only the retained state: the last caption
    # per language, the HA state and the status; never finals or partials.
    late = {m.topic: m for m in retained(broker.port, f"{PREFIX}/#")}
    assert set(late) == {f"{PREFIX}/status"} | {f"{PREFIX}/kitchen/{lang}/{kind}" for lang in ("de", "en")
                                                for kind in ("caption", "state")}
    assert all(m.retain for m in late.values()) and late[f"{PREFIX}/status"].payload == "offline"
    assert json.loads(late[f"{PREFIX}/kitchen/en/caption"].payload) == sent[3]
    assert late[f"{PREFIX}/kitchen/en/state"].payload == ha_state(sent[3]["text"])
    assert edge.stats.dropped == 0 and edge.stats.published > 10


async def test_clean_shutdown_flushes_the_last_final_before_offline(engine, broker, open_speech):
    async with Recorder(broker.port, [f"{PREFIX}/#"]) as recorder:
        async with serving(engine, broker.port) as (daemon, edge):
            ws = await start_stream(daemon, stream="open", source_lang="en")
            await send_paced(ws, open_speech, pace=0)
            await ws.send(json.dumps({"type": "keepalive"}))
            await asyncio.sleep(0.3)
            stopping = asyncio.create_task(daemon.stop())  # mid-utterance: its final is made, then sent
            sent = finals(await until_closed(ws))
            await asyncio.wait_for(stopping, 30)
        await recorder.wait_for(lambda ms: any(m.payload == "offline" for m in ms))
    topics = [m.topic for m in recorder.messages]
    assert [json.loads(m.payload) for m in recorder.on("/final")] == sent and len(sent) == 1
    assert [m.payload for m in recorder.on("/status")] == ["online", "offline"]
    assert topics[-1] == f"{PREFIX}/status"  # offline comes after the last final (and caption, state)
    assert topics.index(f"{PREFIX}/open/en/final") < len(topics) - 1
    assert edge.queued == 0


# -- outages ---------------------------------------------------------------------------------------------
async def test_broker_restart_mid_stream_loses_no_final(engine, broker, long_speech):
    consumer = PersistentRecorder(broker.port, [f"{PREFIX}/+/+/final"])
    async with consumer, serving(engine, broker.port) as (daemon, edge):
        await eventually(lambda: edge.connected)
        ws = await start_stream(daemon, stream="hall", source_lang="de", targets=["de", "en"])
        first_half = len(long_speech) // 3 // 3200 * 3200
        await send_paced(ws, long_speech[:first_half])
        events: list[dict] = []

        async def read():
            with contextlib.suppress(ConnectionClosed):
                while True:
                    events.append(json.loads(await ws.recv()))

        reader = asyncio.create_task(read())
        await consumer.wait_for(lambda ms: len(deduped(ms)) >= 2)  # the first finals made it through
        broker.stop()  # SIGTERM: the consumer's session and its queued messages are saved
        await eventually(lambda: not edge.connected)
        before = len(finals(events))
        await send_paced(ws, long_speech[first_half:])
        await eventually(lambda: len(finals(events)) >= before + 2, timeout=30)  # finals made while down
        assert not edge.connected and edge.queued >= 2
        broker.start()
        await ws.send(json.dumps({"type": "stop"}))
        await asyncio.wait_for(reader, 60)
        sent = finals(events)
        assert len(sent) >= 8
        await consumer.wait_for(lambda ms: set(deduped(ms)) >= {key(f) for f in sent}, timeout=30)
    got = deduped(consumer.messages)
    assert [got[key(f)] for f in sent] == sent  # every final, same content (duplicates allowed)
    assert edge.stats.dropped == 0 and edge.stats.connects >= 2


async def test_daemon_starts_with_the_broker_down_and_delivers_once_it_appears(engine, tmp_path, speech, caplog):
    broker = Mosquitto(tmp_path / "late")
    broker.start()  # register the consumer's persistent session, then take the broker away
    consumer = PersistentRecorder(broker.port, [f"{PREFIX}/#"], identifier="late-consumer")
    async with consumer:
        broker.stop()
        caplog.set_level(logging.INFO, "streamsed.daemon.mqtt")
        try:
            async with serving(engine, broker.port) as (daemon, edge):
                events = await stream(daemon, speech, stream="porch", source_lang="en")  # websockets work
                sent = finals(events)
                assert len(sent) == 2
                await eventually(lambda: edge.stats.connect_attempts >= 3)
                assert not edge.connected and edge.stats.connects == 0
                assert edge.queued == 3 * len(sent) + 1  # final, caption, state each + the HA announcement
                assert edge.stats.dropped_partials > 0  # partials are not kept while disconnected
                broker.start()
                await eventually(lambda: edge.connected, timeout=10)
                await consumer.wait_for(lambda ms: set(deduped(ms)) == {key(f) for f in sent})
                assert list(deduped(consumer.messages).values()) == sent
        finally:
            broker.kill()
    failures = [r for r in caplog.records if "cannot connect to broker" in r.getMessage()]
    assert failures and failures[0].levelno == logging.WARNING  # said once; repeats are debug
    assert len([r for r in failures if r.levelno >= logging.WARNING]) == 1
    assert "retrying in" in failures[0].getMessage()


async def test_queue_bound_drops_the_oldest_and_counts_them(tmp_path, caplog):
    broker = Mosquitto(tmp_path / "bound").start()
    consumer = PersistentRecorder(broker.port, [f"{PREFIX}/#"], identifier="bound-consumer")
    await consumer.__aenter__()
    broker.stop()
    edge = MqttEdge(MqttConfig(enabled=True, host=mosquitto.HOST, port=broker.port, node_id=NODE, queue_size=10,
                               reconnect_min_s=0.05, reconnect_max_s=0.2, ha_discovery=False))
    hub = CaptionsHub()
    await edge.start(SimpleNamespace(hub=hub, sessions={}, engine=None))
    try:
        for segment in range(6):  # 2 messages per final (no HA): 12 > 10
            hub.publish({"type": "partial", "stream": "b", "segment": segment, "target_lang": "en", "stable": "",
                         "unstable": "x", "start": 0.0})
            hub.publish({"type": "final", "stream": "b", "segment": segment, "source_lang": "en",
                         "target_lang": "en", "text": f"final {segment}", "start": 0.0, "end": 1.0, "latency_ms": 1})
        assert edge.stats.dropped == 2 and edge.stats.dropped_partials == 6 and edge.queued == 10
        assert any("dropped the oldest" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
        broker.start()
        await consumer.wait_for(lambda ms: len(deduped(ms)) == 5)
        assert sorted(f[1] for f in deduped(consumer.messages)) == [1, 2, 3, 4, 5]  # segment 0 was dropped
        assert any("were dropped while the broker was unreachable" in r.getMessage() for r in caplog.records)
    finally:
        await edge.stop()
        await consumer.__aexit__(None, None, None)
        broker.kill()


# -- logins and TLS ------------------------------------------------------------------------------------
async def test_wrong_password_is_logged_clearly_and_retried(engine, broker, caplog):
    caplog.set_level(logging.INFO, "streamsed.daemon.mqtt")
    async with serving(engine, broker.auth_port, username="streamsed", password="wrong") as (daemon, edge):
        await eventually(lambda: edge.stats.connect_attempts >= 3, timeout=10)
        assert not edge.connected and edge.stats.connects == 0
        assert daemon.ready  # the daemon itself is fine
    refused = [r for r in caplog.records if "refused the login" in r.getMessage()]
    assert len(refused) >= 2 and all(r.levelno == logging.ERROR for r in refused)
    message = refused[0].getMessage()
    assert "user streamsed" in message and "Not authorized" in message and "password_file" in message
    assert "retrying in" in message and str(broker.auth_port) in message


async def test_password_file_login_through_the_acl_listener(engine, broker, tmp_path):
    secret = tmp_path / "mqtt-password"
    secret.write_text(mosquitto.USERS["streamsed"] + "\n")
    viewer = {"username": "viewer", "password": mosquitto.USERS["viewer"]}
    async with Recorder(broker.auth_port, [f"{PREFIX}/#"], **viewer) as recorder:
        async with serving(engine, broker.auth_port, username="streamsed", password_file=str(secret)) as (daemon, edge):
            await eventually(lambda: edge.connected)
            daemon.hub.publish({"type": "final", "stream": "acl", "segment": 0, "source_lang": "en",
                                "target_lang": "en", "text": "hi", "start": 0.0, "end": 1.0, "latency_ms": 5})
            await recorder.wait_for(lambda ms: recorder.on("/acl/en/final"))
            # The viewer may read but not publish: the broker drops its control message (ACL), so the
            # edge never sees it (it would answer unknown_stream on <prefix>/error).
            await recorder.publish(f"{PREFIX}/acl/set", json.dumps({"targets": ["en"]}), qos=1)
            await asyncio.sleep(0.5)
            assert edge.stats.control_errors == 0 and not recorder.on("/error")
    assert [m.payload for m in recorder.on("/status")][:1] == ["online"]


def test_password_file_and_tls_files_must_be_readable(tmp_path):
    with pytest.raises(ConfigError, match="password_file .* cannot be read"):
        MqttEdge(MqttConfig(enabled=True, username="u", password_file=str(tmp_path / "nope")))
    (tmp_path / "empty").write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        MqttEdge(MqttConfig(enabled=True, username="u", password_file=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match="tls_ca .*: file not found"):
        MqttEdge(MqttConfig(enabled=True, tls=True, tls_ca=str(tmp_path / "ca.pem")))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make certificates")
async def test_tls_with_ca_and_client_certificate(engine, tmp_path, caplog):
    broker = Mosquitto(tmp_path / "tls", tls=True).start()
    folder = broker.folder
    try:
        async with Recorder(broker.port, [f"{PREFIX}/status"]) as recorder:
            tls = {"tls": True, "tls_ca": str(folder / "ca.crt"), "tls_cert": str(folder / "client.crt"),
                   "tls_key": str(folder / "client.key")}
            async with serving(engine, broker.tls_port, **tls) as (daemon, edge):
                await eventually(lambda: edge.connected, timeout=10)
                await recorder.wait_for(lambda ms: [m.payload for m in ms] == ["online"])
            # A CA that did not sign the broker's certificate: verification fails, logged, retried.
            caplog.set_level(logging.WARNING, "streamsed.daemon.mqtt")
            async with serving(engine, broker.tls_port, **{**tls, "tls_ca": str(folder / "client.crt")}) as (_, edge):
                await eventually(lambda: edge.stats.connect_attempts >= 2, timeout=10)
                assert not edge.connected
        assert any("certificate verify failed" in r.getMessage() for r in caplog.records)
    finally:
        broker.kill()


# -- Home Assistant discovery ------------------------------------------------------------------------------
# What Home Assistant's MQTT integration accepts for a discovered sensor, from its own schemas
# (homeassistant/components/mqtt: discovery.py TOPIC_MATCHER, schemas.py MQTT_ENTITY_COMMON_SCHEMA /
# MQTT_ENTITY_DEVICE_INFO_SCHEMA / MQTT_ORIGIN_INFO_SCHEMA, config.py MQTT_RO_SCHEMA, sensor.py). Its
# discovery schema silently removes keys it does not know, so an unknown key here is a mistake.
HA_TOPIC = re.compile(r"(?P<component>\w+)/(?:(?P<node_id>[a-zA-Z0-9_-]+)/)?(?P<object_id>[a-zA-Z0-9_-]+)/config")
HA_SENSOR_KEYS = {
    "state_topic", "value_template", "qos", "encoding",  # MQTT_RO_SCHEMA (state_topic required)
    "name", "device_class", "state_class", "unit_of_measurement", "suggested_display_precision", "expire_after",
    "force_update", "last_reset_value_template", "options",  # sensor
    "availability_topic", "availability_template", "payload_available", "payload_not_available", "availability",
    "availability_mode", "device", "origin", "enabled_by_default", "entity_category", "icon", "entity_picture",
    "json_attributes_topic", "json_attributes_template", "object_id", "default_entity_id", "unique_id",  # common
}
HA_DEVICE_KEYS = {"identifiers", "connections", "manufacturer", "model", "model_id", "name", "hw_version",
                  "serial_number", "sw_version", "via_device", "suggested_area", "configuration_url"}
HA_ORIGIN_KEYS = {"name", "sw_version", "support_url"}


def valid_topic(topic, subscribe=False) -> bool:
    if not isinstance(topic, str) or not topic or "\0" in topic or len(topic.encode()) > 65535:
        return False
    levels = topic.split("/")
    if not subscribe:
        return "+" not in topic and "#" not in topic
    return all(level in ("+", "#") or not set(level) & {"+", "#"} for level in levels) and "#" not in levels[:-1]


def ha_sensor_problems(topic: str, config: dict, discovery_prefix="homeassistant") -> list[str]:
    """Why Home Assistant would refuse (or silently mangle) this discovery message; [] when fine."""
    problems = []
    match = HA_TOPIC.fullmatch(topic.removeprefix(discovery_prefix + "/"))
    if not topic.startswith(discovery_prefix + "/") or not match or match["component"] != "sensor":
        problems.append(f"topic {topic} is not <prefix>/sensor/[<node_id>/]<object_id>/config")
    problems += [f"unknown key {k}" for k in set(config) - HA_SENSOR_KEYS]
    if not valid_topic(config.get("state_topic"), subscribe=True):
        problems.append("state_topic is required and must be a valid topic")
    for name in ("json_attributes_topic", "availability_topic"):
        if name in config and not valid_topic(config[name], subscribe=True):
            problems.append(f"{name} is not a valid topic")
    if "availability_topic" in config and "availability" in config:
        problems.append("availability_topic and availability are exclusive")
    for name in ("name", "unique_id", "payload_available", "payload_not_available", "value_template"):
        if name in config and not isinstance(config[name], str):
            problems.append(f"{name} must be a string")
    if config.get("qos", 0) not in (0, 1, 2):
        problems.append("qos must be 0, 1 or 2")
    if "icon" in config and not re.fullmatch(r"[a-z0-9-]+:[a-z0-9-]+", config["icon"]):
        problems.append("icon must be prefix:name")
    device = config.get("device")
    if device is not None:
        problems += [f"unknown device key {k}" for k in set(device) - HA_DEVICE_KEYS]
        if not (device.get("identifiers") or device.get("connections")):
            problems.append("device needs identifiers or connections")
        if not all(isinstance(i, str) for i in device.get("identifiers", [])):
            problems.append("device identifiers must be strings")
        problems += [f"device {k} must be a string" for k, v in device.items()
                     if k not in ("identifiers", "connections") and not isinstance(v, str)]
        if "unique_id" not in config:
            problems.append("device info is only used with a unique_id")
    origin = config.get("origin")
    if origin is not None:
        problems += [f"unknown origin key {k}" for k in set(origin) - HA_ORIGIN_KEYS]
        if not isinstance(origin.get("name"), str):
            problems.append("origin needs a name")
    return problems


def test_the_ha_checker_catches_mistakes():
    good = {"state_topic": "a/b", "unique_id": "u", "device": {"identifiers": ["d"]}}
    assert ha_sensor_problems("homeassistant/sensor/n/o/config", good) == []
    assert ha_sensor_problems("homeassistant/sensor/n.x/o/config", good)
    assert ha_sensor_problems("homeassistant/sensor/n/o/config", {**good, "state_topic": "a/#/b"})
    assert ha_sensor_problems("homeassistant/sensor/n/o/config", {"unique_id": "u"})
    assert ha_sensor_problems("homeassistant/sensor/n/o/config", {**good, "device": {"name": "x"}})
    assert ha_sensor_problems("homeassistant/sensor/n/o/config", {**good, "stat_topic": "x"})


async def test_home_assistant_discovery(engine, broker, speech):
    long_text = "word " * 120  # 600 characters
    async with Recorder(broker.port, [f"{PREFIX}/#", "homeassistant/#"]) as recorder:
        async with serving(engine, broker.port) as (daemon, edge):
            sent = finals(await stream(daemon, speech, stream="living.room", source_lang="de", targets=["de", "en"]))
            daemon.hub.publish({**sent[-1], "segment": 2, "text": long_text})  # a long caption
            await stream(daemon, speech[:32000])  # an unnamed stream (s-<hex>): no sensor
            await recorder.wait_for(lambda ms: len([m for m in ms if m.topic.endswith("/state")]) == 5)
            configs = [m for m in recorder.messages if m.topic.startswith("homeassistant/sensor/")]
            assert len(configs) == 2  # one sensor per stream and target, announced once

            # Home Assistant restarts: its birth message makes the daemon announce every sensor again.
            await recorder.publish("homeassistant/status", "online", qos=1)
            await recorder.wait_for(lambda ms: len([m for m in ms if m.topic.startswith("homeassistant/sensor/")]) == 4)
            assert [m.payload for m in recorder.messages if m.topic.startswith("homeassistant/sensor/")][2:] == \
                [m.payload for m in configs]
            await recorder.publish("homeassistant/status", "offline", qos=1)  # ignored

    for message in configs:
        assert message.retain and message.qos == 1
        config = json.loads(message.payload)
        assert ha_sensor_problems(message.topic, config) == []
        lang = config["state_topic"].split("/")[-2]
        assert message.topic == f"homeassistant/sensor/{NODE}/{object_id('living.room', lang)}/config"
        assert re.fullmatch(rf"living_room_{lang}_[0-9a-f]{{6}}", object_id("living.room", lang))
        assert config["state_topic"] == f"{PREFIX}/living.room/{lang}/state"
        assert config["json_attributes_topic"] == f"{PREFIX}/living.room/{lang}/caption"
        assert config["availability_topic"] == f"{PREFIX}/status"
        assert (config["payload_available"], config["payload_not_available"]) == ("online", "offline")
        assert config["device"] == {"identifiers": [f"streamsed_{NODE}"], "name": f"streamsed {NODE}",
                                    "manufacturer": "streamsed", "model": "speech translation (tiny-whisper)",
                                    "sw_version": config["origin"]["sw_version"]}
        assert config["unique_id"] == f"streamsed_{NODE}_{object_id('living.room', lang)}"
    assert len({json.loads(m.payload)["unique_id"] for m in configs}) == 2

    states = [m for m in recorder.messages if m.topic == f"{PREFIX}/living.room/en/state"]
    assert all(m.retain for m in states)
    assert [m.payload for m in states][:2] == [f["text"] for f in sent if f["target_lang"] == "en"]
    assert len(states[-1].payload) == HA_STATE_MAX < 255 and states[-1].payload.endswith("…")
    assert long_text.startswith(states[-1].payload[:-1])
    attributes = json.loads(recorder.on("/living.room/en/caption")[-1].payload)
    assert attributes["text"] == long_text  # the full text is in the attributes
    assert edge.stats.control_errors == 0


def test_ha_state_truncation():
    assert ha_state("short") == "short"
    assert ha_state("x" * HA_STATE_MAX) == "x" * HA_STATE_MAX
    assert ha_state("x" * 1000) == "x" * (HA_STATE_MAX - 1) + "…"
    assert object_id("room1", "en") == "room1_en"


# -- control topic --------------------------------------------------------------------------------------
async def test_control_topic_changes_a_live_streams_targets(engine, broker, speech):
    async with Recorder(broker.port, [f"{PREFIX}/#"]) as recorder:
        async with serving(engine, broker.port) as (daemon, edge):
            await eventually(lambda: edge.connected)
            ws = await start_stream(daemon, stream="office", source_lang="de", targets=["de"])
            await recorder.publish(f"{PREFIX}/office/set", json.dumps({"targets": ["de", "en"]}), qos=1)
            await recorder.wait_for(lambda ms: recorder.on("/office/targets"))
            assert json.loads(recorder.on("/office/targets")[0].payload) == \
                {"stream": "office", "source_lang": "de", "targets": ["de", "en"]}
            await send_paced(ws, speech)
            await ws.send(json.dumps({"type": "stop"}))
            sent = finals(await until_closed(ws))
            assert [key(f) for f in sent] == [("office", s, lang) for s in (0, 1) for lang in ("de", "en")]
            await recorder.wait_for(lambda ms: len(recorder.on("/final")) == 4)

            bad = [
                ("office", b"{not json", "bad_json"),
                ("office", b"\xff\xfe", "bad_json"),
                ("office", b"[1, 2]", "bad_option"),
                ("office", json.dumps({"targets": 5}).encode(), "bad_option"),
                ("office", json.dumps({"targets": ["en"], "extra": 1}).encode(), "bad_option"),
                ("office", json.dumps({"targets": ["english!"]}).encode(), "unsupported_language"),
                ("nowhere", json.dumps({"targets": ["en"]}).encode(), "unknown_stream"),
            ]
            ws = await start_stream(daemon, stream="office", source_lang="de", targets=["de"])
            bad.append(("office", json.dumps({"targets": ["fr"]}).encode(), "unsupported_language"))  # de -> fr
            for stream_id, payload, _ in bad:
                await recorder.publish(f"{PREFIX}/{stream_id}/set", payload, qos=1)
            await recorder.wait_for(lambda ms: len(recorder.on("/error")) == len(bad))
            # Still alive and still obeying: a good message after the bad ones.
            await recorder.publish(f"{PREFIX}/office/set", json.dumps({"targets": "en"}), qos=1)
            await recorder.wait_for(lambda ms: len(recorder.on("/office/targets")) == 2)
            assert daemon.sessions["office"].targets[0].target_lang == "en"
            await ws.send(json.dumps({"type": "stop"}))
            await until_closed(ws)
    errors = [json.loads(m.payload) for m in recorder.on(f"{PREFIX}/error")]
    assert [e["code"] for e in errors] == [code for _, _, code in bad]
    assert all(e["type"] == "error" and e["message"] and e["topic"].endswith("/set") for e in errors)
    assert "into English" in errors[-1]["message"]
    assert {(m.qos, m.retain) for m in recorder.on("/error")} == {(1, False)}
    assert edge.stats.control_errors == len(bad)


# -- lifecycle ---------------------------------------------------------------------------------------------
async def test_stop_without_start_and_defaults():
    edge = MqttEdge(MqttConfig(enabled=True))
    await edge.stop()
    assert edge.prefix == f"streamsed/{edge.node_id}" and edge.client_id == f"streamsed-{edge.node_id}"
    assert re.fullmatch(r"[A-Za-z0-9_-]+", edge.node_id)
    custom = MqttEdge(MqttConfig(enabled=True, topic_prefix="home/captions", client_id="x"))
    assert custom.status_topic == "home/captions/status" and custom.client_id == "x"


@pytest.mark.parametrize("settings, fragment", [
    ({"password": "p"}, "needs a username"),
    ({"username": "u", "password": "p", "password_file": "/f"}, "not both"),
    ({"tls_ca": "/ca.pem"}, "need tls = true"),
    ({"tls": True, "tls_cert": "/c.pem"}, "go together"),
    ({"node_id": "my.host"}, "node_id must be"),
    ({"topic_prefix": "a/+/b"}, "topic_prefix must be"),
    ({"topic_prefix": "a/"}, "topic_prefix must be"),
    ({"qos_final": 3}, "qos_partial and qos_final"),
    ({"port": 0}, "port must be 1-65535"),
    ({"reconnect_min_s": 5.0, "reconnect_max_s": 1.0}, "reconnect_max_s must be at least"),
    ({"queue_size": 1}, "queue_size must be at least"),
])
def test_mqtt_config_errors(tmp_path, settings, fragment):
    lines = ["[mqtt]"] + [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    path = tmp_path / "streamsed.toml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_config(path, env={})


def test_mqtt_settings_from_the_environment():
    config = load_config(env={"STREAMSED_MQTT__ENABLED": "true", "STREAMSED_MQTT__PORT": "8883",
                              "STREAMSED_MQTT__PASSWORD": "pw", "STREAMSED_MQTT__USERNAME": "me"})
    assert config.mqtt.enabled and config.mqtt.port == 8883 and config.mqtt.password == "pw"
    assert load_config(env={}).mqtt.enabled is False
