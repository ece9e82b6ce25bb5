"""StopChecker tests: stop strings across token boundaries, hold-back, and a split-invariance
property against a whole-text oracle."""
from hypothesis import example, given, settings
from hypothesis import strategies as st

from server.engine.stop_checker import StopChecker


def feed(stop: list[str], pieces: list[str]) -> tuple[list[tuple[str, bool]], StopChecker]:
    checker = StopChecker(stop)
    return [checker.process(p) for p in pieces], checker


def test_stop_split_over_two_tokens():
    outs, checker = feed(["###"], ["Hello #", "## world"])
    assert outs == [("Hello ", False), ("", True)]
    assert checker.text == "Hello " and checker.stopped


def test_stop_split_over_three_tokens():
    outs, checker = feed(["<end>"], ["abc<", "en", "d>tail"])
    assert outs == [("abc", False), ("", False), ("", True)]
    assert checker.text == "abc"


def test_stop_inside_one_token_cuts_exactly():
    outs, _ = feed(["STOP"], ["one two STOP three"])
    assert outs == [("one two ", True)]


def test_after_stopping_nothing_more_is_emitted():
    checker = StopChecker(["x"])
    assert checker.process("abxcd") == ("ab", True)
    assert checker.process("more") == ("", True)
    assert checker.flush() == ""
    assert checker.text == "ab"


def test_later_completing_stop_that_starts_earlier_wins():
    # "bc" completes first, but "abcd" starts earlier and the earliest match wins
    outs, checker = feed(["bc", "abcd"], ["xab", "c", "d", "e"])
    assert outs == [("x", False), ("", False), ("", True), ("", True)]
    assert checker.text == "x"


def test_earlier_completing_stop_wins_when_the_longer_one_breaks():
    outs, checker = feed(["bc", "abcd"], ["xab", "c", "z"])
    assert outs == [("x", False), ("", False), ("a", True)]


def test_earliest_match_within_one_piece():
    outs, _ = feed(["cd", "bcx"], ["abcdbcx"])
    assert outs == [("ab", True)]
    outs, _ = feed(["bcd", "cd"], ["abcd"])
    assert outs == [("a", True)]


def test_partial_prefix_is_held_then_released():
    outs, checker = feed(["abd"], ["xab", "c"])
    assert outs == [("x", False), ("abc", False)]
    assert not checker.stopped


def test_overlapping_prefix_releases_only_what_cannot_match():
    # "aab": after "aa" the last "a" may still start the stop string
    outs, _ = feed(["ab"], ["a", "a", "a", "b"])
    assert outs == [("", False), ("a", False), ("a", False), ("", True)]


def test_no_stop_strings_pass_through():
    outs, checker = feed([], ["he", "", "llo"])
    assert outs == [("he", False), ("", False), ("llo", False)]
    assert checker.flush() == "" and checker.text == "hello"


def test_empty_stop_strings_are_ignored():
    outs, _ = feed([""], ["abc"])
    assert outs == [("abc", False)]


def test_flush_releases_held_back_tail():
    checker = StopChecker(["END"])
    assert checker.process("the EN") == ("the ", False)
    assert checker.flush() == "EN"
    assert checker.text == "the EN" and not checker.stopped


def test_flush_cuts_a_match_still_waiting_on_a_longer_candidate():
    checker = StopChecker(["bc", "abcd"])
    assert checker.process("abc") == ("", False)
    assert checker.flush() == "a"
    assert checker.stopped


def test_unicode_stop_strings():
    outs, _ = feed(["終了"], ["日本語の", "終", "わり終", "了です"])
    assert outs == [("日本語の", False), ("", False), ("終わり", False), ("", True)]
    outs, _ = feed(["🛑"], ["héllo ", "🛑", "!"])
    assert outs == [("héllo ", False), ("", True), ("", True)]


@st.composite
def text_and_stops(draw) -> tuple[str, list[str]]:
    """Two-letter texts, with stop strings often cut from the text so that they match and
    overlap each other."""
    text = draw(st.text(alphabet="ab", max_size=30))
    slices = st.tuples(st.integers(0, len(text)), st.integers(1, 5)).map(
        lambda start_len: text[start_len[0]:start_len[0] + start_len[1]])
    random_stops = st.text(alphabet="ab", min_size=1, max_size=5)
    stop = draw(st.lists(st.one_of(slices, random_stops), max_size=3))
    return text, [s for s in stop if s]  # SamplingParams drops empty stop strings


@settings(max_examples=1000, deadline=None)
@given(case=text_and_stops(), cuts=st.lists(st.integers(0, 30), max_size=12))
@example(case=("abab", ["ba", "abab"]), cuts=[3])  # "ba" completes first, "abab" starts first
def test_any_split_gives_text_up_to_first_match(case, cuts):
    text, stop = case
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])] + [""]
    checker = StopChecker(stop)
    fed, emitted = "", ""
    for piece in pieces:
        fed += piece
        out, stopped = checker.process(piece)
        emitted += out
        if not stopped:  # only a possible stop-string start is held back
            assert len(fed) - len(emitted) < max([len(s) for s in stop], default=1)
    emitted += checker.flush()
    matches = [i for i in (text.find(s) for s in stop) if i >= 0]
    assert emitted == text[:min(matches, default=len(text))]
    assert checker.text == emitted and checker.stopped == bool(matches)


def test_matches_are_passed_over_until_stopping_is_allowed():
    checker = StopChecker(["ab"])
    assert checker.process("xab", can_stop=False) == ("xab", False)
    assert checker.process("ya", can_stop=False) == ("y", False)   # "a" may still become "ab"
    assert checker.process("bz", can_stop=True) == ("", True)
    assert checker.text == "xaby"
