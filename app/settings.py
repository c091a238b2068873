"""Service settings: defaults, then environment variables (KWS_*), then `kws serve` flags.

On a network address the service is not open to anyone by default: without `KWS_API_TOKEN`,
`kws serve` makes a token for the run and prints it once (`with_network_token`), unless
`KWS_ALLOW_ANONYMOUS=1`. Without a token, Host headers are checked against `allowed_hosts`
(loopback names and the bound address by default), so a web page cannot reach the service
through DNS rebinding; with one, any name is accepted, since the token keeps other pages out."""

import ipaddress
import os
import secrets
from dataclasses import dataclass, fields, replace
from pathlib import Path

from kws import default_model_path
from kws.errors import KwsError
from kws.stream import parse_threshold, parse_words


@dataclass(frozen=True)
class Settings:
    model: Path | None = None  # model file or checkpoint; None: $KWS_MODEL or the shipped one
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    listen: bool = False  # also run the microphone listener in the background
    device: str | None = None  # input device for the listener (index or name)
    listen_input: str | None = None  # an audio file the listener plays in real time, for demos
    api_token: str | None = None  # when set, a bearer token for /predict and the live endpoints
    allow_anonymous: bool = False  # serve a network address without a token
    allowed_hosts: tuple[str, ...] | None = None  # Host header names; None: see hosts_allowed()
    max_upload_bytes: int = 10_000_000
    max_duration_s: float = 60.0
    read_timeout_s: float = 5.0  # a client's time to send a request's head, then its body
    min_duration_s: float = 0.1
    workers: int = 2  # threads that decode uploads and run long clips' detections
    max_batch: int = 16  # clips classified together, at most (app.batcher)
    threads: int = 1  # BLAS threads per inference: parallel requests beat parallel ops
    detections_kept: int = 1000  # live detections /detections can return
    # The detector of the listener and of long /predict clips, as `kws listen` takes them:
    threshold: float | dict[str, float] | None = None  # None: kws.stream.DEFAULT_THRESHOLD
    words: tuple[str, ...] | None = None  # None: the model's words (kws.stream.Detector)

    def __post_init__(self):
        if self.model is None:
            object.__setattr__(self, "model", default_model_path())
        object.__setattr__(self, "model", Path(self.model))
        if not self.api_token:
            object.__setattr__(self, "api_token", None)  # an empty token means none
        for name in ("port", "max_upload_bytes", "workers", "max_batch", "threads",
                     "detections_kept"):
            if getattr(self, name) < 1:
                raise KwsError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.words is not None:
            object.__setattr__(self, "words", tuple(self.words))
        if self.allowed_hosts is not None:
            object.__setattr__(self, "allowed_hosts", tuple(self.allowed_hosts))
        if self.port > 65535:
            raise KwsError(f"port must be at most 65535, got {self.port}")
        if not self.read_timeout_s > 0:
            raise KwsError(f"read_timeout_s must be positive, got {self.read_timeout_s}")
        if not 0 < self.min_duration_s < self.max_duration_s:
            raise KwsError(f"max_duration_s must be longer than the shortest clip /predict takes "
                           f"({self.min_duration_s:g} s), got {self.max_duration_s:g}")

    @property
    def on_loopback(self) -> bool:
        return is_loopback(self.host)

    def hosts_allowed(self) -> tuple[str, ...]:
        """Host header names accepted (without port): the setting; any ("*") with a token (a
        board's names are not known in advance, and a web page that rebinds a name still lacks
        the token); else loopback names and the bound address when that is one address (not
        0.0.0.0 or ::)."""
        if self.allowed_hosts is not None:
            return self.allowed_hosts
        if self.api_token is not None:
            return ("*",)
        hosts = ("localhost", "127.0.0.1", "::1")
        if self.host not in ("0.0.0.0", "::", "") and self.host not in hosts:
            hosts += (self.host.lower(),)
        return hosts

    @property
    def open_to_network(self) -> bool:
        """Anyone who can reach the address may use the service without a token."""
        return not self.on_loopback and self.api_token is None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def with_network_token(settings: Settings) -> tuple[Settings, bool]:
    """(settings, whether a token was made): on a network address without a token, a random
    token for this run, unless anonymous use is allowed."""
    if settings.open_to_network and not settings.allow_anonymous:
        return replace(settings, api_token=secrets.token_urlsafe(18)), True
    return settings, False


