"""The hub's configuration: one frozen value, validated once at start-up.

Command-line options (parsed at the edge, in `service.Options`) and the TOML
config file are merged here; every error names the option or key at fault.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Mapping
from typing import Any

from attrs import evolve, field, frozen
from twisted.internet.endpoints import serverFromString

from hub.access.limits import Limits
from hub.app.sharedport import parse_tcp_listen
from hub.app.workers import default_workers
from hub.errors import ConfigError
from hub.intake.settings import NSCASettings
from hub.rules.admission import parse_networks, parse_startups
from hub.rules.cluster import (
    default_hub_id,
    is_valid_hub_id,
    listens_everywhere,
    split_address,
    worker_hub_id,
    worker_peer,
)
from hub.rules.names import is_valid_name
from hub.rules.retention import MAX_AGE_DAYS, MAX_TOTAL_MB, RetentionRules
from hub.rules.webproxy import ProxySettings
from hub.ssh.algorithms import TransportPolicy
from hub.store.engine import is_url, redact


@frozen
class HubConfig:
    data: str = "."
    ssh: str = "tcp:22"
    port_low: int = 49152
    port_high: int = 65535
    public_interface: str = "0.0.0.0"
    keepalive: float = 15.0
    keepalive_count: int = 3
    nsca_endpoint: str | None = None
    command_file: str | None = None
    netconf_endpoint: str | None = None
    registrar_user: str = "cms"
    nsca: NSCASettings = field(factory=NSCASettings)
    limits: Limits = field(factory=Limits)
    netconf_secrets: Mapping[str, str] = field(factory=dict)
    # Forward listeners held by a helper process (hub.tunnel.keeper).
    port_keeper: bool = False
    # NETCONF call home: globs of unknown devices that may enrol, and how many
    # unknown devices a minute are handled per source address and in total.
    netconf_allow: tuple[str, ...] = ()
    netconf_unknown_per_minute: int = 10
    netconf_unknown_per_minute_total: int = 60
    transport: TransportPolicy = field(factory=TransportPolicy)
    # Public-key blobs of the user CAs whose certificates log operators in.
    trusted_ca_keys: tuple[bytes, ...] = ()
    # Prometheus /metrics listener (hub.web.metrics), or None (`--metrics none`).
    metrics: str | None = "tcp:9721:interface=127.0.0.1"
    # The web console (hub.web): its endpoint (None: off), the URL operators are
    # given (None: the address they reached the hub at), session lifetimes.
    web: str | None = "ssl:443"
    web_url: str | None = None
    web_idle_timeout: float = 1800.0
    web_absolute_timeout: float = 43200.0
    web_proxy: ProxySettings = field(factory=ProxySettings)
    # How the hub logs in to devices: "key" (the management key) or "ca" (a
    # certificate from the hub user CA first, then the key; hub.ssh.usercerts).
    device_login: str = "key"
    # Session recording (hub.access.recordings): on or off, and its retention.
    recordings_enabled: bool = True
    recordings: RetentionRules = field(factory=RetentionRules)
    # Several hubs on one registry (hub.cluster): the peer listener endpoint
    # (None: a single hub, no peering), this hub's id and the address peers dial
    # (None: the peer listener's own address).
    peer: str | None = None
    cluster_id: str = "hub"
    peer_address: str | None = None
    # Hub processes sharing the SSH listener (hub.app.workers); 1: one process.
    workers: int = 1
    # With workers > 1: the `[cluster] id` the workers' ids derive from
    # (`ID-w0`, `ID-w1`, ...); siblings on one machine relay no ports to each other.
    worker_group: str | None = None
    # A PostgreSQL registry (`--registry postgresql://...`), or None: the SQLite
    # file in the data directory (`db_path`).
    registry_url: str | None = None
    # Load balancers whose connections to the SSH listener start with a PROXY
    # protocol header naming the device's address (hub.access.proxyheader).
    proxy_protocol_from: tuple[str, ...] = ()

    @property
    def db_path(self) -> str:
        return os.path.join(self.data, "hub.sqlite3")

    @property
    def registry(self) -> str:
        """What `Registry` opens: the PostgreSQL URL, else the SQLite file."""
        return self.registry_url or self.db_path

    @property
    def keys_dir(self) -> str:
        return os.path.join(self.data, "keys")

    @property
    def recordings_dir(self) -> str:
        return os.path.join(self.data, "recordings")


def parse_port_range(text: str) -> tuple[int, int]:
    """Parse `LOW-HIGH`; raise ConfigError naming --port-range when it is wrong."""
    m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text)
    if not m:
        raise ConfigError(f"--port-range: expected LOW-HIGH, got {text!r}")
    low, high = int(m.group(1)), int(m.group(2))
    if not (1 <= low <= high <= 65535):
        raise ConfigError(f"--port-range: {low}-{high} is not within 1-65535 with LOW <= HIGH")
    return low, high


_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "registrar": {"user": str},
    "nsca": {
        "password": str,
        "encryption": int,
        "max_age": int,
        "strict_host": bool,
        "history": int,
        "max_connections": int,
        "max_connections_per_source": int,
        "hosts": dict,
    },
    "limits": {
        "login_timeout": int,
        "max_auth_tries": int,
        "max_unauthenticated": int,
        "password_backoff_base": (int, float),
        "password_backoff_max": (int, float),
        "max_startups": str,
        "per_source_unauthenticated": int,
        "per_device_source_unauthenticated": int,
        "kex_grace": int,
        "penalty_points": int,
        "penalty_time": int,
        "penalty_exempt": list,
        "penalty_trickle": int,
        "password_checks_burst": int,
        "password_checks_per_minute": int,
        "password_checks_global_burst": int,
        "password_checks_global_per_minute": int,
        "max_sessions": int,
        "max_channels": int,
        "max_forwards_pending": int,
        "max_forwards": int,
        "pending_lease_expiry": (int, float),
    },
    "netconf": {"secrets": dict, "allow": list, "unknown_per_minute": int,
                "unknown_per_minute_total": int},
    "transport": {"legacy_algorithms": bool},
    "operators": {"trusted_ca_keys": list},
    "web": {"idle_timeout": (int, float), "absolute_timeout": (int, float)},
    "web_proxy": {"max_body": int, "timeout": (int, float), "sandbox": bool,
                  "audit_interval": (int, float)},
    "devices": {"login": str},
    "recordings": {"enabled": bool, "max_age_days": (int, float),
                   "max_total_mb": (int, float)},
    "cluster": {"id": str, "peer_address": str},
    "ssh": {"proxy_protocol_from": list},
}


def _check_types(doc: Mapping[str, Any], where: str) -> None:
    for section, value in doc.items():
        if section not in _SCHEMA:
            raise ConfigError(f"{where}: unknown section [{section}]")
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: [{section}] must be a table")
        for key, item in value.items():
            expected = _SCHEMA[section].get(key)
            if expected is None:
                raise ConfigError(f"{where}: unknown key {key!r} in [{section}]")
            # bool is an int in Python; refuse it where a number is meant.
            if isinstance(item, bool) and expected is not bool:
                raise ConfigError(f"{where}: [{section}] {key} must be a number, not {item!r}")
            if not isinstance(item, expected):
                raise ConfigError(f"{where}: [{section}] {key} has the wrong type: {item!r}")


def load_config_file(path: str) -> dict[str, Any]:
    """Read and type-check a TOML config file; ConfigError with the reason."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: not valid TOML: {e}") from None
    _check_types(doc, f"config file {path}")
    return doc


