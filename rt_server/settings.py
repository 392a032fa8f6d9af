"""Server settings: frozen, units in names, from `RT_SERVER_*` environment variables and command-line flags.

Every field `x_y` is read from `RT_SERVER_X_Y` and from the flag `--x-y` (flags win). Models are given as
specs (`--model SPEC`, repeatable, or `RT_SERVER_MODELS="SPEC;SPEC"`); see docs/configuration.md. Validation
happens here, at start-up, so a bad value fails loudly before any model loads.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final, Literal

ENV_PREFIX: Final = "RT_SERVER_"
ModelKind = Literal["kokoro", "tiny"]
_PRECISIONS: Final = ("auto", "fp32", "bf16", "fp16", "int8")
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})
# API keys: long enough not to be guessed, and free of the separators used to list them.
MIN_API_KEY_CHARS: Final = 16
_API_KEY: Final = re.compile(r"[!-~]+")  # printable ASCII, no spaces
# An allowed origin is what browsers send: scheme://host[:port], no path, lower case (RFC 6454 section 6.2).
_ORIGIN: Final = re.compile(r"https?://[a-z0-9.\-\[\]:]+")


class SettingsError(ValueError):
    """A setting has an invalid value."""


@dataclass(frozen=True)
class ModelSpec:
    """One model to load. `kind="tiny"` is the random-weight test model (not speech)."""

    name: str
    kind: ModelKind = "kokoro"
    config: str | None = None
    weights: str | None = None
    voices_dir: str | None = None
    device: str = "auto"
    precision: str = "auto"  # int8 or bf16 where the hardware has it natively, else fp32
    compile: bool = True  # reduced precision: compile the decoder's fused kernels at load (torch.compile)
    seed: int = 0  # tiny models only: the weight seed

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise SettingsError(f"model name {self.name!r}: use letters, digits, '-', '_' and '.'")
        if self.kind not in ("kokoro", "tiny"):
            raise SettingsError(f"model {self.name!r}: kind must be kokoro or tiny")
        if self.precision not in _PRECISIONS:
            raise SettingsError(f"model {self.name!r}: precision must be one of {', '.join(_PRECISIONS)}")

    @classmethod
    def parse(cls, spec: str) -> ModelSpec:
        """`NAME` or
        `name=NAME,kind=tiny,weights=PATH,config=PATH,voices=DIR,device=cpu,precision=fp16,compile=off,seed=1`.

        A bare `tiny` is the tiny test model named "tiny"; any other bare word is a kokoro model of that name.
        """
        spec = spec.strip()
        if "=" not in spec:
            return cls(name=spec, kind="tiny" if spec == "tiny" else "kokoro")
        values: dict[str, Any] = {}
        for part in spec.split(","):
            key, sep, value = part.partition("=")
            key = {"voices": "voices_dir"}.get(key.strip(), key.strip())
            if not sep or key not in {f.name for f in fields(cls)}:
                raise SettingsError(f"model spec {spec!r}: unknown or malformed item {part!r}")
            if key == "seed":
                values[key] = int(value)
            elif key == "compile":
                values[key] = _convert("compile", value, "bool")
            else:
                values[key] = value.strip()
        if "name" not in values:
            raise SettingsError(f"model spec {spec!r} needs name=")
        return cls(**values)


def _default_models() -> tuple[ModelSpec, ...]:
    return (ModelSpec(name="kokoro"),)


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    models: tuple[ModelSpec, ...] = field(default_factory=_default_models)
    default_model: str | None = None  # None: the first model
    noise: bool = True  # off: no sine-source noise, output deterministic
    # Limits (all reported to clients in `ready`, see docs/protocol.md)
    max_sessions: int = 64
    max_sessions_per_client: int = 16  # by peer IP address
    max_message_bytes: int = 65_536
    max_pending_phonemes: int = 4096
    max_buffer_ms: int = 2000  # unsent framed audio per session; also the scheduler's high-water mark
    buffer_low_water_ms: int = 1000  # the scheduler plans a paused session again below this
    stall_timeout_s: float = 10.0
    start_timeout_s: float = 10.0
    idle_timeout_s: float = 300.0  # a started session with no message and nothing to send; 0: never
    idle_cut_ms: int = 500
    # Segmenting
    first_segment_min_phonemes: int = 12
    short_first_segment: bool = True  # off: a turn's first segment is cut like the rest (whole sentences)
    clause_min_phonemes: int = 100
    trim_pauses: bool = True  # off: every segment keeps the model's boundary pauses (0.4 s before, 0.3 s after)
    join_pause_ms: int = 50  # with trim_pauses: silence kept before a turn's first word and at mid-sentence cuts
    # A turn's first segment goes out in two parts, the first at least this long (and long enough for the rest to
    # be ready before it has played, at the model's measured speed), as soon as the model has it
    # (KModel.stream_batch); 0: each segment whole
    first_chunk_ms: int = 250
    # Scheduling
    max_batch_size: int = 0  # 0: by device, 1 on a CPU and 16 on a GPU (pipeline/scheduler.py AUTO_BATCH_SIZE)
    max_batch_tokens: int = 4096
    max_padding_waste: float = 0.5  # share of a padded batch that may be padding (length bucketing)
    batch_wait_ms: float = 5.0
    urgent_within_ms: float = 500.0
    # a playing session's next segment before a new turn's first one when that would make its listener run out
    protect_playing: bool = True
    protect_max_defer_ms: float = 3000.0  # ... for at most this long after the new turn's segment arrived; 0: no bound
    # a turn's first phonemes, arriving while the model has been idle this long, have it run a short phrase's
    # front at once (ModelRunner.prime): a CPU left idle ran the next front at half speed; 0: never
    prime_after_idle_ms: float = 200.0
    # Lifecycle
    shutdown_grace_s: float = 10.0
    ws_ping_interval_s: float = 20.0
    debug_endpoints: bool = False  # GET /debug/state: per-session and per-engine internals (tests, soak runs)
    # Access (docs/reliability.md, "Security model")
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # empty: no authentication
    api_keys_file: str | None = None  # more keys, one per line (read at start-up by `from_sources`)
    allowed_origins: tuple[str, ...] = ()  # empty: any Origin; else a browser's Origin must be one of these

    def __post_init__(self) -> None:
        if not self.models:
            raise SettingsError("at least one model is needed")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise SettingsError(f"model names must be unique: {names}")
        if self.default_model is not None and self.default_model not in names:
            raise SettingsError(f"default_model {self.default_model!r} is not one of {names}")
        if not 0 <= self.port <= 65535:
            raise SettingsError("port must be within 0..65535")
        positive = (
            "max_sessions",
            "max_sessions_per_client",
            "max_message_bytes",
            "max_pending_phonemes",
            "max_buffer_ms",
            "stall_timeout_s",
            "start_timeout_s",
            "idle_cut_ms",
            "first_segment_min_phonemes",
            "clause_min_phonemes",
            "join_pause_ms",
            "max_batch_tokens",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be positive")
        if not 0 <= self.buffer_low_water_ms <= self.max_buffer_ms:
            raise SettingsError("buffer_low_water_ms must be within 0..max_buffer_ms")
        if not 0.0 <= self.max_padding_waste < 1.0:
            raise SettingsError("max_padding_waste must be within 0..1 (exclusive)")
        if self.max_batch_tokens < 512:
            raise SettingsError("max_batch_tokens must hold one full segment (512 tokens)")
        for name in (
            "max_batch_size",
            "first_chunk_ms",
            "batch_wait_ms",
            "urgent_within_ms",
            "protect_max_defer_ms",
            "prime_after_idle_ms",
            "shutdown_grace_s",
            "ws_ping_interval_s",
            "idle_timeout_s",
        ):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name} must not be negative")
        for key in self.api_keys:  # the key itself is never put in a message
            if len(key) < MIN_API_KEY_CHARS or not _API_KEY.fullmatch(key) or "," in key:
                raise SettingsError(
                    f"api_keys: each key needs at least {MIN_API_KEY_CHARS} printable ASCII characters, "
                    "without spaces or commas"
                )
        for origin in self.allowed_origins:
            if not _ORIGIN.fullmatch(origin):
                raise SettingsError(
                    f"allowed_origins: {origin!r} is not an origin (lower-case scheme://host[:port], no path)"
                )

    @property
    def default_model_name(self) -> str:
        return self.default_model or self.models[0].name

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_sources(cls, env: Mapping[str, str], overrides: Mapping[str, Any] | None = None) -> Settings:
        """Settings from the environment, then `overrides` (parsed flags; None values are ignored)."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "models":
                continue
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _convert(f.name, raw, _field_type(f.name))
        models_raw = env.get(ENV_PREFIX + "MODELS")
        if models_raw:
            values["models"] = tuple(ModelSpec.parse(s) for s in models_raw.split(";") if s.strip())
        else:
            values["models"] = (_model_from_legacy_env(env),)
        for key, value in (overrides or {}).items():
            if value is None:
                continue
            if key == "models":
                values["models"] = tuple(ModelSpec.parse(s) if isinstance(s, str) else s for s in value)
            elif isinstance(value, str):
                values[key] = _convert(key, value, _field_type(key))
            else:
                values[key] = value
        keys_file = values.get("api_keys_file")
        if keys_file:
            values["api_keys"] = (*values.get("api_keys", ()), *_read_keys(keys_file))
        return cls(**values)


