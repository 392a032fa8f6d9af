"""Batched vs single-run throughput of KModel: audio seconds produced per compute second.

    python bench/batch_throughput.py [--sizes 1 2 4 8 16 32] [--device cpu|cuda] [--precision fp32]
                                     [--plot docs/batch_throughput.png]

For each batch size B it draws segments from a realistic streaming mix (a third short first-segments of 8-24
phonemes, the rest 30-160), runs B of them as one `forward_batch` and as a loop of single runs in the same
process, and prints audio-s/compute-s for both and their ratio. `--mix random` takes B segments as they come;
`--mix bucketed` (the default, what the scheduler does) draws 4B and keeps B of similar length, as
`rt_server.pipeline.bucketing` would. The padding column is the share of padded frames in the batch.
Real weights when imported, else random speech-like ones.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from common import load_model

from rt_server.model.config import SAMPLE_RATE_HZ
from rt_server.model.kmodel import BatchItem, BatchOutput, KModel

ALPHABET = "ðəkwˈɪbɹWnfɑsʤʌmpOvlAzidɔɡhɛtɚæŋuθ"


def segment(rng: random.Random) -> str:
    n = rng.randint(8, 24) if rng.random() < 1 / 3 else rng.randint(30, 160)
    words = []
    while sum(len(w) + 1 for w in words) < n:
        words.append("".join(rng.choice(ALPHABET) for _ in range(rng.randint(2, 7))))
    return " ".join(words)[:n].rstrip() + "."


def timed_batches(model: KModel, batches: list[list[BatchItem]]) -> tuple[float, list[BatchOutput]]:
    """Run the batches one after another; the wall time and every output."""
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = [out for batch in batches for out in model.forward_batch(batch)]
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--mix", choices=["bucketed", "random"], default="bucketed")
    parser.add_argument("--plot", default=None, help="write a PNG plot here (needs matplotlib)")
    args = parser.parse_args()
    model = load_model(None, args.device, args.precision)
    style = torch.randn(256, generator=torch.Generator().manual_seed(0)) * 0.15
    model.forward_batch([model.item("hə", style, noise=False)])  # warm-up
    rng = random.Random(0)
    rows = []
    for size in args.sizes:
        texts = [segment(rng) for _ in range(size if args.mix == "random" else 4 * size)]
        if args.mix == "bucketed":
            texts.sort(key=len)
            start = rng.randrange(len(texts) - size + 1)
            texts = texts[start : start + size]
        items = [model.item(text, style, 1.0, noise=False) for text in texts]
        batch_s, outputs = timed_batches(model, [items])
        single_s, _ = timed_batches(model, [[it] for it in items])
        audio_s = sum(o.audio.numel() for o in outputs) / SAMPLE_RATE_HZ
        phonemes = sum(int(it.input_ids.numel()) - 2 for it in items)
        lengths = [o.audio.numel() for o in outputs]
        padding = 1 - sum(lengths) / (len(lengths) * max(lengths))
        rows.append((size, phonemes, audio_s, padding, audio_s / batch_s, audio_s / single_s, single_s / batch_s))
    print(
        f"device={model.device} precision={args.precision} threads={torch.get_num_threads()} torch={torch.__version__}"
    )
    print(f"mix={args.mix}")
    header = ("batch", "phonemes", "audio s", "padding", "batched x RT", "single x RT", "ratio")
    print("{:>5} {:>8} {:>8} {:>7} {:>12} {:>11} {:>6}".format(*header))
    for size, phonemes, audio_s, padding, batched, single, ratio in rows:
        print(
            f"{size:>5} {phonemes:>8} {audio_s:>8.1f} {padding:>7.0%} {batched:>12.2f} {single:>11.2f} {ratio:>5.2f}x"
        )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r[0] for r in rows], [r[4] for r in rows], "o-", label="forward_batch")
        ax.plot([r[0] for r in rows], [r[5] for r in rows], "s--", label="loop of single runs")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("audio seconds per compute second")
        ax.set_title(f"KModel throughput ({model.device}, {args.precision})")
        ax.legend()
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
