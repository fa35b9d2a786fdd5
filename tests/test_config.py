"""Daemon settings: the shipped TOML, env overrides, CLI overrides, and clear errors."""

import dataclasses
import re
from pathlib import Path

import pytest

from streamsed.core.vad import VadConfig
from streamsed.daemon.config import Config, ConfigError, load_config

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "streamsed.toml"


def write(tmp_path, text):
    path = tmp_path / "streamsed.toml"
    path.write_text(text)
    return path


def test_shipped_file_is_exactly_the_defaults():
    assert load_config(SHIPPED, env={}) == Config() == load_config(env={})


def test_shipped_file_documents_every_setting_with_a_comment():
    text = SHIPPED.read_text()
    for section in dataclasses.fields(Config):
        assert f"[{section.name}]" in text
        for setting in dataclasses.fields(section.default_factory()):
            match = re.search(rf"((?:^#.*\n)+)^{setting.name} = ", text, re.MULTILINE)
            assert match, f"[{section.name}] {setting.name} is missing or has no comment above it"


def test_defaults():
    config = load_config(env={})
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8765)
    assert config.model.name == "whisper-base" and config.model.device == "auto"
    assert config.streaming.chunk_ms == 500 and config.streaming.sample_rate == 16000
    assert config.streaming.encoding == "pcm_s16le"
    assert config.vad == VadConfig()


def test_file_then_env_then_overrides(tmp_path):
    path = write(tmp_path, '[server]\nport = 9000\nmax_sessions = 3\n[streaming]\ntargets = ["de", "en"]\n')
    config = load_config(path, env={})
    assert config.server.port == 9000 and config.server.max_sessions == 3
    assert config.streaming.targets == ["de", "en"]

    env = {"STREAMSED_SERVER__PORT": "9100", "STREAMSED_STREAMING__TARGETS": "fr", "STREAMSED_VAD__END_RATIO": "0.8",
           "STREAMSED_SERVER__PING_INTERVAL_S": "5", "UNRELATED": "x", "STREAMSED_NO_SECTION": "ignored"}
    config = load_config(path, env=env)
    assert config.server.port == 9100 and config.server.max_sessions == 3
    assert config.streaming.targets == ["fr"] and config.vad.end_ratio == 0.8
    assert config.server.ping_interval_s == 5.0

    config = load_config(path, env=env, overrides={"server.port": 0, "server.host": None, "model.name": "x"})
    assert config.server.port == 0 and config.server.host == "127.0.0.1" and config.model.name == "x"


def test_int_in_file_is_accepted_for_a_float(tmp_path):
    assert load_config(write(tmp_path, "[vad]\nmax_segment_s = 20\n"), env={}).vad.max_segment_s == 20.0


@pytest.mark.parametrize("text, fragment", [
    ("[server]\nprot = 1\n", "unknown key 'prot' in [server]"),
    ("[sever]\nport = 1\n", "unknown section 'sever'"),
    ("[server]\nport = \"x\"\n", "port must be an integer"),
    ("[server]\nport = 70000\n", "port must be 0-65535"),
    ("[streaming]\ntargets = \"de\"\n", "targets must be a list of strings"),
    ("[streaming]\nencoding = \"mp3\"\n", "encoding must be one of"),
    ("[streaming]\nsample_rate = 4000\n", "sample_rate must be 8000-192000"),
    ("[streaming]\nsource_lang = \"german!\"\n", "'german!'"),
    ("[vad]\naggressiveness = 7\n", "[vad] aggressiveness must be 0, 1, 2 or 3"),
    ("[logging]\nlevel = \"loud\"\n", "level must be one of"),
    ("port = 1\n", "must be a [section]"),
    ("[server\n", "not a readable TOML file"),
])
def test_bad_file_names_the_setting(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text), env={})
    assert fragment in str(error.value)


@pytest.mark.parametrize("env, fragment", [
    ({"STREAMSED_SERVER__PORT": "eighty"}, "STREAMSED_SERVER__PORT must be an integer, got 'eighty'"),
    ({"STREAMSED_SERVER__PROT": "1"}, "STREAMSED_SERVER__PROT: unknown key 'prot'"),
    ({"STREAMSED_SEVER__PORT": "1"}, "unknown section 'sever'"),
    ({"STREAMSED_VAD__END_RATIO": "high"}, "must be a number"),
])
def test_bad_env_names_the_variable(env, fragment):
    with pytest.raises(ConfigError) as error:
        load_config(env=env)
    assert fragment in str(error.value)


def test_unknown_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'nope'"):
        load_config(env={}, overrides={"server.nope": 1})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml", env={})


def test_the_end_silence_schedule_comes_from_toml_and_env(tmp_path):
    path = write(tmp_path, "[vad]\nend_silence_schedule = [[4, 250], [8.5, 120]]\n")
    assert load_config(path, env={}).vad.end_silence_schedule == ((4.0, 250), (8.5, 120))
    env = {"STREAMSED_VAD__END_SILENCE_SCHEDULE": "6:300"}
    assert load_config(env=env).vad.end_silence_schedule == ((6.0, 300),)
    with pytest.raises(ConfigError, match="pairs"):
        load_config(write(tmp_path, "[vad]\nend_silence_schedule = [5, 200]\n"), env={})
    with pytest.raises(ConfigError, match="increasing"):
        load_config(write(tmp_path, "[vad]\nend_silence_schedule = [[8, 100], [4, 200]]\n"), env={})
