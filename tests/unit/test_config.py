"""sseserver.config (SPEC §10): defaults, every option from a flag and from ``SSESERVER_*``,
flags over environment over defaults, ``parse_rate`` and ``validate()``. Pure: no sockets."""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

import pytest

from sseserver.config import Config, Rate, build_parser, load_config, parse_rate

# --------------------------------------------------------------------------------------
# Defaults: the SPEC §10 table
# --------------------------------------------------------------------------------------

SPEC_DEFAULTS: dict[str, Any] = {
    "host": "127.0.0.1",
    "port": 8000,
    "workers": 1,
    "provider": "synthetic",
    "openai_base_url": None,
    "gemini_base_url": None,
    "upstream_timeout_s": 30,
    "heartbeat_s": 15,
    "retry_ms": 2000,
    "header_timeout_s": 10,
    "keepalive_timeout_s": 5,
    "max_connections": 100_000,
    "max_head_bytes": 16384,
    "max_body_bytes": 1_048_576,
    "write_buffer_bytes": 262_144,
    "resume_grace_s": 0,
    "history": 1000,
    "hub": "memory",
    "jwt_secret": None,
    "jwt_public_key": None,
    "cors_origins": (),
    "rate": None,
    "trusted_proxies": (),
    "shutdown_grace_s": 10,
    "log_level": "info",
    "log_format": "text",
}


@pytest.mark.parametrize("name", sorted(SPEC_DEFAULTS))
def test_defaults_match_the_spec(name: str) -> None:
    assert getattr(Config(), name) == SPEC_DEFAULTS[name]


def test_no_arguments_no_environment_gives_the_defaults() -> None:
    assert load_config([], {}) == Config()


def test_defaults_are_valid() -> None:
    assert Config().validate() == Config()


# --------------------------------------------------------------------------------------
# Every option: (first text, first value, second text, second value)
# --------------------------------------------------------------------------------------

