"""Flax checkpoints made by real transformers 4.x Flax (tests/fixtures/make_flax_fixture.py),
converted without jax: the torch model must give Flax's logits and greedy tokens."""

import json
import shutil
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
import transformers

from streamsed.core.languages import Target
from streamsed.engine.flax_convert import convert_flax_checkpoint
from streamsed.engine.loading import load_engine, local_checkpoint_dir
from tests.test_cli import assert_one_line_error, streamsed

FIXTURES = Path(__file__).parent / "fixtures"
# fixture -> the torch class that must load the converted checkpoint
CHECKPOINTS = {
    "wav2vec2_bart": "SpeechEncoderDecoderModel",
    "wav2vec2_gpt2": "SpeechEncoderDecoderModel",
    "wav2vec2_bert": "SpeechEncoderDecoderModel",
    "whisper": "WhisperForConditionalGeneration",
    "mbart": "MBartForConditionalGeneration",
}


def torch_inputs(expected) -> dict:
    names = {"inputs": "input_values", "input_features": "input_features", "input_ids": "input_ids"}
    inputs = {names[k]: torch.from_numpy(expected[k]) for k in expected.files if k in names}
    if "input_ids" in inputs:
        inputs["input_ids"] = inputs["input_ids"].long()
    return inputs


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_converted_checkpoint_gives_flax_logits_and_greedy_tokens(name, tmp_path):
    out = convert_flax_checkpoint(FIXTURES / f"flax_{name}", tmp_path / "torch")
    model_class = getattr(transformers, CHECKPOINTS[name])
    model, info = model_class.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    expected = np.load(FIXTURES / f"flax_{name}" / "expected.npz")
    inputs = torch_inputs(expected)
    with torch.no_grad():
        logits = model.eval()(**inputs, decoder_input_ids=torch.from_numpy(expected["decoder_input_ids"]).long()).logits
        greedy = model.generate(**inputs, max_length=12, do_sample=False, num_beams=1)
    np.testing.assert_allclose(logits.numpy(), expected["logits"], atol=1e-4, rtol=0)
    if name == "whisper":  # Whisper's generate returns the tokens after its start token
        assert greedy[:, :11].tolist() == expected["greedy"][:, 1:].tolist()
    else:
        assert greedy.tolist() == expected["greedy"].tolist()
    assert (out / "tokenizer.json").is_file()


def test_flax_only_model_dir_converts_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMSED_CACHE_DIR", str(tmp_path / "cache"))
    model_dir = shutil.copytree(FIXTURES / "flax_wav2vec2_bart", tmp_path / "wav2vec2-2-bart")
    engine = load_engine(str(model_dir), device="cpu")
    converted = local_checkpoint_dir(str(model_dir))
    assert converted.parent == tmp_path / "cache" / "converted" and (converted / "model.safetensors").is_file()
    written = (converted / "model.safetensors").stat().st_mtime_ns
    expected = np.load(model_dir / "expected.npz")
    hyp = engine.transcribe([expected["inputs"][0]], [Target()], max_new_tokens=11)[0][0]
    assert hyp.tokens == expected["greedy"][0, 1:].tolist()  # no EOS in Flax's 11 greedy tokens
    load_engine(str(model_dir), device="cpu")
    assert (converted / "model.safetensors").stat().st_mtime_ns == written