def check_endpoint(option: str, description: str | None) -> str | None:
    """An endpoint string as twistd takes it (`tcp:22`, `tcp:0:interface=127.0.0.1`,
    `unix:/run/x.sock`), parsed now so that a typo stops start-up with one line."""
    if description is None:
        return None
    try:
        serverFromString(None, description)  # parses only; nothing listens yet
    except (ValueError, TypeError, KeyError, ImportError, OSError) as e:
        raise ConfigError(f"{option}: {description!r} is not a listening endpoint ({e}); "
                          "write it as tcp:PORT or tcp:PORT:interface=ADDRESS") from None
    return description


DEFAULT_METRICS = "tcp:9721:interface=127.0.0.1"


def metrics_endpoint(value: str | None) -> str | None:
    """`--metrics`: a listening endpoint, or `none` for no metrics listener."""
    value = DEFAULT_METRICS if value is None else value
    if value.strip().lower() == "none":
        return None
    return check_endpoint("--metrics", value)


def check_web_endpoint(description: str | None) -> str | None:
    """`--web`: `none` (off), `ssl:PORT[:…]` (the hub's own certificate unless
    privateKey= is given) or any other listening endpoint (`tcp:…` behind a proxy)."""
    if description is None or description.strip().lower() == "none":
        return None
    ours = description.startswith("ssl:") and "privateKey=" not in description
    try:
        # The hub's own certificate does not exist yet: parse the rest as TCP.
        serverFromString(None, "tcp:" + description[4:] if ours else description)
    except (ValueError, TypeError, KeyError, ImportError, OSError) as e:
        raise ConfigError(f"--web: {description!r} is not a listening endpoint ({e}); write it "
                          "as ssl:PORT, tcp:PORT:interface=ADDRESS or none") from None
    return description


