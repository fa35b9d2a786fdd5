"""Fine-tuning (``streamsed finetune``) with the training recipe of the transformers
SpeechEncoderDecoderModel docs, for every family the engine serves.

``model(input_values | input_features, labels=labels).loss``, labels padded with -100, and the
model shifts them right behind ``config.decoder_start_token_id`` (padding with
``config.pad_token_id``). The labels are what the engine decodes after the start token: the rest
of its prompt (Whisper's ``<|lang|><|task|><|notimestamps|>``, mBART's language token), the text,
then EOS; so a fine-tuned model is prompted at inference exactly as it was trained.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..core.audio import AudioError, load_audio_file
from ..core.errors import UserError
from ..core.languages import Target
from .loading import load_engine

__all__ = ["Example", "FinetuneOptions", "FinetuneReport", "finetune", "label_ids", "read_manifest"]

TASKS = ("transcribe", "translate")
IGNORE = -100  # the label CrossEntropyLoss skips: padding


@dataclass
class Example:
    audio: np.ndarray
    text: str
    language: str | None = None
    task: str = "transcribe"


@dataclass
class FinetuneOptions:
    steps: int = 100
    lr: float = 1e-5
    batch_size: int = 8
    freeze_encoder: bool = False
    seed: int = 0


@dataclass
class FinetuneReport:
    output: Path
    steps: int
    loss_before: float  # mean training-set loss, eval mode (no dropout), before the first step
    loss_after: float
    seconds: float
    wer_before: float | None = None
    wer_after: float | None = None
    losses: list[float] = field(default_factory=list)  # the training loss of each step

    def summary(self) -> str:
        text = (f"saved {self.output}: {self.steps} steps in {self.seconds:.0f} s, "
                f"loss {self.loss_before:.3f} -> {self.loss_after:.3f}")
        if self.wer_before is not None:
            text += f", eval WER {self.wer_before:.1%} -> {self.wer_after:.1%}"
        return text


def read_manifest(path: Path | str) -> list[Example]:
    """JSONL lines ``{"audio", "text", "language", "task"}``; audio paths are relative to the file."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise UserError(f"cannot read manifest {path}: {error.strerror or error}") from None
    examples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            entry = json.loads(line)
            audio_path, text = entry["audio"], entry["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f'{where}: expected a JSON object with "audio" and "text"') from None
        task = entry.get("task", "transcribe")
        if task not in TASKS:
            raise UserError(f"{where}: task must be transcribe or translate, not {task!r}")
        try:
            audio, _ = load_audio_file(path.parent / audio_path)
        except AudioError as error:
            raise UserError(f"{where}: {error}") from None
        examples.append(Example(audio, str(text), entry.get("language"), task))
    if not examples:
        raise UserError(f"manifest {path} has no examples")
    return examples


def target_for(family, example: Example) -> Target:
    """The engine target an example trains: Whisper's language and task, a language-token decoder's
    target language, or the fixed output of a decoder without language tokens."""
    source = example.language or ("en" if family.name == "whisper" else None)
    wanted = source if example.task == "transcribe" else "en"
    if family.name != "whisper" and not family.languages:
        return Target(source, None)
    return Target(source, wanted)


def label_ids(family, tokenizer, example: Example) -> list[int]:
    """Prompt after the start token, text tokens, EOS."""
    prompt = family.prompt(target_for(family, example))
    text = example.text.strip()
    if family.name == "whisper":
        text = " " + text  # Whisper's text starts with a space token after <|notimestamps|>
    eos = family.eos_token_ids[0] if family.eos_token_ids else (tokenizer.eos_token_id or tokenizer.sep_token_id)
    ids = prompt[1:] + tokenizer(text, add_special_tokens=False).input_ids
    return ids + ([int(eos)] if eos is not None else [])


def _batch(engine, examples: list[Example]) -> dict:
    inputs = dict(engine.feature_inputs([e.audio for e in examples]))
    labels = [label_ids(engine.family, engine.tokenizer, e) for e in examples]
    padded = torch.full((len(labels), max(map(len, labels))), IGNORE, dtype=torch.long)
    for row, ids in enumerate(labels):
        padded[row, : len(ids)] = torch.tensor(ids)
    inputs["labels"] = padded
    return {k: v.to(engine.device) for k, v in inputs.items()}


def _mean_loss(model, batches: list[dict]) -> float:
    model.eval()
    with torch.no_grad():
        return float(np.mean([model(**batch).loss.item() for batch in batches]))


def word_error_rate(engine, examples: list[Example]) -> float:
    """WER of the engine's greedy output, case and punctuation ignored."""
    import jiwer

    hypotheses = [engine.transcribe([e.audio], [target_for(engine.family, e)])[0][0].text for e in examples]
    normalize = jiwer.Compose([jiwer.ToLowerCase(), jiwer.RemovePunctuation(), jiwer.RemoveMultipleSpaces(),
                               jiwer.Strip(), jiwer.ReduceToListOfListOfWords()])
    return float(jiwer.wer([e.text for e in examples], hypotheses, reference_transform=normalize,
                           hypothesis_transform=normalize))


def _check_lengths(engine, examples: list[Example]) -> None:
    window = engine.family.fixed_window_s
    for e in examples:
        if window is not None and len(e.audio) > window * engine.sample_rate:
            raise UserError(f"a clip of {len(e.audio) / engine.sample_rate:.0f} s is longer than the model's "
                            f"{window:.0f} s window: cut the training audio into shorter clips")


def finetune(reference: str, manifest, output, options: FinetuneOptions | None = None, *,
             eval_manifest=None, device: str = "auto", progress: bool = True) -> FinetuneReport:
    """Train ``reference`` on ``manifest`` and save a checkpoint ``--model output`` serves."""
    started = time.monotonic()
    options = options or FinetuneOptions()
    train = read_manifest(manifest)
    evals = read_manifest(eval_manifest) if eval_manifest else None
    engine = load_engine(reference, device=device, dtype="float32", cuda_graphs=False)
    _check_lengths(engine, train)
    model, family = engine.model, engine.family
    # As the docs' recipe sets them: labels are shifted right behind this start token, padded with this.
    model.config.decoder_start_token_id = family.start_token
    model.config.pad_token_id = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None \
        else family.pad_token_id
    wer_before = word_error_rate(engine, evals) if evals else None

    from transformers import set_seed

    rng = random.Random(options.seed)
    set_seed(options.seed)  # torch and numpy: dropout, layerdrop and wav2vec2's SpecAugment masks
    size = max(1, min(options.batch_size, len(train)))
    fixed_batches = [_batch(engine, train[i : i + size]) for i in range(0, len(train), size)]
    loss_before = _mean_loss(model, fixed_batches)
    if options.freeze_encoder:
        model.get_encoder().requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=options.lr)
    model.train()
    order: list[int] = []
    losses = []
    with tqdm(range(options.steps), desc="finetune", unit="step", disable=not progress) as bar:
        for _ in bar:
            if len(order) < size:  # a new shuffled pass over the data
                order += rng.sample(range(len(train)), len(train))
            batch = _batch(engine, [train[i] for i in order[:size]])
            del order[:size]
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.requires_grad_(True)
    loss_after = _mean_loss(model, fixed_batches)
    wer_after = word_error_rate(engine, evals) if evals else None
    save_checkpoint(engine, Path(output))
    return FinetuneReport(Path(output), options.steps, loss_before, loss_after, time.monotonic() - started,
                          wer_before, wer_after, losses)


def save_checkpoint(engine, output: Path) -> None:
    """Weights, config, generation config, feature extractor and tokenizer: what ``--model DIR`` loads."""
    output.mkdir(parents=True, exist_ok=True)
    engine.model.save_pretrained(output, safe_serialization=True)
    engine.feature_extractor.save_pretrained(output)
    engine.tokenizer.save_pretrained(output)
