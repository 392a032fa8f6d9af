"""Command line: `rt-server synth|serve|say|weights|bench`. The only module that configures logging."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import wave
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from rt_server.settings import SettingsError, parse_bool

Handler = Callable[[argparse.Namespace], int]


def write_wav(path: str | Path, audio: np.ndarray, sample_rate_hz: int) -> None:
    """Write mono float audio as 16-bit PCM WAV (clipped to [-1, 1])."""
    pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate_hz)
        out.writeframes(pcm.tobytes())


def add_model_arguments(parser: argparse.ArgumentParser, *, compile_by_default: bool = True) -> None:
    """Where the model comes from: flags, else RT_SERVER_* variables, else the imported default weights.

    `compile_by_default`: whether `--compile` is on unless RT_SERVER_COMPILE or a flag says otherwise (off for
    one-shot commands, where compiling would cost more than it saves)."""
    env = os.environ.get
    try:
        compile_default = parse_bool(
            "RT_SERVER_COMPILE", env("RT_SERVER_COMPILE", "on" if compile_by_default else "off")
        )
    except SettingsError as exc:
        parser.error(str(exc))
    parser.add_argument("--weights", default=env("RT_SERVER_WEIGHTS"), help="checkpoint .pth/.safetensors")
    parser.add_argument("--config", default=env("RT_SERVER_CONFIG"), help="config.json (default: bundled v1.0)")
    parser.add_argument("--voices-dir", default=env("RT_SERVER_VOICES_DIR"), help="directory of voice packs")
    parser.add_argument("--device", default=env("RT_SERVER_DEVICE", "auto"), help="cpu, cuda or auto")
    parser.add_argument(
        "--precision",
        default=env("RT_SERVER_PRECISION", "auto"),
        choices=["auto", "fp32", "bf16", "fp16", "int8"],
        help="auto (default): bf16 on CPUs with AMX, int8 on CPUs with AVX512-BF16 and VNNI but no AMX, bf16 on "
        "other AVX512-BF16 CPUs and recent GPUs, else fp32; int8: bf16 with the generator's convolutions in int8 "
        "(CPU only)",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=compile_default,
        help="with bf16/fp16/int8, compile the decoder's fused kernels at load (torch.compile; default: "
        + ("on)" if compile_by_default else "off for this one-shot command)"),
    )


def _synth(args: argparse.Namespace) -> int:
    from rt_server.model.kmodel import PhonemeError
    from rt_server.model.runner import SynthesisRequest, load_runner, tiny_runner
    from rt_server.model.voices import VoiceError

    runner = (
        tiny_runner()
        if args.tiny
        else load_runner(
            "default",
            config=args.config,
            weights=args.weights,
            voices_dir=args.voices_dir,
            device=args.device,
            precision=args.precision,
            compile_kernels=args.compile,
        )
    )
    voice = args.voice or runner.voice_names()[0]
    try:
        runner.check_voice(voice)
        started = time.perf_counter()
        result = runner.synthesize([SynthesisRequest(args.phonemes, voice, args.speed, args.seed)])[0]
    except (PhonemeError, VoiceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started
    write_wav(args.out, result.audio, runner.sample_rate_hz)
    seconds = len(result.audio) / runner.sample_rate_hz
    print(
        f"wrote {args.out}: {seconds:.2f} s of audio, voice {voice}, "
        f"{elapsed:.2f} s compute (real-time factor {elapsed / seconds:.3f})"
    )
    return 0


def _add_synth(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("synth", help="offline synthesis of one phoneme string to a WAV file")
    p.add_argument("--phonemes", required=True, help="phonemes in Kokoro's alphabet (at most 510)")
    p.add_argument("--voice", default=None, help="voice name or blend 'a:0.7,b:0.3' (default: the first)")
    p.add_argument("--speed", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="seed the sine-source noise (default: noise off)")
    p.add_argument("--out", default="out.wav")
    p.add_argument("--tiny", action="store_true", help="tiny random model (for smoke tests; not speech)")
    add_model_arguments(p, compile_by_default=False)
    p.set_defaults(handler=_synth)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rt-server", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("RT_SERVER_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)
    _add_synth(sub)
    from rt_server.weights.cli import add_weights_commands

    add_weights_commands(sub)
    for register in _optional_commands():
        register(sub)
    return parser


def _optional_commands() -> list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]]:
    """Subcommands defined beside the code they drive (server, weights, bench)."""
    registers = []
    for module_name in ("rt_server.serve_cli", "rt_server.bench_cli"):
        try:
            module = __import__(module_name, fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        registers.append(module.register)
    return registers


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler: Handler = args.handler if hasattr(args, "handler") else args.func
    return handler(args)
