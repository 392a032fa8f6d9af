"""Access rules, pure: API keys (constant-time), where a key is read from, the Origin allow-list; and their
settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from rt_server.access import FORBIDDEN_ORIGIN, UNAUTHORIZED, AccessPolicy, ApiKeys, presented_key
from rt_server.protocol import ErrorCode
from rt_server.settings import Settings, SettingsError

KEY = "k" * 16 + "-first"
OTHER = "0123456789abcdef-second"


def _policy(keys: tuple[str, ...] = (KEY, OTHER), origins: tuple[str, ...] = ()) -> AccessPolicy:
    return AccessPolicy(ApiKeys(keys), frozenset(origins), frozenset({"/healthz"}))


def test_keys_match_exactly() -> None:
    keys = ApiKeys([KEY, OTHER])
    assert keys.matches(KEY) and keys.matches(OTHER)
    for wrong in ("", KEY[:-1], KEY + "x", KEY.upper(), " " + KEY, "\ud800", "x" * 100_000):
        assert not keys.matches(wrong)
    assert not ApiKeys([])
    assert not ApiKeys([]).matches("")


def test_the_key_comes_from_a_bearer_header_or_the_query() -> None:
    assert presented_key({"authorization": f"Bearer {KEY}"}, "") == KEY
    assert presented_key({"authorization": f"bearer   {KEY} "}, "") == KEY  # scheme is case-insensitive
    assert presented_key({}, f"model=x&api_key={KEY}") == KEY
    assert presented_key({}, "api_key=a%2Bb%20c") == "a+b c"  # URL-decoded
    assert presented_key({"authorization": f"Basic {KEY}"}, "") is None
    assert presented_key({"authorization": "Bearer "}, "") is None
    assert presented_key({}, "apikey=x") is None
    assert presented_key({}, "&".join(f"f{i}=1" for i in range(40)) + "&api_key=x") is None  # too many fields


def test_policy_without_keys_lets_everyone_in() -> None:
    policy = _policy(keys=())
    assert policy.check("/v1/models", {}, "", websocket=False) is None
    assert policy.check("/v1/stream", {}, "", websocket=True) is None


def test_policy_with_keys() -> None:
    policy = _policy()
    assert policy.check("/v1/stream", {}, "", websocket=True) == UNAUTHORIZED
    assert policy.check("/v1/stream", {"authorization": "Bearer nope-nope-nope-nope"}, "", websocket=True) == (
        UNAUTHORIZED
    )
    assert policy.check("/v1/stream", {"authorization": f"Bearer {OTHER}"}, "", websocket=True) is None
    assert policy.check("/v1/stream", {}, f"api_key={KEY}", websocket=True) is None
    assert policy.check("/metrics", {}, "", websocket=False) == UNAUTHORIZED
    assert policy.check("/healthz", {}, "", websocket=False) is None
    assert UNAUTHORIZED.status == 401 and UNAUTHORIZED.code is ErrorCode.UNAUTHORIZED


def test_origin_allow_list_applies_to_browser_websockets() -> None:
    policy = _policy(keys=(), origins=("https://app.example", "http://localhost:5173"))
    assert policy.check("/v1/stream", {"origin": "https://app.example"}, "", websocket=True) is None
    assert policy.check("/v1/stream", {"origin": "HTTPS://APP.EXAMPLE"}, "", websocket=True) is None
    assert policy.check("/v1/stream", {"origin": "http://localhost:5173"}, "", websocket=True) is None
    for origin in ("https://evil.example", "https://app.example.evil", "http://app.example", "null", ""):
        assert policy.check("/v1/stream", {"origin": origin}, "", websocket=True) == FORBIDDEN_ORIGIN, origin
    assert policy.check("/v1/stream", {}, "", websocket=True) is None  # not a browser: keys decide
    assert policy.check("/v1/models", {"origin": "https://evil.example"}, "", websocket=False) is None
    assert FORBIDDEN_ORIGIN.status == 403


def test_origin_is_checked_before_the_key() -> None:
    policy = _policy(origins=("https://app.example",))
    headers = {"origin": "https://evil.example", "authorization": f"Bearer {KEY}"}
    assert policy.check("/v1/stream", headers, "", websocket=True) == FORBIDDEN_ORIGIN


def test_settings_read_keys_and_origins(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# rotated monthly\n{OTHER}\n\n")
    settings = Settings.from_sources(
        {
            "RT_SERVER_API_KEYS": f" {KEY} ",
            "RT_SERVER_API_KEYS_FILE": str(keys_file),
            "RT_SERVER_ALLOWED_ORIGINS": "https://app.example, http://localhost:8000",
            "RT_SERVER_MAX_SESSIONS_PER_CLIENT": "3",
            "RT_SERVER_IDLE_TIMEOUT_S": "0",
        }
    )
    assert settings.api_keys == (KEY, OTHER)
    assert settings.allowed_origins == ("https://app.example", "http://localhost:8000")
    assert settings.max_sessions_per_client == 3
    assert settings.idle_timeout_s == 0
    assert KEY not in repr(settings)  # keys never reach logs through the settings' repr


@pytest.mark.parametrize(
    "env",
    [
        {"RT_SERVER_API_KEYS": "short"},
        {"RT_SERVER_API_KEYS": "sixteen chars with spaces"},
        {"RT_SERVER_API_KEYS_FILE": "/nonexistent/keys"},
        {"RT_SERVER_ALLOWED_ORIGINS": "https://app.example/path"},
        {"RT_SERVER_ALLOWED_ORIGINS": "*"},
        {"RT_SERVER_ALLOWED_ORIGINS": "HTTPS://APP.EXAMPLE"},
        {"RT_SERVER_MAX_SESSIONS_PER_CLIENT": "0"},
        {"RT_SERVER_IDLE_TIMEOUT_S": "-1"},
    ],
)
def test_bad_access_settings_fail_loudly(env: dict[str, str]) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_sources(env)
    assert "short" not in str(info.value)  # a rejected key is not echoed
