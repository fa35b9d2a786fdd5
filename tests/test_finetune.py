"""`streamsed finetune`: the docs' training recipe on every family the engine serves."""

import json
import time

import pytest
import soundfile as sf
import torch

import tests.tiny_models as tm
from streamsed.engine.finetune import Example, FinetuneOptions, finetune, label_ids, read_manifest
from streamsed.engine.loading import engine_from_model, load_engine
from tests.speech import RATE, espeak, words
from tests.test_cli import assert_one_line_error, streamsed


def write_manifest(folder, texts, language="en", task="transcribe", name="train.jsonl"):
    """One espeak clip per text, in a clips/ subfolder (paths in the manifest are relative)."""
    (folder / "clips").mkdir(exist_ok=True)
    lines = []
    for i, text in enumerate(texts):
        sf.write(folder / "clips" / f"{i}.wav", espeak(text), RATE)
        lines.append(json.dumps({"audio": f"clips/{i}.wav", "text": text, "language": language, "task": task}))
    (folder / name).write_text("\n".join(lines) + "\n")
    return folder / name


def tiny_model_dir(folder, family: str):
    if family == "whisper":
        model, extractor, tokenizer = tm.tiny_whisper()
    else:
        encoder, decoder, start = {
            "wav2vec2_bert": (tm.wav2vec2_config(), tm.bert_decoder_config(), tm.CLS),
            "wav2vec2_gpt2": (tm.wav2vec2_config(), tm.gpt2_decoder_config(), tm.CLS),
            "hubert_mbart": (tm.hubert_config(), tm.mbart_decoder_config(), tm.EOS),
        }[family]
        model = tm.speech_encoder_decoder(encoder, decoder, start=start)
        model.generation_config.eos_token_id = tm.SEP
        extractor, tokenizer = tm.wav2vec2_feature_extractor(), tm.word_tokenizer()
    for part in (model, extractor, tokenizer):
        part.save_pretrained(folder / family)
    return folder / family


TINY_TEXTS = ["w10 w11 w12 w13", "w20 w21 w22"]  # word-level vocabularies of tests/tiny_models.py


@pytest.mark.parametrize("family", ["whisper", "wav2vec2_bert", "wav2vec2_gpt2", "hubert_mbart"])
def test_tiny_model_loss_falls_and_the_checkpoint_serves(family, tmp_path):
    model_dir = tiny_model_dir(tmp_path, family)
    manifest = write_manifest(tmp_path, TINY_TEXTS)
    options = FinetuneOptions(steps=12, lr=3e-3, batch_size=2)
    report = finetune(str(model_dir), manifest, tmp_path / "out", options, device="cpu", progress=False)
    assert report.loss_after < 0.5 * report.loss_before, report
    # The saved checkpoint is the trained model: it loads as --model DIR and has the same loss.
    engine = load_engine(str(tmp_path / "out"), device="cpu")
    examples = read_manifest(manifest)
    again = finetune(str(tmp_path / "out"), manifest, tmp_path / "again", FinetuneOptions(steps=0), device="cpu",
                     progress=False)
    assert again.loss_before == pytest.approx(report.loss_after, abs=1e-4)
    assert engine.transcribe([examples[0].audio], [engine.default_target()])[0][0].text is not None


def test_whisper_labels_are_prompt_text_eos():
    model, extractor, tokenizer = tm.tiny_whisper()
    family = engine_from_model(model, extractor, tokenizer, device="cpu").family
    # <|en|>=102 <|de|>=103 <|translate|>=105 <|transcribe|>=106 <|notimestamps|>=107, EOS 100
    assert label_ids(family, tokenizer, Example(None, "w5 w6", "en", "transcribe")) == [102, 106, 107, 5, 6, 100]
    assert label_ids(family, tokenizer, Example(None, "w7", "de", "translate")) == [103, 105, 107, 7, 100]


def test_mbart_labels_start_with_the_target_language_token():
    model = tm.speech_encoder_decoder(tm.hubert_config(), tm.mbart_decoder_config(), start=tm.EOS)
    model.generation_config.eos_token_id = tm.SEP
    tokenizer = tm.word_tokenizer()
    family = engine_from_model(model, tm.wav2vec2_feature_extractor(), tokenizer, device="cpu").family
    assert label_ids(family, tokenizer, Example(None, "w9 w8", "de", "transcribe")) == [tm.DE, 9, 8, tm.SEP]


def test_finetune_command_reports_eval_wer_and_saves_a_model_translate_loads(tmp_path):
    model_dir = tiny_model_dir(tmp_path, "wav2vec2_bert")
    manifest = write_manifest(tmp_path, TINY_TEXTS)
    result = streamsed("finetune", "--model", str(model_dir), "--data", str(manifest), "--output",
                       str(tmp_path / "out"), "--steps", "3", "--lr", "1e-3", "--eval", str(manifest))
    assert result.returncode == 0, result.stderr
    assert "eval WER" in result.stdout and "loss" in result.stdout
    assert "finetune" in result.stderr  # the progress bar
    result = streamsed("translate", str(tmp_path / "clips" / "0.wav"), "--model", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("line, fragment", [
    ('{"text": "no audio"}', 'line 1: expected a JSON object with "audio" and "text"'),
    ('{"audio": "missing.wav", "text": "x"}', "line 1: audio file not found"),
    ('{"audio": "missing.wav", "text": "x", "task": "summarize"}', "task must be transcribe or translate"),
])
def test_bad_manifest_is_a_one_line_error(tmp_path, line, fragment):
    (tmp_path / "train.jsonl").write_text(line + "\n")
    result = streamsed("finetune", "--model", str(tmp_path), "--data", str(tmp_path / "train.jsonl"),
                       "--output", str(tmp_path / "out"))
    assert_one_line_error(result, fragment)


# Clips whisper-base mishears (2026-12-02: "Floorbingame.scrail", "The Quasaldranca Flimbo.").
MISHEARD = ["Florbin gazed at the skrell.", "The kwazzle drank a flimbo."]


@pytest.mark.slow
def test_whisper_base_learns_two_misheard_clips(tmp_path):
    manifest = write_manifest(tmp_path, MISHEARD)
    cpu, wall = time.process_time(), time.monotonic()
    options = FinetuneOptions(steps=5, lr=1e-4, batch_size=2, freeze_encoder=True)
    report = finetune("whisper-base", manifest, tmp_path / "out", options, eval_manifest=manifest, device="cpu",
                      progress=False)
    print(f"whisper-base finetune: {report.summary()}; CPU {time.process_time() - cpu:.0f} s, "
          f"wall {time.monotonic() - wall:.0f} s, torch threads {torch.get_num_threads()}")
    assert report.wer_before > 0.3 and report.wer_after == 0, report
    engine = load_engine(str(tmp_path / "out"), device="cpu")
    for example, text in zip(read_manifest(manifest), MISHEARD):
        hyp = engine.transcribe([example.audio], [engine.family.default_target()])[0][0]
        assert words(hyp.text) == words(text)
