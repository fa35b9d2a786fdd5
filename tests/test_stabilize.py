"""LocalAgreement-2: exact stable/unstable for hypothesis sequences; committed text never changes."""

import pytest

from streamsed.core.stabilize import LocalAgreement, join_text, split_units


def run(hypotheses):
    agreement = LocalAgreement()
    return [agreement.update(h) for h in hypotheses]


def test_first_hypothesis_commits_nothing():
    assert run(["hello world"]) == [("", "hello world")]


def test_prefix_agreed_by_two_hypotheses_is_committed():
    assert run(["hello", "hello world", "hello world how", "hello world how are you"]) == [
        ("", "hello"),
        ("hello", "world"),
        ("hello world", "how"),
        ("hello world how", "are you"),
    ]


def test_disagreement_commits_only_the_common_prefix():
    assert run(["the cat sat", "the cap sat on", "the cap sat on the mat"]) == [
        ("", "the cat sat"),
        ("the", "cap sat on"),
        ("the cap sat on", "the mat"),
    ]


def test_committed_text_never_changes_when_later_hypotheses_disagree():
    results = run(["I scream", "I scream for", "Ice cream for you", "Ice cream for you all", ""])
    assert results == [
        ("", "I scream"),
        ("I scream", "for"),
        # The committed units keep their place: "Ice cream" is aligned to "I scream" by position,
        # and the tails ("for" twice) agree, so "for" is committed after the old text.
        ("I scream for", "you"),
        ("I scream for you", "all"),
        ("I scream for you", ""),
    ]
    stables = [stable for stable, _ in results]
    for before, after in zip(stables, stables[1:]):
        assert after.startswith(before)


def test_punctuation_changes_are_disagreements():
    assert run(["Hello everyone", "Hello everyone.", "Hello everyone. Thank"]) == [
        ("", "Hello everyone"),
        ("Hello", "everyone."),
        ("Hello everyone.", "Thank"),
    ]


def test_same_hypothesis_twice_commits_all_of_it_and_a_shorter_one_keeps_it():
    assert run(["a b c", "a b c", "a b"]) == [("", "a b c"), ("a b c", ""), ("a b c", "")]


def test_reset_starts_a_new_utterance():
    agreement = LocalAgreement()
    agreement.update("one two")
    assert agreement.update("one two three") == ("one two", "three")
    agreement.reset()
    assert agreement.stable == ""
    assert agreement.update("four five") == ("", "four five")


def test_whitespace_is_normalised():
    assert run(["  hello   big\tworld ", "hello big world\n"]) == [("", "hello big world"), ("hello big world", "")]


def test_cjk_text_is_compared_per_character_and_joined_without_spaces():
    assert split_units("我们今天开会。") == ["我", "们", "今", "天", "开", "会", "。"]
    assert run(["我们今天", "我们今天开会", "我们今天开会。"]) == [
        ("", "我们今天"),
        ("我们今天", "开会"),
        ("我们今天开会", "。"),
    ]


def test_mixed_scripts_keep_words_whole():
    assert split_units("我用Python写代码 ok") == ["我", "用", "Python", "写", "代", "码", "ok"]
    assert run(["今日は Tokyo です", "今日は Tokyo でした"]) == [("", "今日はTokyoです"), ("今日はTokyoで", "した")]


@pytest.mark.parametrize(
    ("left", "right", "joined"),
    [("hello", "world", "hello world"), ("", "world", "world"), ("hello", "", "hello"), ("我们", "开会", "我们开会"),
     ("I said", "好", "I said好")],
)
def test_join_text_gives_the_current_view(left, right, joined):
    assert join_text(left, right) == joined
