"""Cut a session's appended phoneme text into segments the model can synthesise. Pure, no clock.

Rules (protocol v1): cut at sentence punctuation; at clause punctuation once the segment is long enough; never
inside a word (a word is a run of non-whitespace); never over the model's phoneme limit; the first segment of
a turn short, so audio starts early (with `short_first_segment` off it follows the same rules as the rest, the
way servers that synthesise whole sentences work). Text after the last cut waits for more input or a forced cut
(`flush`, the idle timeout, `close`). Segments are exact slices of the input: joined with the text still pending they
give back everything appended.
"""

from __future__ import annotations

import copy
import enum
import re
from dataclasses import dataclass
from typing import Final

SENTENCE_END: Final = frozenset(".!?…")
CLAUSE_END: Final = frozenset(",:;—")
# Closing quotes and brackets after punctuation stay with it ("bumps", as Kokoro's English pipeline does).
CLOSERS: Final = ")”\"'"

_WORD = re.compile(r"\S+")
_TRAILING_WORD = re.compile(r"\S*\Z")
_LEADING_WORD = re.compile(r"\A\S*")


class _Boundary(enum.Enum):
    WORD = 0
    CLAUSE = 1
    SENTENCE = 2


def _boundary_after(word: str) -> _Boundary:
    core = word.rstrip(CLOSERS) or word
    if core[-1] in SENTENCE_END:
        return _Boundary.SENTENCE
    if core[-1] in CLAUSE_END:
        return _Boundary.CLAUSE
    return _Boundary.WORD


def _run_length(match: re.Match[str] | None) -> int:
    return 0 if match is None else len(match.group())


@dataclass(frozen=True)
class Segment:
    """A cut. `text` is an exact slice of the input, whitespace included: strip it before synthesis.

    `joins_previous`: the previous segment of the turn ended in mid-sentence (at a word or clause cut), so
    this one continues its sentence. `joins_next`: this one ends in mid-sentence, and the next segment will
    continue it (a forced cut — flush, idle, close — does not join: what follows may be a while coming).
    """

    text: str
    first_in_turn: bool
    joins_previous: bool = False
    joins_next: bool = False

    def pause_caps(self, pause_frames: int | None) -> tuple[int | None, int | None]:
        """Caps on the (leading, trailing) boundary silence in frames: `pause_frames` before a turn's first word
        and on each side of a mid-sentence join, None (the model's own pause) elsewhere or when `pause_frames`
        is None (trimming off)."""
        if pause_frames is None:
            return None, None
        lead = pause_frames if self.first_in_turn or self.joins_previous else None
        return lead, pause_frames if self.joins_next else None


class Segmenter:
    """Accumulates appended text and hands out segments by the rules above.

    Bound: holds at most what the caller lets it (the session rejects a message that would take pending input
    over `max_pending_phonemes`).
    """

    def __init__(
        self,
        *,
        max_phonemes: int,
        first_segment_min_phonemes: int,
        clause_min_phonemes: int,
        short_first_segment: bool = True,
    ) -> None:
        if not 0 < first_segment_min_phonemes <= max_phonemes or not 0 < clause_min_phonemes <= max_phonemes:
            raise ValueError("segment length thresholds must be within 1..max_phonemes")
        self.max_phonemes = max_phonemes
        self.first_segment_min_phonemes = first_segment_min_phonemes
        self.clause_min_phonemes = clause_min_phonemes
        self.short_first_segment = short_first_segment
        self._buffer = ""
        self._turn_open = False  # a segment of the current turn has been cut already
        self._mid_sentence = False  # the last cut of the turn was at a word or clause, not a sentence end

    @property
    def pending(self) -> str:
        return self._buffer

    @property
    def turn_open(self) -> bool:
        """Whether a segment of the current turn has been cut already."""
        return self._turn_open

    @property
    def pending_phonemes(self) -> int:
        return len(self._buffer)

    def word_too_long(self, text: str) -> bool:
        """Whether appending `text` would create a word longer than `max_phonemes` (it could not be cut)."""
        joined = _run_length(_TRAILING_WORD.search(self._buffer)) + _run_length(_LEADING_WORD.match(text))
        longest = max((len(m.group()) for m in _WORD.finditer(text)), default=0)
        return max(joined, longest) > self.max_phonemes

    def append(self, text: str) -> None:
        self._buffer += text

    def count_cuts(self, text: str, *, force: bool = False) -> int:
        """How many segments `append(text)` and then `cut(force=force)` would hand out, leaving this segmenter
        as it is (a shallow copy is a full one: every field is a string, a bool or an int)."""
        probe = copy.copy(self)
        probe.append(text)
        return len(probe.cut(force=force))

    def cut(self, *, force: bool = False) -> list[Segment]:
        """Segments ready now. With `force`, everything pending is cut (blank text is dropped)."""
        segments: list[Segment] = []
        while (cut := self._next_cut(force)) is not None:
            end, joins_next = cut
            text, self._buffer = self._buffer[:end], self._buffer[end:]
            segments.append(
                Segment(
                    text=text,
                    first_in_turn=not self._turn_open,
                    joins_previous=self._turn_open and self._mid_sentence,
                    joins_next=joins_next,
                )
            )
            self._turn_open = True
            self._mid_sentence = joins_next
        if force:
            self._buffer = ""  # only whitespace is left
        return segments

    def end_turn(self) -> None:
        """The next segment starts a new turn (after `flush`)."""
        self._turn_open = False
        self._mid_sentence = False

    def reset(self) -> None:
        """Drop pending input and start a new turn (on `clear`)."""
        self._buffer = ""
        self._turn_open = False
        self._mid_sentence = False

    def _next_cut(self, force: bool) -> tuple[int, bool] | None:
        """Where the next segment ends, and whether it ends in mid-sentence (the next one continues it)."""
        buf = self._buffer
        lead = len(buf) - len(buf.lstrip())
        best_clause: int | None = None
        best_word: int | None = None
        for match in _WORD.finditer(buf):
            end = match.end()
            if end == len(buf) and not force:
                break  # the word may continue in the next message
            length = end - lead  # code points in the stripped segment
            if length > self.max_phonemes:
                if best_clause is not None:
                    return best_clause, True
                if best_word is not None:
                    return best_word, True
                return lead + self.max_phonemes, True  # one word over the limit: callers reject these beforehand
            kind = _boundary_after(match.group())
            if kind is _Boundary.SENTENCE:
                return end, False
            # A forced cut of everything pending ends the segment here with nothing after it yet: no join.
            joins = not (force and not buf[end:].strip())
            if not self._turn_open and self.short_first_segment:
                if kind is _Boundary.CLAUSE or length >= self.first_segment_min_phonemes:
                    return end, joins
            elif kind is _Boundary.CLAUSE and length >= self.clause_min_phonemes:
                return end, joins
            if kind is _Boundary.CLAUSE:
                best_clause = end
            best_word = end
        if force and buf.strip():
            return len(buf), False
        return None