def test_convert_flax_command_writes_a_checkpoint_translate_loads(tmp_path):
    from tests.speech import RATE, espeak

    import soundfile as sf

    result = streamsed("convert-flax", str(FIXTURES / "flax_wav2vec2_bert"), str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
    sf.write(tmp_path / "hello.wav", espeak("hello"), RATE)
    result = streamsed("translate", str(tmp_path / "hello.wav"), "--model", str(tmp_path / "out"), "--format", "jsonl",
                       env={"STREAMSED_GUARD__ENABLED": "false"})
    assert result.returncode == 0, result.stderr


def _without(tree: dict, prefix: str) -> dict:
    """The tree without the subtrees whose path starts with ``prefix`` ('/'-separated)."""
    head, _, rest = prefix.partition("/")
    if not rest:
        return {k: v for k, v in tree.items() if k != head}
    return {**tree, head: _without(tree[head], rest)}


def broken_checkpoint(tmp_path, how: str) -> Path:
    model_dir = shutil.copytree(FIXTURES / "flax_wav2vec2_bart", tmp_path / how)
    weights = model_dir / "flax_model.msgpack"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how in ("unknown-type", "unserved-type"):
        config = json.loads((model_dir / "config.json").read_text())
        config["model_type"] = "no-such-net" if how == "unknown-type" else "t5"
        (model_dir / "config.json").write_text(json.dumps(config))
    elif how == "missing-weights":
        tree = msgpack.unpackb(weights.read_bytes(), raw=False, ext_hook=msgpack.ExtType)
        weights.write_bytes(msgpack.packb(_without(tree, "decoder/model/decoder/layers/1")))
    return model_dir


@pytest.mark.parametrize("how, fragment", [
    ("truncated", "not a complete Flax msgpack"),
    ("unknown-type", "cannot read config.json"),
    ("unserved-type", "'t5' is not a Flax architecture"),
    ("missing-weights", "missing (e.g. decoder.model.decoder.layers.1."),
])
def test_bad_flax_checkpoint_is_a_one_line_error(tmp_path, how, fragment):
    result = streamsed("convert-flax", str(broken_checkpoint(tmp_path, how)), str(tmp_path / "out"))
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "out").exists()


def test_bad_flax_model_dir_is_a_one_line_error_for_translate(tmp_path):
    result = streamsed("translate", "samples/hello_en.wav", "--model", str(broken_checkpoint(tmp_path, "truncated")),
                       env={"STREAMSED_CACHE_DIR": str(tmp_path / "cache")})
    assert_one_line_error(result, "not a complete Flax msgpack")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}/") if isinstance(value, dict) else {prefix + key: value})
    return out


def _nested(flat: dict) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def test_sharded_and_chunked_checkpoints_read_as_the_single_file(tmp_path):
    """Shards as FlaxPreTrainedModel.save_pretrained splits them (a weight_map index, nested trees per
    shard), and one array split the way flax.serialization._chunk splits arrays over 1 GiB."""
    from streamsed.engine.flax_convert import read_flax_params

    source = FIXTURES / "flax_wav2vec2_bart"
    flat = _flat(msgpack.unpackb((source / "flax_model.msgpack").read_bytes(), raw=False, ext_hook=msgpack.ExtType))
    names = sorted(flat)
    embedding = "decoder/model/decoder/embed_tokens/embedding"
    array = read_flax_params(source)[tuple(embedding.split("/"))]
    halves = [array.reshape(-1)[: array.size // 2], array.reshape(-1)[array.size // 2 :]]
    flat[embedding] = {"__msgpack_chunked_array__": True, "shape": {str(i): n for i, n in enumerate(array.shape)},
                       "chunks": {str(i): msgpack.ExtType(1, msgpack.packb((h.shape, h.dtype.name, h.tobytes())))
                                  for i, h in enumerate(halves)}}
    sharded = shutil.copytree(source, tmp_path / "sharded", ignore=shutil.ignore_patterns("flax_model.msgpack"))
    weight_map = {}
    for number, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :]), 1):
        shard = f"flax_model-{number:05d}-of-00002.msgpack"
        (sharded / shard).write_bytes(msgpack.packb(_nested({name: flat[name] for name in part})))
        weight_map.update(dict.fromkeys(part, shard))
    (sharded / "flax_model.msgpack.index.json").write_text(json.dumps({"weight_map": weight_map}))
    expected, got = read_flax_params(source), read_flax_params(sharded)
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])
    out = convert_flax_checkpoint(sharded, tmp_path / "torch")
    assert (out / "model.safetensors").is_file()