def check_web_url(url: str | None) -> str | None:
    if url is None:
        return None
    if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", url):
        raise ConfigError(f"--web-url: expected https://HOST[:PORT][/PREFIX], got {url!r}")
    return url.rstrip("/")


def build_config(options: Mapping[str, Any]) -> HubConfig:
    """Merge command-line options with the config file and validate the whole."""
    data = options.get("data") or os.environ.get("CALLHOMEHUB_DATA") or "."
    config_path = options.get("config")
    if config_path is None:
        default = os.path.join(data, "callhomehub.toml")
        config_path = default if os.path.exists(default) else None
    doc = load_config_file(config_path) if config_path else {}

    low, high = parse_port_range(options.get("port-range") or "49152-65535")
    keepalive = _number(options.get("keepalive", 15), "--keepalive", minimum=0)
    count = int(_number(options.get("keepalive-count", 3), "--keepalive-count", minimum=1))

    registrar = doc.get("registrar", {}).get("user", "cms")
    if not is_valid_name(registrar):
        raise ConfigError(f"[registrar] user: {registrar!r} is not a valid user name")

    try:
        nsca = NSCASettings(**doc.get("nsca", {}))
    except ValueError as e:
        raise ConfigError(f"[nsca] {e}") from None

    limits = Limits(**doc.get("limits", {}))
    if limits.login_timeout < 1 or limits.max_auth_tries < 1 or limits.max_unauthenticated < 1:
        raise ConfigError(
            "[limits] login_timeout, max_auth_tries and max_unauthenticated must be >= 1")
    _check_admission(limits)
    for key in ("max_sessions", "max_channels"):
        if getattr(limits, key) < 1:
            raise ConfigError(f"[limits] {key} must be >= 1")
    if limits.max_forwards < 1:
        raise ConfigError("[limits] max_forwards must be >= 1")
    if limits.max_forwards_pending < 0:
        raise ConfigError("[limits] max_forwards_pending must be >= 0")
    if limits.pending_lease_expiry < 60:
        raise ConfigError("[limits] pending_lease_expiry must be >= 60 (seconds)")

    proxy_from = doc.get("ssh", {}).get("proxy_protocol_from", [])
    if not all(isinstance(x, str) for x in proxy_from):
        raise ConfigError("[ssh] proxy_protocol_from must be a list of addresses or networks")
    try:
        parse_networks(proxy_from)
    except ValueError as e:
        raise ConfigError(f"[ssh] proxy_protocol_from: {e}") from None
    # A trusted balancer's own connections are its health checks (they never log in):
    # like the hub's own host, it is neither capped per address nor penalized.
    exempt: list[str] = [*limits.penalty_exempt]
    limits = evolve(limits, penalty_exempt=tuple(
        exempt + [net for net in proxy_from if net not in exempt]))

    secrets = doc.get("netconf", {}).get("secrets", {})
    for device, secret in secrets.items():
        if not isinstance(secret, str):
            raise ConfigError(f"[netconf.secrets] {device}: the secret must be a string")

    netconf = doc.get("netconf", {})
    allow = netconf.get("allow", [])
    if not all(isinstance(p, str) and p.strip() for p in allow):
        raise ConfigError("[netconf] allow: expected a list of device names or globs, "
                          f"got {allow!r}")
    rates = {key: netconf.get(key, default) for key, default in
             (("unknown_per_minute", 10), ("unknown_per_minute_total", 60))}
    for key, rate in rates.items():
        if rate < 1:
            raise ConfigError(f"[netconf] {key} must be >= 1, got {rate!r}")

    web = doc.get("web", {})
    idle = float(web.get("idle_timeout", 1800))
    absolute = float(web.get("absolute_timeout", 43200))
    if idle < 60 or absolute < idle:
        raise ConfigError("[web] idle_timeout must be >= 60 and absolute_timeout >= "
                          f"idle_timeout (seconds), got {idle:g} and {absolute:g}")

    return HubConfig(
        data=data,
        ssh=check_endpoint("--ssh", options.get("ssh") or "tcp:22") or "tcp:22",
        port_low=low,
        port_high=high,
        public_interface=options.get("public-interface") or "0.0.0.0",
        keepalive=keepalive,
        keepalive_count=count,
        nsca_endpoint=check_endpoint("--nsca", options.get("nsca")),
        command_file=options.get("command-file"),
        netconf_endpoint=check_endpoint("--netconf", options.get("netconf")),
        registrar_user=registrar,
        nsca=nsca,
        limits=limits,
        netconf_secrets=dict(secrets),
        port_keeper=bool(options.get("port-keeper")),
        netconf_allow=tuple(p.strip() for p in allow),
        netconf_unknown_per_minute=rates["unknown_per_minute"],
        netconf_unknown_per_minute_total=rates["unknown_per_minute_total"],
        transport=TransportPolicy(**doc.get("transport", {})),
        trusted_ca_keys=trusted_ca_keys(doc.get("operators", {}).get("trusted_ca_keys", []),
                                        os.path.dirname(config_path or "")),
        metrics=metrics_endpoint(options.get("metrics")),
        web=check_web_endpoint(options.get("web", "ssl:443")),
        web_url=check_web_url(options.get("web-url")),
        web_idle_timeout=idle,
        web_absolute_timeout=absolute,
        web_proxy=_web_proxy(doc),
        device_login=_device_login(doc),
        recordings_enabled=bool(doc.get("recordings", {}).get("enabled", True)),
        recordings=_recordings(doc),
        **_cluster(doc, options.get("peer")),
        workers=workers_option(options.get("workers"), options.get("ssh") or "tcp:22"),
        registry_url=check_registry_url(
            options.get("registry") or os.environ.get("CALLHOMEHUB_REGISTRY")),
        proxy_protocol_from=tuple(proxy_from),
    )


