import numpy as np
import pytest

from streamsed.core.captions import Caption, format_timestamp, to_srt, to_vtt

TWO_CUES = [
    Caption(0, 0.0, 2.5, "Hello world."),
    Caption(1, 59.9995, 3723.0456, "Second line\nand more"),
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
        "00:01:00,000 --> 01:02:03,046\n"
        "Second line\n"
        "and more\n"
    )


def test_vtt_two_cues():
    assert to_vtt(TWO_CUES) == (
        "WEBVTT\n"
        "\n"
        "0\n"
        "00:00:00.000 --> 00:00:02.500\n"
        "Hello world.\n"
        "\n"
        "1\n"
        "00:01:00.000 --> 01:02:03.046\n"
        "Second line\n"
        "and more\n"
    )


def test_no_captions():
    assert to_srt([]) == ""
    assert to_vtt([]) == "WEBVTT\n"


def test_blank_lines_are_removed_so_the_cue_does_not_end_early():
    caption = Caption(4, 1.0, 2.0, "  first\r\n\n   \nsecond  \r\rthird\n")
    assert to_srt([caption]) == "5\n00:00:01,000 --> 00:00:02,000\nfirst\nsecond\nthird\n"
    assert to_vtt([caption]) == "WEBVTT\n\n4\n00:00:01.000 --> 00:00:02.000\nfirst\nsecond\nthird\n"


def test_captions_without_text_are_skipped():
    captions = [Caption(0, 0.0, 1.0, " \n "), Caption(1, 1.0, 2.0, "kept")]
    assert to_srt(captions) == "2\n00:00:01,000 --> 00:00:02,000\nkept\n"
    assert to_vtt(captions) == "WEBVTT\n\n1\n00:00:01.000 --> 00:00:02.000\nkept\n"


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