OPTIONS: dict[str, tuple[str, Any, str, Any]] = {
    "host": ("0.0.0.0", "0.0.0.0", "::1", "::1"),
    "port": ("9001", 9001, "9002", 9002),
    "workers": ("3", 3, "4", 4),
    "provider": ("openai", "openai", "gemini", "gemini"),
    "openai_base_url": ("http://a:1/v1", "http://a:1/v1", "http://b:2/v1", "http://b:2/v1"),
    "openai_client": ("sdk", "sdk", "lean", "lean"),
    "gemini_client": ("sdk", "sdk", "lean", "lean"),
    "gemini_base_url": ("http://g:1", "http://g:1", "http://h:2", "http://h:2"),
    "upstream_timeout_s": ("2.5", 2.5, "7", 7.0),
    "heartbeat_s": ("0.5", 0.5, "20", 20.0),
    "retry_ms": ("500", 500, "0", 0),
    "header_timeout_s": ("1.5", 1.5, "3", 3.0),
    "keepalive_timeout_s": ("1", 1.0, "60", 60.0),
    "max_connections": ("10", 10, "20", 20),
    "max_head_bytes": ("4096", 4096, "8192", 8192),
    "max_body_bytes": ("100", 100, "200", 200),
    "write_buffer_bytes": ("65536", 65536, "1024", 1024),
    "resume_grace_s": ("5", 5.0, "0.25", 0.25),
    "history": ("10", 10, "0", 0),
    "history_age_s": ("60", 60.0, "1.5", 1.5),
    "history_bytes": ("1048576", 1048576, "64MiB", 64 * 1024 * 1024),
    "resume_window_s": ("60", 60.0, "0", 0.0),
    "max_stream_s": ("600", 600.0, "30", 30.0),
    "hub": ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0", "memory", "memory"),
    "jwt_secret": ("s3cret", "s3cret", "other", "other"),
    "jwt_public_key": ("/etc/key.pem", "/etc/key.pem", "/tmp/k.pem", "/tmp/k.pem"),
    "jwt_audience": ("aud-a", "aud-a", "aud-b", "aud-b"),
    "jwt_issuer": ("iss-a", "iss-a", "iss-b", "iss-b"),
    "cors_origins": (
        "https://a.example, https://b.example",
        ("https://a.example", "https://b.example"),
        "https://c.example",
        ("https://c.example",),
    ),
    "rate": ("3/60s", Rate(3, 60.0), "10/m", Rate(10, 60.0)),
    "max_streams_per_subject": ("2", 2, "5", 5),
    "trusted_proxies": ("127.0.0.1,10.0.0.0/8", ("127.0.0.1", "10.0.0.0/8"), "::1", ("::1",)),
    "shutdown_grace_s": ("1", 1.0, "0", 0.0),
    "log_level": ("debug", "debug", "warning", "warning"),
    "log_format": ("json", "json", "text", "text"),
    "loop": ("asyncio", "asyncio", "uvloop", "uvloop"),
    "static_dir": ("/srv/static", "/srv/static", "/opt/www", "/opt/www"),
    "anonymous": ("true", True, "1", True),
    "public_url": ("https://example.com", "https://example.com", "http://a.test", "http://a.test"),
    "test_endpoints": ("yes", True, "on", True),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env(name: str) -> str:
    return "SSESERVER_" + name.upper()


def test_the_option_table_covers_every_config_field() -> None:
    """A new option must come with flag and environment support (and a row here)."""
    names = {f.name for f in fields(Config)} - {"extra"}
    assert names == set(OPTIONS)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_every_option_from_its_flag(name: str) -> None:
    text, value, _, _ = OPTIONS[name]
    config = load_config([_flag(name), text], {})
    assert getattr(config, name) == value
    # Nothing else moved.
    assert replace(config, **{name: getattr(Config(), name)}) == Config()


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_every_option_from_sseserver_env(name: str) -> None:
    text, value, _, _ = OPTIONS[name]
    config = load_config([], {_env(name): text})
    assert getattr(config, name) == value
    assert replace(config, **{name: getattr(Config(), name)}) == Config()


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_flag_wins_over_environment(name: str) -> None:
    env_text, _, flag_text, flag_value = OPTIONS[name]
    config = load_config([_flag(name), flag_text], {_env(name): env_text})
    assert getattr(config, name) == flag_value


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_empty_environment_value_means_default(name: str) -> None:
    assert getattr(load_config([], {_env(name): ""}), name) == getattr(Config(), name)


def test_upstream_clients_default_to_the_lean_client() -> None:
    # SPEC §10: the lean client unless ``sdk`` is chosen.
    assert Config().openai_client == "lean"
    assert Config().gemini_client == "lean"
    assert load_config([], {"SSESERVER_OPENAI_CLIENT": "sdk"}).openai_client == "sdk"
    assert load_config([], {"SSESERVER_GEMINI_CLIENT": "sdk"}).gemini_client == "sdk"


def test_unrelated_environment_is_ignored() -> None:
    env = {
        "SSESERVER_NO_SUCH_OPTION": "1",
        "PORT": "1234",
        "HOST": "0.0.0.0",
        "sseserver_port": "1",
    }
    assert load_config([], env) == Config()


def test_openai_base_url_alias() -> None:
    assert load_config([], {"OPENAI_BASE_URL": "http://x/v1"}).openai_base_url == "http://x/v1"
    both = {"OPENAI_BASE_URL": "http://x/v1", "SSESERVER_OPENAI_BASE_URL": "http://y/v1"}
    assert load_config([], both).openai_base_url == "http://y/v1"
    flag = load_config(["--openai-base-url", "http://z/v1"], both)
    assert flag.openai_base_url == "http://z/v1"


def test_flags_and_environment_combine() -> None:
    config = load_config(
        ["--port", "9000", "--rate", "5/10s"],
        {"SSESERVER_HOST": "0.0.0.0", "SSESERVER_PORT": "1", "SSESERVER_CORS_ORIGINS": "https://x"},
    )
    assert (config.host, config.port, config.rate) == ("0.0.0.0", 9000, Rate(5, 10.0))
    assert config.cors_origins == ("https://x",)


def test_help_names_every_environment_variable() -> None:
    text = build_parser().format_help()
    for name in OPTIONS:
        assert _flag(name) in text
        assert _env(name) in text


def test_csv_options_drop_blanks_and_spaces() -> None:
    config = load_config([], {"SSESERVER_CORS_ORIGINS": " https://a , ,https://b,, "})
    assert config.cors_origins == ("https://a", "https://b")
    config = load_config(["--trusted-proxies", "127.0.0.1, ::1"], {})
    assert config.trusted_proxies == ("127.0.0.1", "::1")


# --------------------------------------------------------------------------------------
# Errors from flags and environment
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("SSESERVER_PORT", "eighty"),
        ("SSESERVER_HEARTBEAT_S", "fast"),
        ("SSESERVER_WORKERS", "1.5"),
        ("SSESERVER_RATE", "lots"),
        ("SSESERVER_RATE", "0/60s"),
        ("SSESERVER_MAX_BODY_BYTES", "1MB"),
    ],
)
def test_unparsable_environment_names_the_variable(env: str, value: str) -> None:
    with pytest.raises(ValueError, match=env):
        load_config([], {env: value})