def as_worker(config: HubConfig, index: int) -> HubConfig:
    """`config` as worker `index` of a hub with several workers runs it: its own
    hub id (`ID-wINDEX` from `[cluster] id`) and a peer listener, so that the
    workers reach each other's devices (hub.cluster). Worker 0 keeps `--peer`
    when given (several machines); the others listen on port 0 and publish the
    address they got."""
    group = config.cluster_id
    if index == 0:
        peer = config.peer or worker_peer(None)
        address = config.peer_address
    else:
        peer, address = worker_peer(config.peer_address), None
    return evolve(config, cluster_id=worker_hub_id(group, index), worker_group=group,
                  peer=peer, peer_address=address)


def _cluster(doc: Mapping[str, Any], peer: str | None) -> dict[str, Any]:
    """`--peer` and `[cluster]`: id (default the host name) and peer_address."""
    cluster = doc.get("cluster", {})
    hub_id = cluster.get("id", default_hub_id(socket.gethostname()))
    if not is_valid_hub_id(hub_id):
        raise ConfigError(f"[cluster] id: {hub_id!r} is not a valid hub id (letters, digits, "
                          "'.', '_', '-'; at most 63)")
    address = cluster.get("peer_address")
    if address is not None:
        try:
            split_address(address)
        except ValueError as e:
            raise ConfigError(f"[cluster] peer_address: {e}") from None
    if peer is not None and peer.strip().lower() == "none":
        peer = None
    peer = check_endpoint("--peer", peer)
    where = re.search(r"interface=((?:\\:|[^:])*)", peer or "")
    interface = "" if where is None else where.group(1).replace("\\:", ":")
    if peer is not None and address is None and listens_everywhere(interface):
        raise ConfigError(f"--peer {peer}: it listens on every interface; set [cluster] "
                          "peer_address to the HOST:PORT other hubs dial")
    return {"peer": peer, "cluster_id": hub_id, "peer_address": address}


def check_registry_url(url: str | None) -> str | None:
    """A PostgreSQL URL, or None for the SQLite file (the password never shown)."""
    if not url:
        return None
    if not is_url(url):
        raise ConfigError("--registry: expected postgresql://USER[:PASSWORD]@HOST[:PORT]/"
                          f"DATABASE, got {redact(url)!r} (without --registry the registry "
                          "is the SQLite file in the data directory)")
    return url


def _device_login(doc: Mapping[str, Any]) -> str:
    login = str(doc.get("devices", {}).get("login", "key"))
    if login not in ("key", "ca"):
        raise ConfigError(f'[devices] login: expected "key" or "ca", got {login!r}')
    return login


