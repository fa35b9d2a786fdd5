"""Convert a CTranslate2 (faster-whisper format) Whisper model into a transformers model directory.

A faster-whisper directory holds ``model.bin`` (CTranslate2 binary format, version 6),
``config.json`` (suppressed tokens, language ids, alignment heads) and ``tokenizer.json``.
The output is a directory that ``WhisperForConditionalGeneration.from_pretrained`` loads offline
and whose ``generate(input_features, language=..., task=...)`` works without any hub access.

The binary layout is what ``ctranslate2.specs.model_spec.ModelSpec._serialize`` writes (all
integers little endian)::

    u32 version | str spec_name | u32 revision | u32 n_variables
    n_variables * (str name | u8 rank | rank * u32 dim | u8 dtype_id | u32 n_bytes | bytes)
    u32 n_aliases | n_aliases * (str alias | str target)

where ``str`` is ``u16 length (incl. NUL) | utf-8 bytes | NUL``. ``model.bin`` may be given as
several part files that are read back to back as one stream (no concatenation on disk).

The variable names follow ``ctranslate2.converters.transformers.WhisperLoader``: self-attention
``linear_0`` holds q, k, v stacked; cross-attention ``linear_0`` is q, ``linear_1`` is k, v
stacked, and the last ``linear_*`` is the output projection.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "CONVERTER_VERSION",
    "Ct2FormatError",
    "Ct2Model",
    "Ct2Source",
    "SUPPORTED_BINARY_VERSIONS",
    "convert_ct2_whisper",
    "read_ct2_model",
    "resolve_ct2_source",
]

SUPPORTED_BINARY_VERSIONS = (6,)
CONVERTER_VERSION = 1  # bump when the output changes, so cached conversions are redone
WHISPER_SPEC = "WhisperSpec"
GELU = 3  # ctranslate2.specs.common_spec.Activation.GELU

# dtype ids in the order of CTranslate2's DataType enum (see model_spec._dtype_to_type_id).
# numpy has no bfloat16: those are kept as raw uint16 bit patterns and widened on use.
_DTYPES = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: np.dtype("<u2"),  # bfloat16
}
_BFLOAT16 = 5
_MAX_RANK = 8  # sanity bound: a larger rank means we are reading garbage


class Ct2FormatError(ValueError):
    """A model.bin that is truncated, corrupt, or in an unsupported binary version."""


@dataclass
class Ct2Model:
    """The raw content of a CTranslate2 ``model.bin``."""

    spec: str
    revision: int
    binary_version: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str] = field(default_factory=dict)
    bfloat16: set[str] = field(default_factory=set)  # names stored as raw bfloat16 bits

    def resolve(self, name: str) -> str:
        """Follow aliases (CTranslate2 stores duplicated tensors once, e.g. tied embeddings)."""
        seen = set()
        while name in self.aliases:
            if name in seen:
                raise Ct2FormatError(f"alias cycle at {name!r}")
            seen.add(name)
            name = self.aliases[name]
        return name

    def __contains__(self, name: str) -> bool:
        return self.resolve(name) in self.variables

    def raw(self, name: str) -> np.ndarray:
        real = self.resolve(name)
        if real not in self.variables:
            raise KeyError(f"CTranslate2 model has no variable {name!r}")
        return self.variables[real]

    def float32(self, name: str) -> np.ndarray:
        """The variable as float32, widening bfloat16 and dequantizing int8/int16 weights."""
        real = self.resolve(name)
        value = self.raw(real)
        if real in self.bfloat16:
            value = (value.astype(np.uint32) << 16).view(np.float32)
        scale_name = real + "_scale"
        if scale_name in self:
            # CTranslate2 quantizes as rint(w * scale) with one scale per output row (int8)
            # or one global scale (int16), so w ~= q / scale.
            scale = self.float32(scale_name)
            if scale.ndim == 1:
                scale = scale.reshape(-1, *([1] * (value.ndim - 1)))
            value = value.astype(np.float32) / scale
        elif value.dtype.kind != "f":
            raise Ct2FormatError(f"{name!r} is {value.dtype} without a {scale_name!r}")
        elif value.dtype == np.float16:
            # torch widens fp16 ~10x faster than numpy (seconds saved on a 74M-parameter model).
            import torch

            value = torch.from_numpy(value).float().numpy()
        return np.ascontiguousarray(value, dtype=np.float32)

    def scalar(self, name: str) -> int:
        return int(self.raw(name).reshape(()))


# --------------------------------------------------------------------------- reading model.bin


class _PartStream:
    """Reads several files as one continuous byte stream, with the offset for error messages."""

    def __init__(self, parts: Sequence[Path]):
        self.parts = [Path(p) for p in parts]
        if not self.parts:
            raise ValueError("no model.bin parts given")
        for part in self.parts:
            if not part.is_file():
                raise FileNotFoundError(f"model weights not found: {part}")
        self.total = sum(p.stat().st_size for p in self.parts)
        self.offset = 0
        self._index = 0
        self._file = open(self.parts[0], "rb")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> _PartStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def readinto(self, buffer: memoryview) -> None:
        """Fill ``buffer`` completely, crossing part boundaries; raise on a short stream."""
        filled = 0
        while filled < len(buffer):
            n = self._file.readinto(buffer[filled:])
            if n:
                filled += n
                continue
            if self._index + 1 >= len(self.parts):
                raise Ct2FormatError(
                    f"model.bin is truncated: needed {len(buffer) - filled} more bytes at offset "
                    f"{self.offset + filled} of {self.total} ({', '.join(map(str, self.parts))})"
                )
            self._file.close()
            self._index += 1
            self._file = open(self.parts[self._index], "rb")
        self.offset += filled

    def read(self, n: int) -> bytes:
        buffer = bytearray(n)
        self.readinto(memoryview(buffer))
        return bytes(buffer)

    def unpack(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.read(struct.calcsize("<" + fmt)))[0]

    def string(self) -> str:
        length = self.unpack("H")
        raw = self.read(length)
        if length == 0 or raw[-1] != 0:
            raise Ct2FormatError(f"corrupt string at offset {self.offset - length}")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as e:
            raise Ct2FormatError(f"corrupt string at offset {self.offset - length}: {e}") from None

    def at_end(self) -> bool:
        return self.offset == self.total


def _read_variable(stream: _PartStream) -> tuple[str, np.ndarray, int]:
    name = stream.string()
    rank = stream.unpack("B")
    if rank > _MAX_RANK:
        raise Ct2FormatError(f"corrupt variable {name!r}: rank {rank}")
    shape = tuple(stream.unpack("I") for _ in range(rank))
    type_id = stream.unpack("B")
    if type_id not in _DTYPES:
        raise Ct2FormatError(f"corrupt variable {name!r}: unknown dtype id {type_id}")
    n_bytes = stream.unpack("I")
    dtype = _DTYPES[type_id]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if n_bytes != expected:
        raise Ct2FormatError(
            f"corrupt variable {name!r}: {n_bytes} bytes for shape {shape} of {dtype}"
        )
    if n_bytes > stream.total - stream.offset:
        raise Ct2FormatError(
            f"model.bin is truncated: variable {name!r} needs {n_bytes} bytes at offset "
            f"{stream.offset}, only {stream.total - stream.offset} left"
        )
    value = np.empty(shape, dtype=dtype)
    stream.readinto(memoryview(value.reshape(-1).view(np.uint8)))
    return name, value, type_id


def read_ct2_model(parts: Path | str | Sequence[Path | str], progress: bool = False) -> Ct2Model:
    """Read a CTranslate2 ``model.bin`` (or its split parts, in order) into memory."""
    part_list = [Path(parts)] if isinstance(parts, (str, Path)) else [Path(p) for p in parts]
    with _PartStream(part_list) as stream:
        if stream.total < 4:
            raise Ct2FormatError(f"model.bin is truncated: {stream.total} bytes")
        version = stream.unpack("I")
        if version not in SUPPORTED_BINARY_VERSIONS:
            raise Ct2FormatError(
                f"unsupported CTranslate2 binary version {version} in {part_list[0]} "
                f"(supported: {', '.join(map(str, SUPPORTED_BINARY_VERSIONS))}); "
                "is this a CTranslate2 model.bin? Re-convert it with ctranslate2>=3"
            )
        spec = stream.string()
        revision = stream.unpack("I")
        count = stream.unpack("I")
        model = Ct2Model(spec=spec, revision=revision, binary_version=version, variables={})
        for _ in _progress(range(count), progress, "reading model.bin", "tensor"):
            name, value, type_id = _read_variable(stream)
            model.variables[name] = value
            if type_id == _BFLOAT16:
                model.bfloat16.add(name)
        for _ in range(stream.unpack("I")):
            alias = stream.string()
            model.aliases[alias] = stream.string()
        if not stream.at_end():
            raise Ct2FormatError(
                f"{stream.total - stream.offset} unexpected trailing bytes after the model "
                "(wrong part order or a corrupt file?)"
            )
    return model


def _progress(iterable, enabled: bool, desc: str, unit: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, unit=unit, leave=False)


# --------------------------------------------------------------------------- CT2 -> HF weights


class _WeightMapper:
    """Hands out CT2 variables as float32 and remembers which ones were used.

    After the mapping, every CT2 tensor must have been consumed and every HF parameter must
    have been produced: a silent leftover means a layout we do not understand.
    """

    def __init__(self, model: Ct2Model):
        self.model = model
        self.used: set[str] = set()
        self.state: dict[str, np.ndarray] = {}

    def take(self, name: str) -> np.ndarray:
        real = self.model.resolve(name)
        value = self.model.float32(name)
        if real in self.used:
            # An alias (CT2 stores equal tensors once, e.g. all-ones layer norms): the HF
            # parameters must not share memory, or save_pretrained rejects them as tied.
            value = value.copy()
        self.used.add(real)
        if real + "_scale" in self.model:
            self.used.add(self.model.resolve(real + "_scale"))
        return value

    def put(self, hf_name: str, value: np.ndarray) -> None:
        if hf_name in self.state:
            raise AssertionError(f"{hf_name} assigned twice")
        self.state[hf_name] = value

    def linear(self, hf: str, ct2: str, bias: bool = True) -> None:
        self.put(f"{hf}.weight", self.take(f"{ct2}/weight"))
        if bias:
            self.put(f"{hf}.bias", self.take(f"{ct2}/bias"))

    def layer_norm(self, hf: str, ct2: str) -> None:
        self.put(f"{hf}.weight", self.take(f"{ct2}/gamma"))
        self.put(f"{hf}.bias", self.take(f"{ct2}/beta"))

    def split(self, ct2: str, parts: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        weight, bias = self.take(f"{ct2}/weight"), self.take(f"{ct2}/bias")
        if weight.shape[0] % parts or bias.shape[0] != weight.shape[0]:
            raise Ct2FormatError(f"{ct2}: cannot split {weight.shape} into {parts} projections")
        return np.split(weight, parts), np.split(bias, parts)

    def qkv(self, hf: str, weights: list[np.ndarray], biases: list[np.ndarray]) -> None:
        # Whisper's k_proj has no bias; CTranslate2 stored zeros there. Dropping it is exact
        # even if it were not zero: q.(k + b) shifts all logits of a query equally, and softmax
        # ignores that.
        for proj, w, b in zip(("q_proj", "k_proj", "v_proj"), weights, biases):
            self.put(f"{hf}.{proj}.weight", w)
            if proj != "k_proj":
                self.put(f"{hf}.{proj}.bias", b)

    def self_attention(self, hf: str, ct2: str) -> None:
        self.qkv(hf, *self.split(f"{ct2}/linear_0", 3))
        self.linear(f"{hf}.out_proj", f"{ct2}/linear_1")

    def cross_attention(self, hf: str, ct2: str) -> None:
        (q_w,), (q_b,) = self.split(f"{ct2}/linear_0", 1)
        kv_w, kv_b = self.split(f"{ct2}/linear_1", 2)
        self.qkv(hf, [q_w, *kv_w], [q_b, *kv_b])
        self.linear(f"{hf}.out_proj", f"{ct2}/linear_2")

    def ffn(self, hf: str, ct2: str) -> None:
        self.linear(f"{hf}.fc1", f"{ct2}/linear_0")
        self.linear(f"{hf}.fc2", f"{ct2}/linear_1")
        self.layer_norm(f"{hf}.final_layer_norm", f"{ct2}/layer_norm")

    def unused(self) -> list[str]:
        # Scalars (num_heads, activation, flags) are configuration, read separately.
        return sorted(
            name
            for name, value in self.model.variables.items()
            if value.ndim > 0 and name not in self.used
        )


def _count_layers(model: Ct2Model, prefix: str) -> int:
    pattern = re.compile(rf"^{prefix}/layer_(\d+)/")
    indices = {int(m.group(1)) for name in model.variables if (m := pattern.match(name))}
    if indices != set(range(len(indices))):
        raise Ct2FormatError(f"{prefix} layers are not numbered 0..n-1: {sorted(indices)}")
    return len(indices)


def _hf_state_dict(model: Ct2Model, enc_layers: int, dec_layers: int, tied: bool):
    m = _WeightMapper(model)
    enc, dec = "model.encoder", "model.decoder"
    m.linear(f"{enc}.conv1", "encoder/conv1")
    m.linear(f"{enc}.conv2", "encoder/conv2")
    m.put(f"{enc}.embed_positions.weight", m.take("encoder/position_encodings/encodings"))
    m.layer_norm(f"{enc}.layer_norm", "encoder/layer_norm")
    for i in range(enc_layers):
        hf, ct2 = f"{enc}.layers.{i}", f"encoder/layer_{i}"
        m.self_attention(f"{hf}.self_attn", f"{ct2}/self_attention")
        m.layer_norm(f"{hf}.self_attn_layer_norm", f"{ct2}/self_attention/layer_norm")
        m.ffn(hf, f"{ct2}/ffn")

    m.put(f"{dec}.embed_tokens.weight", m.take("decoder/embeddings/weight"))
    m.put(f"{dec}.embed_positions.weight", m.take("decoder/position_encodings/encodings"))
    m.layer_norm(f"{dec}.layer_norm", "decoder/layer_norm")
    for i in range(dec_layers):
        hf, ct2 = f"{dec}.layers.{i}", f"decoder/layer_{i}"
        m.self_attention(f"{hf}.self_attn", f"{ct2}/self_attention")
        m.layer_norm(f"{hf}.self_attn_layer_norm", f"{ct2}/self_attention/layer_norm")
        m.cross_attention(f"{hf}.encoder_attn", f"{ct2}/attention")
        m.layer_norm(f"{hf}.encoder_attn_layer_norm", f"{ct2}/attention/layer_norm")
        m.ffn(hf, f"{ct2}/ffn")
    # The output projection aliases the token embeddings in Whisper; HF then ties proj_out to
    # embed_tokens, and the state dict names the same tensor twice.
    if tied:
        m.used.add(model.resolve("decoder/projection/weight"))
        m.put("proj_out.weight", m.state[f"{dec}.embed_tokens.weight"])
    else:
        m.put("proj_out.weight", m.take("decoder/projection/weight"))
    if "decoder/projection/bias" in model:
        raise Ct2FormatError("decoder/projection has a bias; Whisper's proj_out has none")

    if leftovers := m.unused():
        raise Ct2FormatError(f"CTranslate2 tensors not mapped to the HF model: {leftovers}")
    return m.state


# --------------------------------------------------------------------------- config + tokenizer


@dataclass
class _Shapes:
    d_model: int
    num_mel_bins: int
    encoder_layers: int
    decoder_layers: int
    encoder_heads: int
    decoder_heads: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    vocab_size: int
    max_source_positions: int
    max_target_positions: int
    tied: bool


_WHISPER_FLAGS = {
    "decoder/activation": GELU,
    "decoder/pre_norm": 1,
    "decoder/scale_embeddings": 0,
    "decoder/alibi": 0,
}


def _infer_shapes(model: Ct2Model) -> _Shapes:
    if model.spec != WHISPER_SPEC:
        raise Ct2FormatError(f"not a Whisper model: CTranslate2 spec is {model.spec!r}")
    # Flags WhisperSpec always writes this way; anything else would change the maths.
    for flag, expected in _WHISPER_FLAGS.items():
        if flag in model and model.scalar(flag) != expected:
            raise Ct2FormatError(f"{flag} = {model.scalar(flag)}, Whisper needs {expected}")
    conv1 = model.raw("encoder/conv1/weight")  # [d_model, n_mels, kernel]
    embeddings = model.raw("decoder/embeddings/weight")  # [vocab, d_model]
    return _Shapes(
        d_model=conv1.shape[0],
        num_mel_bins=conv1.shape[1],
        encoder_layers=_count_layers(model, "encoder"),
        decoder_layers=_count_layers(model, "decoder"),
        encoder_heads=model.scalar("encoder/num_heads"),
        decoder_heads=model.scalar("decoder/num_heads"),
        encoder_ffn_dim=model.raw("encoder/layer_0/ffn/linear_0/weight").shape[0],
        decoder_ffn_dim=model.raw("decoder/layer_0/ffn/linear_0/weight").shape[0],
        vocab_size=embeddings.shape[0],
        max_source_positions=model.raw("encoder/position_encodings/encodings").shape[0],
        max_target_positions=model.raw("decoder/position_encodings/encodings").shape[0],
        tied=_is_tied(model),
    )


def _is_tied(model: Ct2Model) -> bool:
    """Whether proj_out equals the token embeddings (always so in OpenAI's Whisper)."""
    projection, embeddings = "decoder/projection/weight", "decoder/embeddings/weight"
    if model.resolve(projection) == model.resolve(embeddings):
        return True  # CTranslate2 aliased them, the usual case
    return np.array_equal(model.raw(projection), model.raw(embeddings))


@dataclass
class _TokenIds:
    eos: int
    start: int
    transcribe: int | None
    translate: int | None
    no_timestamps: int
    prev_sot: int | None


# Tokens every Whisper tokenizer has (English-only ones too); generate() cannot work without.
_REQUIRED_TOKENS = ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>")


def _build_tokenizer(tokenizer_json: Path, vocab_size: int):
    """A WhisperTokenizerFast from tokenizer.json, padded with timestamp tokens to vocab_size."""
    from transformers import AddedToken, WhisperTokenizerFast

    tok = WhisperTokenizerFast(
        tokenizer_file=str(tokenizer_json),
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    # faster-whisper's tokenizer.json stops before the timestamp tokens <|0.00|>..<|30.00|>;
    # add them (non-special, like the openai/whisper-* hub tokenizers) so every id decodes.
    missing = vocab_size - len(tok)
    if missing > 0:
        tok.add_tokens(
            [AddedToken("<|%.2f|>" % (i * 0.02), normalized=False) for i in range(missing)]
        )
    if len(tok) != vocab_size:
        raise ValueError(f"tokenizer has {len(tok)} tokens, model vocabulary is {vocab_size}")
    return tok


def _token_ids(tok, vocab_size: int) -> _TokenIds:
    def tid(token: str, required: bool) -> int | None:
        # The Whisper tokenizer maps unknown tokens to <|endoftext|>, so check the round trip.
        i = tok.convert_tokens_to_ids(token)
        if i is None or i >= vocab_size or tok.convert_ids_to_tokens(i) != token:
            if required:
                raise ValueError(f"tokenizer.json lacks the Whisper token {token}")
            return None
        return i

    ids = {t: tid(t, True) for t in _REQUIRED_TOKENS}
    return _TokenIds(
        eos=ids["<|endoftext|>"],
        start=ids["<|startoftranscript|>"],
        no_timestamps=ids["<|notimestamps|>"],
        transcribe=tid("<|transcribe|>", False),
        translate=tid("<|translate|>", False),
        prev_sot=tid("<|startofprev|>", False),
    )


def _whisper_config(shapes: _Shapes, ids: _TokenIds, ct2_config: dict):
    from transformers import WhisperConfig

    return WhisperConfig(
        vocab_size=shapes.vocab_size,
        num_mel_bins=shapes.num_mel_bins,
        d_model=shapes.d_model,
        encoder_layers=shapes.encoder_layers,
        decoder_layers=shapes.decoder_layers,
        encoder_attention_heads=shapes.encoder_heads,
        decoder_attention_heads=shapes.decoder_heads,
        encoder_ffn_dim=shapes.encoder_ffn_dim,
        decoder_ffn_dim=shapes.decoder_ffn_dim,
        max_source_positions=shapes.max_source_positions,
        max_target_positions=shapes.max_target_positions,
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=shapes.tied,
        bos_token_id=ids.eos,
        eos_token_id=ids.eos,
        pad_token_id=ids.eos,
        decoder_start_token_id=ids.start,
        suppress_tokens=list(ct2_config.get("suppress_ids") or []),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin") or []),
    )


def _generation_config(shapes: _Shapes, ids: _TokenIds, tok, ct2_config: dict):
    """What WhisperForConditionalGeneration.generate reads for language/task prompts.

    Mirrors the openai/whisper-* hub generation_config.json: without lang_to_id/task_to_id
    ``generate(language=..., task=...)`` raises, and without no_timestamps_token_id it would
    not put <|notimestamps|> into the prompt (CTranslate2 callers pass it explicitly).
    """
    from transformers import GenerationConfig

    lang_ids = list(ct2_config.get("lang_ids") or [])
    # Whisper's own rule: the multilingual vocabulary has 51865+ tokens, English-only 51864.
    multilingual = bool(lang_ids) and shapes.vocab_size >= 51865
    extra: dict = {}
    if multilingual:
        extra["lang_to_id"] = {tok.convert_ids_to_tokens(i): i for i in lang_ids}
        if ids.transcribe is None or ids.translate is None:
            raise ValueError("multilingual tokenizer lacks <|transcribe|>/<|translate|>")
        extra["task_to_id"] = {"transcribe": ids.transcribe, "translate": ids.translate}
    if ids.prev_sot is not None:
        extra["prev_sot_token_id"] = ids.prev_sot
    alignment_heads = ct2_config.get("alignment_heads")
    if alignment_heads:
        extra["alignment_heads"] = [list(map(int, h)) for h in alignment_heads]
    return GenerationConfig(
        decoder_start_token_id=ids.start,
        bos_token_id=ids.eos,
        eos_token_id=ids.eos,
        pad_token_id=ids.eos,
        max_length=shapes.max_target_positions,
        suppress_tokens=list(ct2_config.get("suppress_ids") or []),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin") or []),
        no_timestamps_token_id=ids.no_timestamps,
        is_multilingual=multilingual,
        max_initial_timestamp_index=50,
        return_timestamps=False,
        **extra,
    )


# --------------------------------------------------------------------------- conversion


@dataclass(frozen=True)
class Ct2Source:
    """Where a CTranslate2 Whisper model's files are: weights (one or several parts) + json."""

    weights: tuple[Path, ...]
    config_json: Path
    tokenizer_json: Path


def resolve_ct2_source(
    source: Path | str | Sequence[Path | str],
    config_json: Path | str | None = None,
    tokenizer_json: Path | str | None = None,
) -> Ct2Source:
    """Accept a faster-whisper directory, a model.bin, or a list of model.bin parts.

    config.json / tokenizer.json default to the files next to the (first) weights file.
    """
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        weights = (Path(source) / "model.bin",)
    elif isinstance(source, (str, Path)):
        weights = (Path(source),)
    else:
        weights = tuple(Path(p) for p in source)
    if not weights:
        raise ValueError("no CTranslate2 weights given")
    here = weights[0].parent
    resolved = Ct2Source(
        weights=weights,
        config_json=Path(config_json) if config_json else here / "config.json",
        tokenizer_json=Path(tokenizer_json) if tokenizer_json else here / "tokenizer.json",
    )
    for path in (*resolved.weights, resolved.config_json, resolved.tokenizer_json):
        if not path.is_file():
            raise FileNotFoundError(f"CTranslate2 Whisper model file not found: {path}")
    return resolved


def _load_hf_model(config, state: dict[str, np.ndarray]):
    """A WhisperForConditionalGeneration holding exactly ``state`` (strict, float32).

    Built on the meta device and filled with ``assign=True``: skips the random init (tens of
    seconds for large models) and keeps no second copy of the weights.
    """
    import torch
    from transformers import WhisperForConditionalGeneration

    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k}: {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or wrong:
        raise Ct2FormatError(
            f"weights do not fit WhisperForConditionalGeneration: missing={missing} "
            f"unexpected={unexpected} shape mismatch={wrong}"
        )
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()  # assign=True replaced proj_out by its own tensor object
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise Ct2FormatError(f"parameters left unassigned: {left_on_meta}")
    return model.eval()


def convert_ct2_whisper(
    source: Path | str | Sequence[Path | str],
    *,
    out_dir: Path | str,
    config_json: Path | str | None = None,
    tokenizer_json: Path | str | None = None,
    progress: bool = True,
) -> Path:
    """Convert a CTranslate2 Whisper model into a transformers model directory ``out_dir``.

    ``source`` is a faster-whisper directory, a model.bin, or the ordered list of its parts.
    The result is written to a temporary sibling and renamed into place at the end, so an
    interrupted conversion never leaves a half-written ``out_dir``. Raises FileExistsError if
    ``out_dir`` exists.
    """
    from transformers import WhisperFeatureExtractor

    src = resolve_ct2_source(source, config_json, tokenizer_json)
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"conversion target already exists: {out_dir}")

    ct2 = read_ct2_model(src.weights, progress=progress)
    ct2_config = json.loads(src.config_json.read_text(encoding="utf-8"))
    shapes = _infer_shapes(ct2)
    tok = _build_tokenizer(src.tokenizer_json, shapes.vocab_size)
    ids = _token_ids(tok, shapes.vocab_size)
    state = _hf_state_dict(ct2, shapes.encoder_layers, shapes.decoder_layers, shapes.tied)
    del ct2  # everything needed is in ``state`` now; frees the fp16 originals early

    model = _load_hf_model(_whisper_config(shapes, ids, ct2_config), state)
    model.generation_config = _generation_config(shapes, ids, tok, ct2_config)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the final model dir should be readable
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        WhisperFeatureExtractor(feature_size=shapes.num_mel_bins).save_pretrained(tmp)
        (tmp / "ct2_source.json").write_text(json.dumps(_provenance(src), indent=2) + "\n")
        os.replace(tmp, out_dir)  # atomic on one filesystem; fails if out_dir appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _provenance(src: Ct2Source) -> dict:
    return {
        "weights": [str(p) for p in src.weights],
        "weights_bytes": [p.stat().st_size for p in src.weights],
        "config_json": str(src.config_json),
        "tokenizer_json": str(src.tokenizer_json),
    }

