import numpy as np
import pytest

from streamsed.core.captions import Caption, format_timestamp, split_cues, to_srt, to_vtt

TWO_CUES = [
    Caption(0, 0.0, 2.5, "Hello world."),
    Caption(1, 3719.9995, 3723.0456, "Second line\nand more"),
]


@pytest.mark.parametrize(
    ("seconds", "srt", "vtt"),
    [
        (0, "00:00:00,000", "00:00:00.000"),
        (0.0004, "00:00:00,000", "00:00:00.000"),
        (0.0005, "00:00:00,001", "00:00:00.001"),
        (0.0025, "00:00:00,003", "00:00:00.003"),  # round() would give 2 (half to even)
        (4.0005, "00:00:04,001", "00:00:04.001"),  # 4.0005 * 1000 == 4000.4999999999995
        (59.9995, "00:01:00,000", "00:01:00.000"),
        (3600, "01:00:00,000", "01:00:00.000"),
        (3723.0456, "01:02:03,046", "01:02:03.046"),
        (100 * 3600 + 0.25, "100:00:00,250", "100:00:00.250"),
        (np.float64(2.5), "00:00:02,500", "00:00:02.500"),
    ],
)
def test_format_timestamp(seconds, srt, vtt):
    assert format_timestamp(seconds) == srt
    assert format_timestamp(seconds, "srt") == srt
    assert format_timestamp(seconds, "vtt") == vtt


@pytest.mark.parametrize("seconds", [-0.001, float("nan"), float("inf")])
def test_format_timestamp_rejects_invalid_times(seconds):
    with pytest.raises(ValueError, match="non-negative"):
        format_timestamp(seconds)


def test_format_timestamp_rejects_unknown_format():
    with pytest.raises(ValueError, match="unknown caption format 'ass'"):
        format_timestamp(1.0, "ass")


def test_srt_two_cues():
    assert to_srt(TWO_CUES) == (
        "1\n"
        "00:00:00,000 --> 00:00:02,500\n"
        "Hello world.\n"
        "\n"
        "2\n"
        "01:02:00,000 --> 01:02:03,046\n"
        "Second line and more\n"  # one cue's text is laid out anew: one line while it fits in 42
    )


def test_vtt_two_cues():
    assert to_vtt(TWO_CUES) == (
        "WEBVTT\n"
        "\n"
        "0-0\n"
        "00:00:00.000 --> 00:00:02.500\n"
        "Hello world.\n"
        "\n"
        "1-0\n"
        "01:02:00.000 --> 01:02:03.046\n"
        "Second line and more\n"
    )


def test_no_captions():
    assert to_srt([]) == ""
    assert to_vtt([]) == "WEBVTT\n"


def test_blank_lines_are_removed_so_the_cue_does_not_end_early():
    caption = Caption(4, 1.0, 2.0, "  first\r\n\n   \nsecond  \r\rthird\n")
    assert to_srt([caption]) == "1\n00:00:01,000 --> 00:00:02,000\nfirst second third\n"
    assert to_vtt([caption]) == "WEBVTT\n\n4-0\n00:00:01.000 --> 00:00:02.000\nfirst second third\n"


def test_captions_without_text_are_skipped():
    captions = [Caption(0, 0.0, 1.0, " \n "), Caption(1, 1.0, 2.0, "kept")]
    assert to_srt(captions) == "1\n00:00:01,000 --> 00:00:02,000\nkept\n"
    assert to_vtt(captions) == "WEBVTT\n\n1-0\n00:00:01.000 --> 00:00:02.000\nkept\n"


LONG = ("When we reached the station it was already dark and cold, the last train had left twenty minutes "
        "before, and so the four of us decided to walk home together along the river.")


def timed(text, start, seconds_per_word):
    return [{"word": word, "start": round(start + i * seconds_per_word, 3),
             "end": round(start + (i + 1) * seconds_per_word - 0.05, 3)} for i, word in enumerate(text.split())]


def test_a_long_final_becomes_subtitle_sized_cues_cut_at_word_timings():
    words = timed(LONG, 10.0, 0.45)
    caption = Caption(7, 9.8, words[-1]["end"] + 0.3, LONG, words)
    cues = split_cues(caption)
    assert len(cues) >= 3
    assert [c.id for c in cues] == [f"7-{n}" for n in range(len(cues))]
    assert " ".join(" ".join(c.lines) for c in cues) == LONG  # every word, in order, nothing else
    starts = {w["start"] for w in words}
    for n, cue in enumerate(cues):
        assert 1 <= len(cue.lines) <= 2 and all(len(line) <= 42 for line in cue.lines)
        assert cue.end - cue.start <= 7.0
        if n:  # each cut at the start of a word, and the cues follow one another without gaps
            assert cue.start in starts and cue.start == cues[n - 1].end
    assert cues[0].start == caption.start and cues[-1].end == caption.end
    vtt = to_vtt([caption])
    assert "7-0\n00:00:09.800 --> " in vtt and f"{cues[1].id}\n" in vtt
    assert to_srt([caption]).split("\n\n")[-1].startswith(f"{len(cues)}\n")


def test_slow_speech_is_cut_by_the_seven_second_rule():
    text = "one two three four five six seven eight"
    caption = Caption(0, 0.0, 16.0, text, timed(text, 0.0, 2.0))  # fits two lines, but lasts 16 s
    cues = split_cues(caption)
    assert len(cues) >= 3 and all(c.end - c.start <= 7.0 for c in cues)


def test_without_word_timings_cuts_are_placed_by_characters():
    caption = Caption(3, 0.0, 12.0, LONG)
    cues = split_cues(caption)
    assert len(cues) >= 3 and " ".join(" ".join(c.lines) for c in cues) == LONG
    assert all(0 < c.end - c.start <= 7.0 for c in cues) and cues[-1].end == 12.0
    assert [c.start for c in cues] == sorted(c.start for c in cues)


def test_vtt_escapes_markup_and_arrows_but_srt_keeps_text():
    caption = Caption(0, 0.0, 1.0, "a --> b & <i>c</i>")
    assert to_vtt([caption]).splitlines()[-1] == "a --&gt; b &amp; &lt;i&gt;c&lt;/i&gt;"
    assert to_srt([caption]).splitlines()[-1] == "a --> b & <i>c</i>"


@pytest.mark.parametrize(
    ("index", "start", "end"),
    [(-1, 0.0, 1.0), (0, -1.0, 1.0), (0, 2.0, 1.0), (0, 0.0, float("nan"))],
)
def test_invalid_captions_are_rejected(index, start, end):
    with pytest.raises(ValueError):
        Caption(index, start, end, "text")