def _read_keys(path: str) -> tuple[str, ...]:
    """Keys from a file, one per line; blank lines and lines starting with '#' are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise SettingsError(f"api_keys_file: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SettingsError(f"api_keys_file: {path} is not UTF-8 text") from None
    return tuple(s for line in lines if (s := line.strip()) and not s.startswith("#"))


def _model_from_legacy_env(env: Mapping[str, str]) -> ModelSpec:
    """The single default model, from the variables `rt-server synth` also reads."""
    return ModelSpec(
        name="kokoro",
        weights=env.get(ENV_PREFIX + "WEIGHTS"),
        config=env.get(ENV_PREFIX + "CONFIG"),
        voices_dir=env.get(ENV_PREFIX + "VOICES_DIR"),
        device=env.get(ENV_PREFIX + "DEVICE", "auto"),
        precision=env.get(ENV_PREFIX + "PRECISION", "auto"),
        compile=_convert("RT_SERVER_COMPILE", env.get(ENV_PREFIX + "COMPILE", "on"), "bool"),
    )


def _field_type(name: str) -> str:
    for f in fields(Settings):
        if f.name == name:
            return str(f.type)
    raise SettingsError(f"unknown setting {name!r}")


def parse_bool(name: str, raw: str) -> bool:
    """`on/off`, `true/false`, `1/0`, `yes/no`; anything else is a `SettingsError` naming the setting."""
    value: bool = _convert(name, raw, "bool")
    return value


def _convert(name: str, raw: str, type_name: str) -> Any:
    raw = raw.strip()
    try:
        if type_name == "bool":
            if raw.lower() in _TRUE:
                return True
            if raw.lower() in _FALSE:
                return False
            raise ValueError(raw)
        if type_name == "int":
            return int(raw)
        if type_name == "float":
            value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}: cannot read {raw!r} as {type_name}") from None
    if type_name == "float":
        if not math.isfinite(value):  # nan would pass every bound check below and mean nothing
            raise SettingsError(f"{name}: {raw!r} is not a finite number")
        return value
    if type_name == "str | None":
        return raw or None
    if type_name == "tuple[str, ...]":  # comma-separated
        return tuple(item.strip() for item in raw.split(",") if item.strip())
    return raw


def setting_names() -> list[str]:
    """Every scalar setting (for the command line)."""
    return [f.name for f in fields(Settings) if f.name != "models"]


def setting_type(name: str) -> str:
    return _field_type(name)