@pytest.mark.parametrize(
    ("env", "value", "flag"),
    [
        ("SSESERVER_PORT", "70000", "--port"),
        ("SSESERVER_HEARTBEAT_S", "0", "--heartbeat-s"),
        ("SSESERVER_LOG_FORMAT", "xml", "--log-format"),
        ("SSESERVER_OPENAI_CLIENT", "httpx", "--openai-client"),
        ("SSESERVER_HUB", "postgres://db", "--hub"),
    ],
)
def test_out_of_range_environment_is_refused(env: str, value: str, flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        load_config([], {env: value})


@pytest.mark.parametrize(
    "argv",
    [
        ["--port", "eighty"],
        ["--rate", "lots"],
        ["--heartbeat-s", "soon"],
        ["--no-such-flag"],
        ["--port"],
    ],
)
def test_bad_flags_exit_like_argparse(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        load_config(argv, {})
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_main_reports_a_bad_option_and_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    from sseserver.cli import main

    assert main(["--heartbeat-s", "0"]) == 2
    err = capsys.readouterr().err
    assert "--heartbeat-s" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------------------
# parse_rate
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("3/60s", Rate(3, 60.0)),
        ("3/60", Rate(3, 60.0)),
        ("3/60sec", Rate(3, 60.0)),
        ("3/s", Rate(3, 1.0)),
        ("3/sec", Rate(3, 1.0)),
        ("10/m", Rate(10, 60.0)),
        ("10/min", Rate(10, 60.0)),
        ("10/2m", Rate(10, 120.0)),
        ("100/h", Rate(100, 3600.0)),
        ("100/1h", Rate(100, 3600.0)),
        ("5/1.5s", Rate(5, 1.5)),
        ("5/0.5m", Rate(5, 30.0)),
        (" 3 / 60 s ", Rate(3, 60.0)),
        ("3/60S", Rate(3, 60.0)),
        ("1000000/60s", Rate(1_000_000, 60.0)),
    ],
)
def test_parse_rate_forms(text: str, rate: Rate) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["", "   ", "off", "OFF", "none", "0"])
def test_parse_rate_off(text: str) -> None:
    assert parse_rate(text) is None


