"""Loopback "internet" for hexscrape: an httpbin-like origin and a sticky-session proxy gateway.

Pure asyncio (+ ``cryptography`` for the self-signed cert); never imports scrapy
or twisted so it can run next to, and be measured independently of, the scraper.
"""

from .errors import PortInUseError, SandboxError
from .gateway import BAN_MODES, BanRule, Gateway, exit_ip_for, parse_ban
from .origin import Origin
from .runner import DEFAULT_PASSWORD, DEFAULT_USER, Sandbox, SandboxCore, check_loopback

__all__ = [
    "BAN_MODES",
    "BanRule",
    "DEFAULT_PASSWORD",
    "DEFAULT_USER",
    "Gateway",
    "Origin",
    "PortInUseError",
    "Sandbox",
    "SandboxCore",
    "SandboxError",
    "check_loopback",
    "exit_ip_for",
    "parse_ban",
]