# Environment variable -> field. KWS_MODEL is read by kws.default_model_path.
ENVIRONMENT = {
    "KWS_HOST": "host",
    "KWS_PORT": "port",
    "KWS_LISTEN": "listen",
    "KWS_DEVICE": "device",
    "KWS_LISTEN_INPUT": "listen_input",
    "KWS_API_TOKEN": "api_token",
    "KWS_ALLOW_ANONYMOUS": "allow_anonymous",
    "KWS_ALLOWED_HOSTS": "allowed_hosts",
    "KWS_MAX_UPLOAD_BYTES": "max_upload_bytes",
    "KWS_MAX_DURATION_S": "max_duration_s",
    "KWS_READ_TIMEOUT_S": "read_timeout_s",
    "KWS_WORKERS": "workers",
    "KWS_MAX_BATCH": "max_batch",
    "KWS_THREADS": "threads",
    "KWS_THRESHOLD": "threshold",
    "KWS_WORDS": "words",
}


def host_name(header: str) -> str:
    """A Host header without its port: 'pi.local:8000' -> 'pi.local', '[::1]:8000' -> '::1'."""
    if header.startswith("["):
        return header[1:header.find("]")].lower()
    return (header.rsplit(":", 1)[0] if header.count(":") == 1 else header).lower()


def url_host(host: str) -> str:
    """An address as a URL names it: '::1' -> '[::1]'."""
    return f"[{host}]" if ":" in host else host


def parse_hosts(text: str) -> tuple[str, ...]:
    """'pi.local, 192.168.1.20:8000' -> ('pi.local', '192.168.1.20'); '*' allows any host."""
    hosts = tuple(host_name(h.strip()) for h in text.split(",") if h.strip())
    if not hosts:
        raise KwsError("expected host names separated by commas, or *")
    return hosts


# The same text as the CLI flags
PARSERS = {"threshold": parse_threshold, "words": parse_words, "allowed_hosts": parse_hosts}

TRUE, FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


def _parse(name: str, kind: type, text: str):
    if kind is bool:
        if text.lower() not in TRUE | FALSE:
            raise KwsError(f"{name}={text!r}: expected 1/0, true/false, yes/no or on/off")
        return text.lower() in TRUE
    try:
        return kind(text)
    except ValueError:
        raise KwsError(f"{name}={text!r}: expected {kind.__name__}") from None


def from_env(env=None, **overrides) -> Settings:
    """Settings from `env` (default os.environ), then `overrides` that are not None (CLI flags)."""
    env = os.environ if env is None else env
    types = {f.name: f.type for f in fields(Settings)}
    defaults = {f.name: f.default for f in fields(Settings)}
    values = {}
    for variable, name in ENVIRONMENT.items():
        if variable in env:
            if env[variable] == "" and defaults[name] is None:
                continue  # set but empty (compose passes host variables through): unset, None
            if name in PARSERS:
                try:
                    values[name] = PARSERS[name](env[variable])
                except KwsError as e:
                    raise KwsError(f"{variable}: {e}") from None
                continue
            kind = types[name] if isinstance(types[name], type) else str  # "str | None" -> str
            values[name] = _parse(variable, kind, env[variable])
    if env.get("KWS_MODEL"):
        values["model"] = Path(env["KWS_MODEL"])
    settings = Settings(**values)
    return replace(settings, **{k: v for k, v in overrides.items() if v is not None})