def _recordings(doc: Mapping[str, Any]) -> RetentionRules:
    section = doc.get("recordings", {})
    rules = RetentionRules(float(section.get("max_age_days", MAX_AGE_DAYS)),
                           float(section.get("max_total_mb", MAX_TOTAL_MB)))
    if rules.max_age_days <= 0 or rules.max_total_mb <= 0:
        raise ConfigError("[recordings] max_age_days and max_total_mb must be > 0, got "
                          f"{rules.max_age_days:g} and {rules.max_total_mb:g}")
    return rules


def _web_proxy(doc: Mapping[str, Any]) -> ProxySettings:
    try:
        return ProxySettings(**doc.get("web_proxy", {}))
    except ValueError as e:
        raise ConfigError(f"[web_proxy] {e}") from None


def trusted_ca_keys(entries: list[Any], base: str) -> tuple[bytes, ...]:
    """`[operators] trusted_ca_keys`: public-key lines or files of them (sshd's
    `TrustedUserCAKeys` format; a relative path is read from the config file's folder)."""
    from twisted.conch.ssh import keys

    found: list[bytes] = []
    for i, entry in enumerate(entries):
        where = f"[operators] trusted_ca_keys[{i}]"
        if not isinstance(entry, str) or not entry.strip():
            raise ConfigError(f"{where}: expected a public-key line or a file path")
        lines = [entry.strip()]
        if not re.match(r"(ssh-|ecdsa-|sk-)\S+ ", lines[0]):
            path = os.path.join(base, os.path.expanduser(lines[0]))
            try:
                with open(path, encoding="utf-8") as f:
                    lines = [line.strip() for line in f
                             if line.strip() and not line.lstrip().startswith("#")]
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"{where}: cannot read {path}: {e}") from None
        for line in lines:
            try:
                key = keys.Key.fromString(line.encode())
            except (keys.BadKeyError, ValueError, IndexError) as e:
                raise ConfigError(f"{where}: not a public key: {line[:40]!r} ({e})") from None
            if not key.isPublic():
                raise ConfigError(f"{where}: a private key; give the CA's public key")
            found.append(key.blob())
    return tuple(found)


def _check_admission(limits: Limits) -> None:
    try:
        parse_startups(limits.max_startups)
    except ValueError as e:
        raise ConfigError(f"[limits] max_startups: {e}") from None
    for key in ("per_source_unauthenticated", "per_device_source_unauthenticated",
                "kex_grace", "penalty_points", "password_checks_burst",
                "password_checks_per_minute", "password_checks_global_burst",
                "password_checks_global_per_minute"):
        if getattr(limits, key) < 1:
            raise ConfigError(f"[limits] {key} must be >= 1, got {getattr(limits, key)}")
    if limits.penalty_time < 0:
        raise ConfigError(f"[limits] penalty_time must be >= 0, got {limits.penalty_time}")
    if limits.penalty_trickle < 0:
        raise ConfigError(f"[limits] penalty_trickle must be >= 0, got {limits.penalty_trickle}")
    if limits.kex_grace > limits.login_timeout:
        raise ConfigError(f"[limits] kex_grace ({limits.kex_grace}) must not exceed "
                          f"login_timeout ({limits.login_timeout})")
    if not all(isinstance(x, str) for x in limits.penalty_exempt):
        raise ConfigError("[limits] penalty_exempt must be a list of addresses or networks")
    try:
        parse_networks(limits.penalty_exempt)
    except ValueError as e:
        raise ConfigError(f"[limits] penalty_exempt: {e}") from None


def _number(value: Any, name: str, minimum: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if number < minimum:
        raise ConfigError(f"{name}: must be >= {minimum:g}, got {value!r}")
    return number


MAX_WORKERS = 256


def workers_option(value: Any, ssh: str) -> int:
    """`--workers`: how many processes share the SSH port. Unset: one per core, or
    one when `--ssh` is not a tcp: endpoint (only those can be shared)."""
    shareable = parse_tcp_listen(ssh) is not None
    if value is None:
        return default_workers() if shareable else 1
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--workers: expected a number of processes, got {value!r}") from None
    if not 1 <= count <= MAX_WORKERS:
        raise ConfigError(f"--workers: must be 1 to {MAX_WORKERS}, got {count}")
    if count > 1 and not shareable:
        raise ConfigError(f"--workers {count}: --ssh {ssh} cannot be shared between processes; "
                          "use a tcp:PORT[:interface=ADDRESS] endpoint or --workers 1")
    return count
