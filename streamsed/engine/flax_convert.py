"""Flax checkpoints (``flax_model.msgpack``) to torch, without jax or flax.

transformers 5 dropped Flax, but FlaxSpeechEncoderDecoderModel, FlaxWhisper and the Flax parts
(Wav2Vec2, Bart/MBart, GPT2, BERT) are still published that way. A checkpoint is a msgpack tree
of nested dicts whose leaves are flax's ext type 1 (ndarray); the torch names and layouts follow
transformers 4.x ``load_flax_weights_in_pytorch_model``: ``kernel`` -> ``weight`` transposed
(conv kernels too), ``scale``/``embedding`` -> ``weight``, weight-norm ``weight_g``/``weight_v``
-> torch's parametrizations, and tied heads left to torch's own tying.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import msgpack
import numpy as np

from .default_model import _EDGE_BYTES, _first_bytes, _last_bytes, _remove_stale_tmp, cache_dir

log = logging.getLogger(__name__)

__all__ = ["FlaxFormatError", "convert_flax_checkpoint", "ensure_converted_flax", "is_flax_only_dir", "read_flax_params"]

WEIGHTS = "flax_model.msgpack"
INDEX = "flax_model.msgpack.index.json"
TORCH_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
CONVERTER_VERSION = 1
# Model types whose Flax checkpoints map onto the torch classes of the same name.
SUPPORTED_TYPES = ("speech-encoder-decoder", "whisper", "wav2vec2", "bart", "mbart", "gpt2", "bert")
# Torch-only parameters no Flax checkpoint has: wav2vec2's SpecAugment mask embedding (training only).
TORCH_ONLY = ("masked_spec_embed",)
_EXT_NDARRAY, _EXT_COMPLEX, _EXT_SCALAR = 1, 2, 3
# Tokenizer, feature extractor and model-card files travel with the weights (vocab.json, spm.model...).
_COPIED_SUFFIXES = (".json", ".txt", ".model", ".md", ".tiktoken")


class FlaxFormatError(ValueError):
    """A Flax checkpoint that is truncated, of an unknown architecture, or missing weights."""


def is_flax_only_dir(path: Path) -> bool:
    has_flax = (path / WEIGHTS).is_file() or (path / INDEX).is_file()
    return has_flax and (path / "config.json").is_file() and not any((path / n).is_file() for n in TORCH_WEIGHTS)


# -- reading -------------------------------------------------------------------------------------
def _ndarray(data: bytes) -> np.ndarray:
    shape, dtype, buffer = msgpack.unpackb(data, raw=True)
    if dtype == b"bfloat16":  # numpy has no bfloat16: widen the raw 16 bits to float32
        return (np.frombuffer(buffer, np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    return np.frombuffer(buffer, dtype=np.dtype(dtype.decode())).reshape(shape)


def _ext_hook(code: int, data: bytes):
    if code == _EXT_NDARRAY:
        return _ndarray(data)
    if code == _EXT_SCALAR:
        return _ndarray(data)[()]
    if code == _EXT_COMPLEX:
        real, imag = msgpack.unpackb(data)
        return complex(real, imag)
    raise FlaxFormatError(f"unknown msgpack ext type {code}")


def _flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, np.ndarray]:
    flat = {}
    for key, value in tree.items():
        path = (*prefix, key)
        if isinstance(value, dict) and value.get("__msgpack_chunked_array__"):  # arrays over 1 GiB
            chunks = value["chunks"]
            shape = tuple(value["shape"][str(i)] for i in range(len(value["shape"])))
            flat[path] = np.concatenate([chunks[str(i)] for i in range(len(chunks))]).reshape(shape)
        elif isinstance(value, dict):
            flat.update(_flatten(value, path))
        else:
            flat[path] = np.asarray(value)
    return flat


def _read_msgpack(path: Path) -> dict[tuple, np.ndarray]:
    try:
        tree = msgpack.unpackb(path.read_bytes(), ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as error:  # ExtraData and FormatError are ValueErrors
        raise FlaxFormatError(f"{path} is not a complete Flax msgpack checkpoint ({type(error).__name__})") from None
    if not isinstance(tree, dict):
        raise FlaxFormatError(f"{path} holds no parameter tree")
    return _flatten(tree)


def read_flax_params(directory: Path) -> dict[tuple, np.ndarray]:
    """Every parameter of a Flax checkpoint (one file or shards), keyed by its module path."""
    if (directory / INDEX).is_file():
        shards = sorted(set(json.loads((directory / INDEX).read_text())["weight_map"].values()))
        params = {}
        for shard in shards:
            if not (directory / shard).is_file():
                raise FlaxFormatError(f"{directory / shard} is missing (named in {INDEX})")
            params.update(_read_msgpack(directory / shard))
        return params
    return _read_msgpack(directory / WEIGHTS)


# -- mapping --------------------------------------------------------------------------------------
def _weight_norm_names(torch_keys) -> dict[str, str]:
    """``...conv.weight_g`` / ``weight_v`` (Flax, old torch) -> ``...conv.parametrizations.weight.original0/1``."""
    names = {}
    for key in torch_keys:
        parts = key.split(".")
        if parts[-3:-2] == ["parametrizations"] and parts[-1] in ("original0", "original1"):
            suffix = "_g" if parts[-1] == "original0" else "_v"
            names[".".join([*parts[:-3], parts[-2] + suffix])] = key
    return names


def torch_state_dict(params: dict[tuple, np.ndarray], torch_shapes: dict[str, tuple], base_prefix: str = ""):
    """Rename and re-lay ``params`` for a torch model whose state dict has ``torch_shapes``.

    Returns (state dict, unexpected Flax names); shapes that disagree raise FlaxFormatError."""
    special = _weight_norm_names(torch_shapes)
    torch_modules = {key.rsplit(".", 1)[0] for key in torch_shapes}
    flax_roots = {path[0] for path in params}
    torch_roots = {key.split(".")[0] for key in torch_shapes}
    strip = bool(base_prefix) and base_prefix in flax_roots and base_prefix not in torch_roots
    add = bool(base_prefix) and base_prefix not in flax_roots and base_prefix in torch_roots
    state, unexpected = {}, []
    for path, array in params.items():
        if strip and path[0] == base_prefix:  # a head model's weights into its base model
            path = path[1:]
        elif add and ".".join((base_prefix, *path[:-1])) in torch_modules:  # a base model into its head model
            path = (base_prefix, *path)
        *module, leaf = path
        if leaf == "kernel":  # dense (in, out) and conv (k..., in, out) kernels
            leaf, array = "weight", (np.transpose(array, (3, 2, 0, 1)) if array.ndim == 4 else array.T)
        elif leaf in ("scale", "embedding"):
            leaf = "weight"
        elif leaf == "mean":
            leaf = "running_mean"
        elif leaf == "var":
            leaf = "running_var"
        name = ".".join((*module, leaf))
        name = special.get(name, name)
        if name not in torch_shapes:
            unexpected.append(name)
            continue
        if tuple(array.shape) != tuple(torch_shapes[name]):
            raise FlaxFormatError(f"weight {name} has shape {tuple(array.shape)}, the config needs {tuple(torch_shapes[name])}")
        state[name] = np.ascontiguousarray(array, dtype=np.float32) if array.dtype.kind == "f" else array
    return state, unexpected


def _torch_model(config):
    import transformers

    if config.model_type not in SUPPORTED_TYPES:
        raise FlaxFormatError(
            f"model type {config.model_type!r} is not a Flax architecture streamsed converts "
            f"(supported: {', '.join(SUPPORTED_TYPES)})"
        )
    if config.model_type == "speech-encoder-decoder":
        return transformers.SpeechEncoderDecoderModel(config)
    # Flax saves its architecture without the prefix (FlaxBertModel -> BertModel): that torch class.
    names = [name.removeprefix("Flax") for name in (config.architectures or [])]
    model_class = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), None)
    return model_class(config) if model_class is not None else transformers.AutoModel.from_config(config)


def load_flax_into_torch(directory: Path):
    """The torch model for a Flax checkpoint directory, every weight loaded and checked."""
    import torch
    from transformers import AutoConfig, GenerationConfig

    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:  # no config.json, or an unknown model_type
        raise FlaxFormatError(f"{directory}: cannot read config.json: {str(error).splitlines()[0]}") from None
    model = _torch_model(config)
    params = read_flax_params(directory)
    torch_state = model.state_dict()
    state, unexpected = torch_state_dict(params, {k: tuple(v.shape) for k, v in torch_state.items()},
                                         model.base_model_prefix)
    missing = [k for k in torch_state if k not in state and not _tied_or_torch_only(k, state, torch_state)]
    if missing or unexpected:
        raise FlaxFormatError(
            f"{directory}: the Flax weights do not fit {type(model).__name__}: "
            f"{len(missing)} missing (e.g. {', '.join(missing[:3]) or '-'}), "
            f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3]) or '-'})"
        )
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=False)
    model.tie_weights()
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model.eval()


def _tied_or_torch_only(key: str, loaded: dict, torch_state: dict) -> bool:
    """A weight Flax does not store: a tied copy of a loaded one (lm_head) or a torch-only buffer."""
    if key.split(".")[-1] in TORCH_ONLY or key.endswith(("position_ids", "token_type_ids")):
        return True
    pointer = torch_state[key].data_ptr()
    return any(torch_state[k].data_ptr() == pointer for k in loaded)


def convert_flax_checkpoint(directory: Path | str, out_dir: Path | str) -> Path:
    """Write a torch checkpoint (safetensors, config, generation config, tokenizer and feature
    extractor files) for the Flax checkpoint in ``directory``; atomic: written aside, then renamed."""
    directory, out_dir = Path(directory), Path(out_dir)
    if not (directory / WEIGHTS).is_file() and not (directory / INDEX).is_file():
        raise FlaxFormatError(f"{directory} has no {WEIGHTS} (nor {INDEX})")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty")
    model = load_flax_into_torch(directory)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)
        for extra in directory.iterdir():  # save_pretrained rewrites config.json and the weights
            if extra.is_file() and extra.suffix in _COPIED_SUFFIXES and extra.name not in ("config.json", INDEX):
                shutil.copy2(extra, tmp / extra.name)
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "flax_source.json").write_text(json.dumps({"source": str(directory.resolve())}, indent=2) + "\n")
        if out_dir.exists() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def fingerprint(directory: Path) -> str:
    """Config, sizes and the weights' edges: cheap, and enough to tell checkpoints apart."""
    h = hashlib.sha256(f"converter={CONVERTER_VERSION}".encode())
    h.update((directory / "config.json").read_bytes())
    weights = sorted(directory.glob(f"{WEIGHTS.split('.')[0]}*.msgpack"))
    for path in weights:
        h.update(f"{path.name}={path.stat().st_size};".encode())
        h.update(_first_bytes(path, _EDGE_BYTES) + _last_bytes(path, _EDGE_BYTES))
    return h.hexdigest()[:16]


def ensure_converted_flax(directory: Path) -> Path:
    """The cached torch conversion of a Flax-only directory, converting it on first use."""
    converted = cache_dir() / "converted"
    target = converted / f"flax-{directory.resolve().name}-{fingerprint(directory)}"
    if (target / "model.safetensors").is_file():
        return target
    converted.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(converted)
    log.info("converting Flax checkpoint %s to torch in %s (once)", directory, target)
    try:
        return convert_flax_checkpoint(directory, target)
    except OSError:  # another process renamed its finished conversion into place first
        if (target / "model.safetensors").is_file():
            return target
        raise
