"""Server-side request forgery guard: which URLs the service may fetch (videos by URL, webhooks), and the one
address each is fetched from.

A URL must be http or https, and every address its host resolves to must be a public unicast address:
loopback, private, link-local, shared, multicast, reserved and unspecified ones are refused (IPv4 and IPv6;
an IPv6 address embedding an IPv4 one, mapped, 6to4 or Teredo, is judged by that one too), unless it lies in
VIDEOQA_URL_ALLOWED_NETWORKS. The caller connects to the address checked here, never looking the name up
again, so a DNS answer that changes in between cannot slip past.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

import anyio.to_thread

from service.errors import APIError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
DEFAULT_PORTS = {"http": 80, "https": 443}


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    """Comma-separated CIDRs ("127.0.0.1/32, 10.1.0.0/16") -> networks; ValueError on nonsense."""
    return tuple(ipaddress.ip_network(part.strip()) for part in text.split(",") if part.strip())


def refusal(address: IPAddress, allowed: tuple[IPNetwork, ...] = ()) -> str | None:
    """Why the service must not connect to `address` (None: it may)."""
    if any(address in network for network in allowed):
        return None
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo and address.teredo[1])
        if embedded is not None and (reason := refusal(embedded, allowed)):
            return reason
    for kind in ("loopback", "private", "link_local", "multicast", "reserved", "unspecified"):
        if getattr(address, f"is_{kind}"):
            return f"{address} is a {kind.replace('_', '-')} address"
    if not address.is_global:  # shared (100.64/10), documentation, benchmarking, ...
        return f"{address} is not a public address"
    return None


@dataclass(frozen=True)
class Target:
    """A URL that passed the guard, with the address to connect to."""

    url: str
    scheme: str
    host: str  # as written (the Host header, TLS' server name)
    port: int
    address: IPAddress

    @property
    def pinned_url(self) -> str:
        """The URL with the checked address in place of the host: connecting to it looks nothing up."""
        parts = urlsplit(self.url)
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        path = parts.path or "/"
        return f"{self.scheme}://{host}:{self.port}{path}" + (f"?{parts.query}" if parts.query else "")

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    def request_options(self) -> dict:
        """httpx's `build_request` keywords that send the request to the checked address as the URL's host
        (its Host header, and TLS' server name and certificate check)."""
        extensions = {"sni_hostname": self.host} if self.scheme == "https" else {}
        return {"url": self.pinned_url, "headers": {"Host": self.host_header}, "extensions": extensions}


def forbidden(message: str) -> APIError:
    return APIError(400, "url_forbidden", message, param="url")


def split_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http or https URL; 400 url_forbidden for anything else."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise forbidden(f"not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise forbidden("only http and https URLs are fetched")
    if not parts.hostname:
        raise forbidden("the URL has no host")
    return scheme, parts.hostname, port or DEFAULT_PORTS[scheme]


async def check_url(url: str, allowed: tuple[IPNetwork, ...]) -> Target:
    """`checked_target` off the event loop (the lookup blocks)."""
    return await anyio.to_thread.run_sync(checked_target, url, allowed)


def checked_target(url: str, allowed: tuple[IPNetwork, ...]) -> Target:
    """The URL's target, once its host resolved to addresses that are all allowed: 400 url_forbidden
    otherwise (before any connection), 400 url_unreachable when the name does not resolve."""
    scheme, host, port = split_url(url)
    addresses = resolve(host, port)
    for address in addresses:
        if reason := refusal(address, allowed):
            raise forbidden(f"{host} resolves to a forbidden address: {reason}")
    return Target(url, scheme, host, port, addresses[0])


def resolve(host: str, port: int) -> list[IPAddress]:
    """The host's addresses: a literal address as it is (no lookup), else the resolver's answers."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as exc:
        raise APIError(400, "url_unreachable", f"{host} does not resolve ({exc})", param="url") from None
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
