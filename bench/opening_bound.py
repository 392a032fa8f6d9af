"""How far can a first segment's opening go ahead of a whole sentence? The model alone, one process, warm.

    python bench/opening_bound.py [--voices-dir ../shared/voices] [--voice af_heart] [--repeats 7]

For each sentence of the load generator's corpus (`rt-server bench`), cut as the server cuts it, times, median
of `--repeats` rounds run interleaved after two warm rounds:

- base:  the whole first sentence in one pass, as the baseline server synthesises it (its time to first audio);
- ours:  the opening of our first segment (>= 12 phonemes, pauses capped, sent ahead of the rest), as the server
         sends it by default;
- min:   the shortest opening the model can send: one frame of speech past the leading silence and the context,
         its window filled to its length bucket (`first_chunk_frames=1`, share 0);
- front: the front alone over our first segment (ALBERT, predictor, decoder blocks, sine source): what any
         opening must wait for, however fast the generator.

base / min bounds the time-to-first-audio ratio any opening policy could reach with this model on this machine
(the server adds the same overheads to both, which only lowers the ratio). Needs the server's default weights
(scripts/run.sh imports them) and a directory of voice packs. Prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from rt_server.loadgen.script import SENTENCES
from rt_server.model.runner import SynthesisRequest, load_runner
from rt_server.model.voices import style_row
from rt_server.pipeline.segmenter import Segmenter
from rt_server.pipeline.session_config import SessionConfig


def first_segment(text: str, *, short: bool) -> str:
    config = SessionConfig()
    segmenter = Segmenter(
        max_phonemes=510,
        first_segment_min_phonemes=config.first_segment_min_phonemes,
        clause_min_phonemes=config.clause_min_phonemes,
        short_first_segment=short,
    )
    segmenter.append(text + " ")
    return " ".join(segmenter.cut()[0].text.split())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--voices-dir", default="../shared/voices")
    parser.add_argument("--voice", default="af_heart")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    runner = load_runner("kokoro", config=None, weights=None, voices_dir=args.voices_dir)
    runner.warmup()
    voice, pause = args.voice, SessionConfig().join_pause_frames

    def whole(phonemes: str) -> float:
        started = time.perf_counter()
        runner.synthesize([SynthesisRequest(phonemes, voice)])
        return time.perf_counter() - started

    def opening(phonemes: str, frames: int | None, share: float | None) -> float:
        started, at = time.perf_counter(), []
        request = SynthesisRequest(
            phonemes, voice, max_lead_frames=pause, max_trail_frames=pause, first_chunk_frames=frames
        )
        runner.synthesize([request], lambda *_: at.append(time.perf_counter() - started), opening_share=share)
        return at[0]

    def front(phonemes: str) -> float:
        style = torch.from_numpy(style_row(runner.voices.pack(voice), phonemes).copy())
        item = runner.model.item(phonemes, style, noise=False)
        started = time.perf_counter()
        runner.model.prime(item)
        return time.perf_counter() - started

    print(f"{'ours/base ph':>12} {'base':>7} {'ours':>7} {'min':>7} {'front':>7} {'base/ours':>10} {'base/min':>9}")
    totals = dict.fromkeys(("base", "ours", "min", "front"), 0.0)
    for text in SENTENCES:
        ours, base = first_segment(text, short=True), first_segment(text, short=False)
        timers: dict[str, Callable[[], float]] = {
            "base": partial(whole, base),
            "ours": partial(opening, ours, SessionConfig().first_chunk_frames, None),
            "min": partial(opening, ours, 1, 0.0),
            "front": partial(front, ours),
        }
        times: dict[str, list[float]] = {name: [] for name in timers}
        for round_ in range(2 + args.repeats):
            for name, timer in timers.items():
                elapsed = timer()
                if round_ >= 2:
                    times[name].append(1000 * elapsed)
        ms = {name: statistics.median(values) for name, values in times.items()}
        for name in totals:
            totals[name] += ms[name]
        print(
            f"{len(ours):>5}/{len(base):<6} {ms['base']:>5.0f}ms {ms['ours']:>5.0f}ms {ms['min']:>5.0f}ms "
            f"{ms['front']:>5.0f}ms {ms['base'] / ms['ours']:>9.2f}x {ms['base'] / ms['min']:>8.2f}x"
        )
    print(
        f"{'all':>12} {'':>7} {'':>7} {'':>7} {'':>7} {totals['base'] / totals['ours']:>9.2f}x "
        f"{totals['base'] / totals['min']:>8.2f}x   (base/front {totals['base'] / totals['front']:.2f}x)"
    )


if __name__ == "__main__":
    main()
