"""Batched vs single-run throughput of KModel: audio seconds produced per compute second.

    python bench/batch_throughput.py [--sizes 1 2 4 8 16 32] [--device cpu|cuda] [--precision fp32]
                                     [--compile] [--repeats 3] [--plot docs/batch_throughput.png]

For each batch size B it draws segments from a realistic streaming mix (a third short first-segments of 8-24
phonemes, the rest 30-160), runs B of them as one `forward_batch` and as a loop of single runs in the same
process, and prints audio-s/compute-s for both and their ratio. `--mix random` takes B segments as they come;
`--mix bucketed` (the default, what the scheduler does) draws 4B and keeps B of similar length, as
`rt_server.pipeline.bucketing` would. The padding column is the share of padded frames in the batch.
Real weights when imported, else random speech-like ones.

Each batch runs once both ways untimed first (kernels are built per input length, on a CPU by oneDNN, on a GPU
by cuDNN autotuning and the allocator), then `--repeats` times each way, alternating, and the median counts.
`--compile` compiles the fused kernels as the server does by default (`KModel.compile_kernels`).
"""

from __future__ import annotations

import argparse
import random
import statistics
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


def measure(
    model: KModel, items: list[BatchItem], size: int, repeats: int
) -> tuple[int, int, float, float, float, float, float]:
    """One table row: the batch as one `forward_batch` against the loop of single runs, medians of `repeats`
    alternating runs after an untimed one each way."""
    batches, singles = [items], [[it] for it in items]
    timed_batches(model, batches)
    timed_batches(model, singles)
    batch_times, single_times = [], []
    for _ in range(repeats):
        batch_s, outputs = timed_batches(model, batches)
        single_s, _ = timed_batches(model, singles)
        batch_times.append(batch_s)
        single_times.append(single_s)
    batch_s, single_s = statistics.median(batch_times), statistics.median(single_times)
    audio_s = sum(o.audio.numel() for o in outputs) / SAMPLE_RATE_HZ
    phonemes = sum(int(it.input_ids.numel()) - 2 for it in items)
    lengths = [o.audio.numel() for o in outputs]
    padding = 1 - sum(lengths) / (len(lengths) * max(lengths))
    return size, phonemes, audio_s, padding, audio_s / batch_s, audio_s / single_s, single_s / batch_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--mix", choices=["bucketed", "random"], default="bucketed")
    parser.add_argument("--plot", default=None, help="write a PNG plot here (needs matplotlib)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each batch, each way (median)")
    parser.add_argument("--compile", action="store_true", help="compiled fused kernels, as the server runs")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    model = load_model(None, args.device, args.precision)
    if args.compile:
        model.compile_kernels()
    style = torch.randn(256, generator=torch.Generator().manual_seed(0)) * 0.15
    rng = random.Random(0)
    rows = []
    with torch.inference_mode():
        for size in args.sizes:
            texts = [segment(rng) for _ in range(size if args.mix == "random" else 4 * size)]
            if args.mix == "bucketed":
                texts.sort(key=len)
                start = rng.randrange(len(texts) - size + 1)
                texts = texts[start : start + size]
            items = [model.item(text, style, 1.0, noise=False) for text in texts]
            rows.append(measure(model, items, size, args.repeats))
    print(
        f"device={model.device} precision={args.precision} compiled kernels={args.compile} "
        f"threads={torch.get_num_threads()} torch={torch.__version__}"
    )
    print(f"mix={args.mix} repeats={args.repeats} (median), each after an untimed run")
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
