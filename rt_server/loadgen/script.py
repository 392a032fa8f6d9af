"""What a simulated client says: English sentences in Kokoro's phonemes, cut into messages. Pure.

The phonemes were generated with misaki's eSpeak backend (`EspeakG2P(language="en-us")`), the same sentences
as the intelligibility tier (tests/test_intelligibility.py) plus a few longer ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

SENTENCES: Final[tuple[str, ...]] = (
    "həlˈO wˈɜːld, ðɪs ɪz ɐ tˈɛst ʌvðə spˈiːʧ sˈɪnθəsˌIzɚ.",
    "ðə kwˈɪk bɹˈWn fˈɑːks ʤˈʌmps ˌOvɚ ðə lˈAzi dˈɑːɡ.",
    "plˈiːz kˈɔːl mˌiː bˈæk wɛn juː ɡɛt hˈOm tənˈIt.",
    "ɪt wʌzɐ bɹˈIt kˈOld dˈA ɪn ˈApɹəl.",
    "wiː wɪl mˈiːt æt ðə tɹˈAn stˈAʃən təmˈɑːɹO mˈɔːɹnɪŋ.",
    "ˈOpən ðə dˈɔːɹ ænd tˈɜːn ɔnðə lˈIt.",
)  # fmt: skip


@dataclass(frozen=True)
class TurnScript:
    """One turn: `messages` are sent `interval_s` apart (all at once when there is one), then a flush."""

    messages: tuple[str, ...]
    interval_s: float

    @property
    def text(self) -> str:
        return "".join(self.messages)


def passage(index: int, num_sentences: int) -> str:
    """`num_sentences` consecutive sentences of the corpus, starting at `index` (wrapping around)."""
    if num_sentences < 1:
        raise ValueError("a passage needs at least one sentence")
    return " ".join(SENTENCES[(index + i) % len(SENTENCES)] for i in range(num_sentences))


def word_messages(text: str) -> tuple[str, ...]:
    """One message per word, each word followed by one space (a front end that emits a word once it is
    complete, the way an LLM's tokens pass through a streaming G2P). Joined they give the words of `text`."""
    return tuple(word + " " for word in text.split())


def turn_script(text: str, *, words_per_s: float | None) -> TurnScript:
    """Word by word at `words_per_s`, or the whole text in one message when it is None."""
    if words_per_s is None:
        return TurnScript((text,), 0.0)
    if words_per_s <= 0:
        raise ValueError("words_per_s must be positive")
    return TurnScript(word_messages(text), 1.0 / words_per_s)