@pytest.mark.parametrize(
    "text",
    [
        "abc",
        "3",
        "/60s",
        "3/60x",
        "3/60ms",
        "3/60d",
        "0/60s",
        "-1/60s",
        "3/-60s",
        "3.5/60s",
        "3/60s/2",
        "3//60s",
        "3/6 0s",
        "three/60s",
        "3/60s extra",
        "3/0s",
        "3/0",
        "3/0.0m",
    ],
)
def test_parse_rate_errors(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rate(text)


# --------------------------------------------------------------------------------------
# validate()
# --------------------------------------------------------------------------------------

POSITIVE = (
    "heartbeat_s",
    "header_timeout_s",
    "keepalive_timeout_s",
    "max_connections",
    "max_head_bytes",
    "max_body_bytes",
    "write_buffer_bytes",
    "upstream_timeout_s",
    "workers",
)
NON_NEGATIVE = ("resume_grace_s", "shutdown_grace_s", "retry_ms", "history", "max_stream_s")


@pytest.mark.parametrize("name", POSITIVE)
@pytest.mark.parametrize("value", [0, -1])
def test_validate_positive(name: str, value: int) -> None:
    overrides: dict[str, Any] = {name: value}
    with pytest.raises(ValueError, match=_flag(name)):
        replace(Config(), **overrides).validate()


@pytest.mark.parametrize("name", NON_NEGATIVE)
def test_validate_non_negative(name: str) -> None:
    zero: dict[str, Any] = {name: 0}
    replace(Config(), **zero).validate()
    with pytest.raises(ValueError, match=_flag(name)):
        replace(Config(), **{**zero, name: -1}).validate()


@pytest.mark.parametrize("port", [-1, 65536, 100_000])
def test_validate_port_range(port: int) -> None:
    with pytest.raises(ValueError, match="--port"):
        replace(Config(), port=port).validate()


@pytest.mark.parametrize("port", [0, 1, 8000, 65535])
def test_validate_port_accepts(port: int) -> None:
    replace(Config(), port=port).validate()


@pytest.mark.parametrize(
    ("overrides", "flag"),
    [
        ({"log_format": "xml"}, "--log-format"),
        ({"log_format": "JSON"}, "--log-format"),
        ({"loop": "trio"}, "--loop"),
        ({"openai_client": "turbo"}, "--openai-client"),
        ({"openai_client": "fast"}, "--openai-client"),  # gone: lean does it better
        ({"openai_client": "SDK"}, "--openai-client"),
        ({"gemini_client": "fast"}, "--gemini-client"),
        ({"hub": "postgres://x"}, "--hub"),
        ({"hub": "redis"}, "--hub"),
        # An unknown level would only blow up later, inside logging.setLevel().
        ({"log_level": "loud"}, "--log-level"),
    ],
)
def test_validate_refuses(overrides: dict[str, Any], flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        replace(Config(), **overrides).validate()


@pytest.mark.parametrize("hub", ["memory", "redis://h:6379/0", "rediss://h", "unix:///tmp/r.sock"])
def test_validate_hub_forms(hub: str) -> None:
    replace(Config(), hub=hub).validate()


@pytest.mark.parametrize("level", ["debug", "info", "warning", "error", "INFO"])
def test_validate_log_levels(level: str) -> None:
    replace(Config(), log_level=level).validate()


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(AttributeError):
        config.port = 1  # type: ignore[misc]


def test_upstream_clients_match_the_provider_registry() -> None:
    """config.UPSTREAM_CLIENTS (what --openai-client / --gemini-client accept) names
    exactly the clients providers.CLIENTS can load, the default first."""
    from sseserver.config import UPSTREAM_CLIENTS
    from sseserver.providers import CLIENTS

    assert {p: set(c) for p, c in UPSTREAM_CLIENTS.items()} == {
        p: set(c) for p, c in CLIENTS.items()
    }
    assert Config().openai_client == UPSTREAM_CLIENTS["openai"][0]
    assert Config().gemini_client == UPSTREAM_CLIENTS["gemini"][0]


@pytest.mark.parametrize("name", ["anonymous", "test_endpoints"])
def test_a_switch_needs_no_value(name: str) -> None:
    assert getattr(load_config([_flag(name)], {}), name) is True
    assert getattr(load_config([_flag(name), "false"], {}), name) is False
    assert getattr(load_config([], {}), name) is False


def test_public_url_must_be_http() -> None:
    with pytest.raises(ValueError, match="public-url"):
        load_config(["--public-url", "example.com"], {})
