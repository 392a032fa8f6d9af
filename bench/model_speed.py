"""Real-time factor of the full-size KModel (compute seconds / audio seconds) for short, medium and long input.

    python bench/model_speed.py [--weights PATH] [--device cpu|cuda] [--precision fp32 bf16 bf16+compile] [--repeats 3]

A precision with `+compile` also compiles the decoder's fused kernels (`KModel.compile_kernels`) before timing.

Without --weights it uses the imported default weights when they exist, else random weights made speech-like
(durations and F0 in speech ranges; the cost of a forward pass depends only on the lengths). Prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import load_model

from rt_server.model.config import SAMPLE_RATE_HZ

# Phonemes of English sentences (misaki's espeak backend), 12, 52 and 214 code points.
INPUTS = {
    "short": "həlˈO wˈɜːld.",
    "medium": "ðə kwˈɪk bɹˈWn fˈɑks ʤˈʌmps ˌOvəɹ ðə lˈAzi dˈɔɡ.",
    "long": (
        "ɪn ðə bɪɡˈɪnɪŋ, ðə ˈjuːnɪvˌɜːs wʌz kɹiːˈeɪtɪd. ðɪs hɐz mˈeɪd ɐ lˈɑːt ʌv pˈiːpəl vˈɛɹi ˈæŋɡɹi "
        "ænd bˌiːn wˈaɪdli ɹɪɡˈɑːɹdᵻd æz ɐ bˈæd mˈuːv. ɐ lˈɑːt ʌv pˈiːpəl kˈɛɹi ɐ tˈaʊəl wɪð ðˌɛm, "
        "ænd ðeɪ ɑːɹ ɹˈaɪt."
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16", "bf16+compile"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    style = torch.randn(1, 256, generator=torch.Generator().manual_seed(0)) * 0.15
    rows = []
    baseline: dict[str, float] = {}
    for precision in args.precision:
        model = load_model(args.weights, args.device, precision.removesuffix("+compile"))
        if precision.endswith("+compile") and not model.compile_kernels():
            print(f"{precision}: compiled kernels unavailable here, timing the eager ones")
        model("hə", style, noise=False)  # warm-up: lazy initialisation of kernels
        for name, phonemes in INPUTS.items():
            times, seconds = [], 0.0
            for _ in range(args.repeats):
                if model.device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                audio = model(phonemes, style, noise=False)
                if model.device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
                seconds = audio.numel() / SAMPLE_RATE_HZ
            rtf = statistics.median(times) / seconds
            baseline.setdefault(name, rtf)
            rows.append((precision, name, len(phonemes), seconds, statistics.median(times), rtf, baseline[name] / rtf))
    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'precision':<12} {'input':<7} {'phonemes':>8} {'audio s':>8} {'compute s':>9} {'RTF':>7} {'speed-up':>8}")
    for precision, name, n, seconds, compute, rtf, gain in rows:
        print(f"{precision:<12} {name:<7} {n:>8} {seconds:>8.2f} {compute:>9.3f} {rtf:>7.3f} {gain:>7.2f}x")


if __name__ == "__main__":
    main()
