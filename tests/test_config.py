"""Configuration: settings win over env; bad values give one-line errors."""

from __future__ import annotations

import base64
from urllib.parse import unquote, urlsplit

import pytest

from hexscrape.config import ConfigError, load_config

ENV = {"HEX_USER": "alice", "HEX_PASS": "pw", "HEX_GATEWAY": "http://127.0.0.1:9"}


def test_defaults_cover_the_whole_pool():
    cfg = load_config(None, ENV)
    assert cfg.pool_size == 40 and cfg.sessions[0] == "s000" and cfg.sessions[-1] == "s039"
    assert cfg.session_concurrency == 10


def test_default_gateway():
    env = dict(ENV)
    del env["HEX_GATEWAY"]
    assert load_config(None, env).gateway == "http://gate.hexproxies.com:7777"


def test_settings_win_over_environment():
    env = dict(ENV, SESSION_RANGE_START="0", SESSION_RANGE_END="5")
    settings = {"SESSION_RANGE_START": "10", "SESSION_RANGE_END": 20}
    cfg = load_config(settings.get, env)
    assert cfg.sessions == [f"s{i:03d}" for i in range(10, 20)]


@pytest.mark.parametrize(
    "extra, needle",
    [
        ({"SESSION_RANGE_END": "41"}, "SESSION_RANGE_END=41 is outside the pool"),
        ({"SESSION_RANGE_START": "5", "SESSION_RANGE_END": "5"}, "SESSION_RANGE_START=5 must be <"),
        ({"SESSION_RANGE_START": "-1"}, "SESSION_RANGE_START=-1"),
        ({"SESSION_POOL_SIZE": "abc"}, "SESSION_POOL_SIZE='abc'"),
        ({"HEX_GATEWAY": "http://[::1"}, "HEX_GATEWAY"),
        ({"HEX_GATEWAY": "socks5://127.0.0.1:1080"}, "HEX_GATEWAY"),
        ({"HEX_GATEWAY": "http://u:p@127.0.0.1:1"}, "must not contain credentials"),
        ({"HEX_USER": ""}, "HEX_USER is not set"),
        ({"HEX_PASS": None}, "HEX_PASS is not set"),
    ],
)
def test_bad_configuration_is_one_line_naming_the_setting(extra, needle):
    env = {**ENV, **extra}
    env = {k: v for k, v in env.items() if v is not None}
    with pytest.raises(ConfigError) as exc:
        load_config(None, env)
    assert needle in str(exc.value)
    assert "\n" not in str(exc.value)


def test_gateway_none_needs_no_credentials():
    cfg = load_config(None, {"HEX_GATEWAY": "none"})
    assert not cfg.gateway_enabled


def test_proxy_url_percent_encodes_credentials_and_hides_password_in_repr():
    cfg = load_config(None, dict(ENV, HEX_PASS="p@ss:w/rd %x"))
    url = cfg.proxy_url("s007")
    parts = urlsplit(url)
    assert unquote(parts.username) == "alice-session-s007"
    assert unquote(parts.password) == "p@ss:w/rd %x"
    assert parts.hostname == "127.0.0.1" and parts.port == 9
    assert "p@ss" not in repr(cfg)
    # What Scrapy's HttpProxyMiddleware will send:
    from scrapy.downloadermiddlewares.httpproxy import HttpProxyMiddleware

    creds, proxy = HttpProxyMiddleware()._get_proxy(url, "")
    assert base64.b64decode(creds) == b"alice-session-s007:p@ss:w/rd %x"
    assert proxy == "http://127.0.0.1:9"
