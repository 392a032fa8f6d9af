"""Which client message let the server cut a turn's first segment: the start of time to first audio. Pure.

Time to first audio (TTFA) is measured at the client, from sending the **trigger** to receiving the turn's first
audio frame. The trigger is the first message after which the server had everything it needed to cut the turn's
first segment (protocol v1 cuts a segment at a word end only once the next character has arrived, or when a
`flush`/`close` forces it):

- `text`: the `phonemes` message that carried the first character after the segment's last phoneme;
- `forced`: the `flush` or `close` sent once the whole segment had been sent, if that came first;
- `idle`: when neither was sent before the first frame arrived, the server cut by its idle timeout; the trigger
  is then the message that carried the segment's last phoneme, so the idle wait counts.

The segment itself is known from the server's `segment` event (alignment on): its phonemes are the turn's
input up to the cut, whitespace normalised.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass

_WORD = re.compile(r"\S+")


class Sent(enum.Enum):
    PHONEMES = "phonemes"
    FLUSH = "flush"
    CLOSE = "close"


@dataclass(frozen=True)
class SentMessage:
    kind: Sent
    text: str  # "" for flush and close
    sent_at: float


class TriggerKind(enum.Enum):
    TEXT = "text"
    FORCED = "forced"
    IDLE = "idle"


@dataclass(frozen=True)
class Trigger:
    index: int  # into the turn's messages
    kind: TriggerKind
    sent_at: float


def segment_end(turn_text: str, segment_phonemes: str) -> int | None:
    """Where the segment ends in the turn's raw text (an index past its last phoneme), or None if the segment
    is not a word-aligned prefix of the text (whitespace normalised)."""
    words = segment_phonemes.split()
    if not words:
        return None
    matches = list(_WORD.finditer(turn_text))
    if len(matches) < len(words):
        return None
    if [m.group() for m in matches[: len(words)]] != words:
        return None
    return matches[len(words) - 1].end()


def find_trigger(messages: Sequence[SentMessage], segment_phonemes: str, first_audio_at: float) -> Trigger | None:
    """The trigger of the turn's first segment (see the module's docstring), or None when the segment does not
    match what was sent."""
    turn_text = "".join(m.text for m in messages if m.kind is Sent.PHONEMES)
    end = segment_end(turn_text, segment_phonemes)
    if end is None:
        return None
    sent = 0
    last_phoneme: Trigger | None = None
    for index, message in enumerate(messages):
        if message.kind is Sent.PHONEMES:
            before = sent
            sent += len(message.text)
            if last_phoneme is None and before < end <= sent:
                last_phoneme = Trigger(index, TriggerKind.IDLE, message.sent_at)
            candidate = Trigger(index, TriggerKind.TEXT, message.sent_at) if sent > end else None
        else:
            candidate = Trigger(index, TriggerKind.FORCED, message.sent_at) if sent >= end else None
        if candidate is not None:
            if candidate.sent_at <= first_audio_at:
                return candidate
            break
    return last_phoneme
