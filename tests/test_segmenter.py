"""Segmenter rules and invariants (property-based)."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from rt_server.pipeline.segmenter import SENTENCE_END, Segment, Segmenter

MAX = 60


def _segmenter(first: int = 8, clause: int = 30, max_phonemes: int = MAX) -> Segmenter:
    return Segmenter(max_phonemes=max_phonemes, first_segment_min_phonemes=first, clause_min_phonemes=clause)


def _texts(segments: list[Segment]) -> list[str]:
    return [s.text.strip() for s in segments]


def test_cuts_at_sentence_end_and_waits_for_the_rest() -> None:
    seg = _segmenter(first=MAX)
    seg.append("ab cd. ef gh")
    assert _texts(seg.cut()) == ["ab cd."]
    assert seg.pending == " ef gh"
    assert seg.cut() == []


def test_sentence_end_at_the_very_end_waits_for_more_input() -> None:
    seg = _segmenter(first=MAX)
    seg.append("ab cd.")
    assert seg.cut() == []  # "cd." may continue ("cd.." or more punctuation)
    seg.append(" ")
    assert _texts(seg.cut()) == ["ab cd."]


def test_first_segment_of_a_turn_is_short() -> None:
    seg = _segmenter(first=5)
    seg.append("ab cd ef gh ij kl mn op ")
    first, *_ = seg.cut()
    assert first.text.strip() == "ab cd"
    assert first.first_in_turn
    # later segments wait for punctuation
    assert seg.cut() == []


def test_first_segment_cuts_at_a_clause() -> None:
    seg = _segmenter(first=MAX)
    seg.append("ab, cd ef ")
    assert _texts(seg.cut()) == ["ab,"]


def test_without_a_short_first_segment_the_first_follows_the_later_rules() -> None:
    seg = Segmenter(max_phonemes=MAX, first_segment_min_phonemes=2, clause_min_phonemes=10, short_first_segment=False)
    seg.append("ab, cd ef gh ij, kl. mn ")
    out = seg.cut()
    # no cut after the first word or the first clause: the sentence, as a whole-sentence server would cut it
    assert _texts(out) == ["ab, cd ef gh ij,", "kl."]
    assert [s.first_in_turn for s in out] == [True, False]
    seg.end_turn()
    seg.append("op qr st uv wx yz ")
    assert seg.cut() == []  # a new turn's first segment still waits for punctuation


def test_clause_cut_needs_length_after_the_first_segment() -> None:
    seg = _segmenter(first=2, clause=10)
    seg.append("xx yy aa, bb, cc dd ee ff, gg ")
    out = seg.cut()
    assert _texts(out) == ["xx", "yy aa, bb,", "cc dd ee ff,"]
    assert [s.first_in_turn for s in out] == [True, False, False]


def test_end_turn_makes_the_next_segment_first_again() -> None:
    seg = _segmenter(first=MAX)
    seg.append("aa bb. cc dd")
    seg.cut(force=True)
    seg.end_turn()
    seg.append("ee ff. ")
    assert [s.first_in_turn for s in seg.cut()] == [True]


def test_closing_quote_stays_with_the_sentence() -> None:
    seg = _segmenter(first=MAX)
    seg.append("“ab cd.” ef ")
    assert _texts(seg.cut()) == ["“ab cd.”"]


def test_long_input_without_punctuation_is_cut_at_word_boundaries_within_the_limit() -> None:
    seg = _segmenter(first=8, clause=MAX)
    words = ["abcdefgh"] * 30
    seg.append(" ".join(words) + " ")
    out = seg.cut()
    assert out, "over the limit: must cut without waiting for punctuation"
    assert all(len(t) <= MAX for t in _texts(out))
    assert all(t.split() and all(w == "abcdefgh" for w in t.split()) for t in _texts(out))


def test_prefers_clause_over_word_when_over_the_limit() -> None:
    seg = _segmenter(first=1, clause=MAX)
    seg.append("a ")
    seg.cut()  # the short first segment
    seg.append("bbbb, " + "cccc " * 14)
    out = seg.cut()
    assert _texts(out)[0] == "bbbb,"


def test_word_too_long_is_detected_across_messages() -> None:
    seg = _segmenter()
    assert not seg.word_too_long("x" * MAX)
    assert seg.word_too_long("x" * (MAX + 1))
    seg.append("ab " + "y" * (MAX - 1))
    assert seg.word_too_long("yy ")
    assert not seg.word_too_long(" yy")


def test_reset_drops_input() -> None:
    seg = _segmenter()
    seg.append("ab cd")
    seg.reset()
    assert seg.pending == ""
    assert seg.cut(force=True) == []


_WORD = st.text(alphabet="abəɪˈː", min_size=1, max_size=12)
_PUNCT = st.sampled_from(["", "", "", ".", ",", "!", "?", ";", "—", "…", ".”", ")"])
_SPACE = st.sampled_from([" ", " ", "  ", "\n", " \t"])


@st.composite
def _pieces(draw: st.DrawFn) -> list[str]:
    tokens = draw(st.lists(st.tuples(_WORD, _PUNCT, _SPACE), min_size=1, max_size=60))
    text = "".join(w + p + s for w, p, s in tokens)
    # split into arbitrary messages
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=6)))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=300, deadline=None)
@given(_pieces(), st.integers(1, 40), st.integers(1, 60))
def test_invariants(pieces: list[str], first: int, clause: int) -> None:
    seg = _segmenter(first=min(first, MAX), clause=min(clause, MAX))
    text = "".join(pieces)
    out = []
    appended = ""
    for piece in pieces:
        seg.append(piece)
        appended += piece
        out.extend(seg.cut())
        # segments plus what is pending give back the input, exactly
        assert "".join(s.text for s in out) + seg.pending == appended
    out.extend(seg.cut(force=True))
    assert seg.pending == ""
    # nothing lost: the words come back in order
    assert "".join(s.text for s in out).split() == text.split()
    for s in out:
        stripped = s.text.strip()
        assert stripped, "no blank segments"
        assert len(stripped) <= MAX, "never over the model's limit"
    # never inside a word: every cut falls between a word's end and whitespace
    position = 0
    for s in out[:-1]:
        position += len(s.text)
        assert not text[position - 1].isspace()
        assert text[position].isspace()
    # sentence punctuation followed by whitespace always ends a segment
    for s in out:
        core = s.text.strip()
        for i, ch in enumerate(core[:-1]):
            if ch in SENTENCE_END and core[i + 1].isspace():
                raise AssertionError(f"sentence end inside a segment: {core!r}")
    assert out[0].first_in_turn
    assert not any(s.first_in_turn for s in out[1:])


def test_segments_say_where_they_join_a_neighbour_in_mid_sentence() -> None:
    """The flags the session uses to cut pauses: a word or clause cut joins the next segment; a sentence end and
    a forced cut do not; a new turn starts fresh."""
    seg = _segmenter(first=5, clause=8)
    seg.append("ab cd ef gh ij, kl mn op qr. st uv ")
    got = seg.cut()
    assert _texts(got) == ["ab cd", "ef gh ij,", "kl mn op qr."]
    assert [(s.first_in_turn, s.joins_previous, s.joins_next) for s in got] == [
        (True, False, True),  # the short first segment: cut at a word
        (False, True, True),  # continues the sentence, cut at a long enough clause
        (False, True, False),  # continues it, ends it
    ]
    forced = seg.cut(force=True)  # "st uv" after a sentence end, cut by a flush
    assert [(s.text.strip(), s.joins_previous, s.joins_next) for s in forced] == [("st uv", False, False)]
    seg.end_turn()
    seg.append("wx yz ab cd ")
    first = seg.cut()
    assert [(s.first_in_turn, s.joins_previous, s.joins_next) for s in first] == [(True, False, True)]
    seg.reset()
    seg.append("ab. ")
    assert [(s.first_in_turn, s.joins_previous, s.joins_next) for s in seg.cut()] == [(True, False, False)]


def test_a_forced_cut_never_joins_the_next_segment() -> None:
    """Whether the text forced out by a flush or the idle timer ends at a clause, at a word past the first
    segment's length, or anywhere else, what follows may be a while coming: no pause is cut after it."""
    for text in ("ab cd ef gh ij, ", "ab cd ef gh ij ", "ab cd ef"):
        seg = _segmenter(first=5, clause=8)
        seg.append("xy. ")
        seg.cut()
        seg.append(text)
        forced = seg.cut(force=True)
        assert forced and not forced[-1].joins_next, text
        seg.append("kl mn. ")
        (after,) = seg.cut()
        assert not after.joins_previous, text


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["ab", "cd,", "ef.", "gh", "ijk", " "]), min_size=1, max_size=30), st.booleans())
def test_join_flags_agree_between_neighbours(words: list[str], force: bool) -> None:
    seg = _segmenter(first=5, clause=8)
    segments: list[Segment] = []
    for word in words:
        seg.append(word + " ")
        segments += seg.cut()
    forced = seg.cut(force=force)
    segments += forced
    for before, after in itertools.pairwise(segments):
        assert before.joins_next == after.joins_previous
    if forced:  # a segment cut earlier may have promised a join that the flush then ended: that is allowed
        assert not forced[-1].joins_next


def test_pause_caps_follow_the_join_flags() -> None:
    first = Segment("ab cd", first_in_turn=True, joins_next=True)
    middle = Segment("ef gh,", first_in_turn=False, joins_previous=True, joins_next=True)
    last = Segment("ij.", first_in_turn=False, joins_previous=True)
    alone = Segment("kl.", first_in_turn=False)
    assert [s.pause_caps(2) for s in (first, middle, last, alone)] == [(2, 2), (2, 2), (2, None), (None, None)]
    assert first.pause_caps(None) == (None, None)  # trimming off


def test_count_cuts_foretells_the_next_cut_and_changes_nothing() -> None:
    seg = _segmenter()
    seg.append("hɛlˈoʊ wˈɜːld ")
    assert [s.text for s in seg.cut()] == ["hɛlˈoʊ wˈɜːld"]  # the turn is open now: later cuts follow the rest
    for text in ["ə. ə. ə", " bˈʌt, ", "ðɪs ɪz ɐ lˈɔŋ wˈʌn. ænd", "", "   "]:
        before = (seg.pending, seg.turn_open)
        predicted = seg.count_cuts(text)
        assert (seg.pending, seg.turn_open) == before
        seg.append(text)
        assert len(seg.cut()) == predicted
