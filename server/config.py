"""The front end's one configuration object, read from `kiln.toml` and the environment.

Built and validated once at start-up (`load_config`); every error names the setting that is wrong
and what would be right. API keys are secrets: they never appear in `repr`, logs or errors.
See `kiln.example.toml` at the repository root for every setting with its meaning.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import msgspec

from engine.errors import KilnError

SIZE_RE = re.compile(r"^(\d+)x(\d+)$")
# workers.remote: "host:port", or "dns:///name:port" for every address the name resolves to
# (re-resolved while running: engine/client/discovery.py).
ADDRESS_RE = re.compile(r"^(?:dns:///)?[\w.\-\[\]:]+:\d+$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]*$")
KEYS_ENV = "KILN_API_KEYS"
WORKER_TOKEN_ENV = "KILN_WORKER_TOKEN"


class ConfigError(KilnError):
    """A setting in kiln.toml, the environment or the command line is invalid; the message names it."""


class ServerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 8000
    # Base of hosted image URLs, e.g. "https://kiln.example.com" behind a reverse proxy.
    # Empty: http://<host>:<port>.
    public_url: str = ""
    max_body_bytes: int = 33_554_432  # 32 MiB: edits upload pictures (OpenAI allows 50 MB for gpt-image)
    # Paths served without an API key.
    open_paths: list[str] = msgspec.field(default_factory=lambda: ["/health", "/ready", "/metrics", "/schema"])
    log_level: str = "info"
    # Longest request head (request line + headers) accepted; longer ones get 431 as an OpenAI error.
    max_header_bytes: int = 65_536


class AuthConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    api_keys: list[str] = msgspec.field(default_factory=list)

    def __repr__(self) -> str:  # keys are secrets
        return f"AuthConfig(api_keys=<{len(self.api_keys)} hidden>)"


class ModelConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str  # the name clients send as `model`
    package: str = ""  # package folder, for local workers (empty: served by remote workers only)
    worker_model: str = ""  # the workers' name for it (empty: the package manifest's name, else `name`)
    aliases: list[str] = msgspec.field(default_factory=list)
    default_size: str = "1024x1024"  # the seed contract's default
    default_steps: int | None = None  # None: the package's own default
    max_side: int | None = None  # lower the package's own limit (bounds the cost of one request)


class WorkersConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    local: int = 1  # worker processes to spawn on this host (each serves every local package)
    base_port: int = 0  # local worker k listens on 127.0.0.1:base_port+k (0: each picks a free port)
    threads: int = 0  # intra-op threads per local worker (0: the runtime's default)
    max_batch: int = 8  # samples per UNet call in a local worker
    max_queue: int = 64  # images waiting in a local worker before it refuses (-> 429)
    warmup_sizes: list[str] = msgspec.field(default_factory=list)  # "WxH"; empty: each package's default
    batching: bool = True
    # Workers elsewhere: "host:port", or "dns:///name:port" (every address `name` resolves to, looked
    # up again every few seconds and when a worker fails: a Kubernetes headless Service's pods).
    remote: list[str] = msgspec.field(default_factory=list)
    # CUDA_VISIBLE_DEVICES of each local worker, one entry per worker (one worker per GPU): ["0", "1"].
    # Empty: the workers inherit this process's environment.
    devices: list[str] = msgspec.field(default_factory=list)
    start_timeout_s: float = 300.0
    # Fixed-shape sessions each local worker keeps per component besides the warm-up sizes (least
    # recently used evicted). None: the worker's default (4, or KILN_MAX_SESSIONS).
    session_cache: int | None = None
    # Shared secret every worker RPC must carry (gRPC metadata). KILN_WORKER_TOKEN in the
    # environment replaces it. Empty: local workers get a random one per start; remote workers
    # must then be started without a token (loopback only).
    token: str = ""
    # TLS to remote workers: the CA that signed their certificates (empty: plaintext), and an
    # optional client certificate + key when the workers require one (mutual TLS).
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # How often the front end asks the workers again for their models and limits.
    models_refresh_s: float = 30.0

    def __repr__(self) -> str:  # the token is a secret
        fields = {f: getattr(self, f) for f in self.__struct_fields__ if f != "token"}
        return f"WorkersConfig({', '.join(f'{k}={v!r}' for k, v in fields.items())}, token=<{'set' if self.token else 'empty'}>)"


class ImagesConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    dir: str = "build/images"
    ttl_minutes: float = 60.0
    cleanup_interval_s: float = 60.0
    response_format: str = "url"  # default for both APIs: "url" or "b64_json" (a data: URL in chat)
    # Where chat answers put the pictures when the request does not say (`modalities`):
    # "content_parts" (the seed contract: image_url parts in message.content) or "message_images"
    # (OpenRouter's: message.content the text, message.images the pictures), for clients that
    # read content as a string and cannot send modalities.
    chat_answer: str = "content_parts"
    # Disk the hosted images may use; past it the oldest are removed first (0: no cap).
    max_bytes: int = 1_073_741_824  # 1 GiB


class LimitsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    max_n: int = 4
    max_steps: int = 100
    max_prompt_chars: int = 4000
    request_timeout_s: float = 300.0
    # On SIGTERM, how long requests in flight may still run (server/shutdown.py). None: the request
    # timeout + 5 s, so that no request that could still succeed is cut.
    drain_timeout_s: float | None = None
    retry_after_s: int = 2  # sent with 429/503

    @property
    def drain_timeout(self) -> float:
        return self.drain_timeout_s if self.drain_timeout_s is not None else self.request_timeout_s + 5.0


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    models: list[ModelConfig] = msgspec.field(default_factory=list)
    workers: WorkersConfig = msgspec.field(default_factory=WorkersConfig)
    images: ImagesConfig = msgspec.field(default_factory=ImagesConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)

    @property
    def public_url(self) -> str:
        if self.server.public_url:
            return self.server.public_url.rstrip("/")
        host = self.server.host if self.server.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        return f"http://{host}:{self.server.port}"


def parse_config(raw: dict, *, source: str = "kiln.toml", env: dict[str, str] | None = None, base: Path | None = None) -> Config:
    """A validated Config from a TOML-shaped dict; `KILN_API_KEYS` in `env` replaces `auth.api_keys`."""
    try:
        config = msgspec.convert(raw, Config)
    except msgspec.ValidationError as e:
        raise ConfigError(f"{source}: {_explain(str(e))}") from None
    env = os.environ if env is None else env
    if env.get(KEYS_ENV, "").strip():
        keys = [k.strip() for k in env[KEYS_ENV].split(",") if k.strip()]
        config = msgspec.structs.replace(config, auth=AuthConfig(api_keys=keys))
    if env.get(WORKER_TOKEN_ENV, "").strip():
        config = msgspec.structs.replace(config, workers=msgspec.structs.replace(config.workers, token=env[WORKER_TOKEN_ENV].strip()))
    if base is not None:  # package paths are relative to the config file
        models = [
            msgspec.structs.replace(m, package=str((base / m.package).resolve())) if m.package else m
            for m in config.models
        ]
        images = config.images
        if not Path(images.dir).is_absolute():
            images = msgspec.structs.replace(images, dir=str((base / images.dir).resolve()))
        workers = config.workers
        tls_files = {f: getattr(workers, f) for f in ("tls_ca_file", "tls_cert_file", "tls_key_file")}
        workers = msgspec.structs.replace(
            workers, **{f: str((base / v).resolve()) for f, v in tls_files.items() if v and not Path(v).is_absolute()}
        )
        config = msgspec.structs.replace(config, models=models, images=images, workers=workers)
    validate(config, source)
    return msgspec.structs.replace(config, models=[_with_worker_model(m, source) for m in config.models])


def load_config(path: Path | str, env: dict[str, str] | None = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (copy kiln.example.toml to start one)")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    return parse_config(raw, source=str(path), env=env, base=path.resolve().parent)


def validate(config: Config, source: str = "config") -> None:
    """Raise ConfigError naming the first bad setting."""

    def bad(setting: str, message: str) -> ConfigError:
        return ConfigError(f"{source}: {setting} {message}")

    s = config.server
    if not (0 <= s.port <= 65535):
        raise bad("server.port", f"must be between 0 and 65535, got {s.port}")
    if s.public_url and not re.match(r"^https?://[^\s/]+", s.public_url):
        raise bad("server.public_url", f"must start with http:// or https://, got {s.public_url!r}")
    if s.max_body_bytes < 1024:
        raise bad("server.max_body_bytes", f"must be at least 1024, got {s.max_body_bytes}")
    for p in s.open_paths:
        if not p.startswith("/"):
            raise bad("server.open_paths", f"entries are paths starting with '/', got {p!r}")
    if s.max_header_bytes < 1024:
        raise bad("server.max_header_bytes", f"must be at least 1024, got {s.max_header_bytes}")
    if s.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise bad("server.log_level", f"must be debug, info, warning or error, got {s.log_level!r}")
    for i, key in enumerate(config.auth.api_keys):
        if len(key) < 8 or any(c.isspace() for c in key):
            # never echo the key itself
            raise bad(f"auth.api_keys[{i}]", "must be at least 8 characters without spaces")

    if not config.models:
        raise bad("models", "is empty: add at least one [[models]] table with a name and a package")
    seen: dict[str, str] = {}
    for i, m in enumerate(config.models):
        where = f"models[{i}]"
        for name in [m.name, *m.aliases]:
            if not NAME_RE.match(name):
                raise bad(f"{where}.name/aliases", f"{name!r} is not a valid model name (letters, digits, . _ : -)")
            if name in seen:
                raise bad(f"{where}.aliases", f"{name!r} is already used by model {seen[name]!r}")
            seen[name] = m.name
        if m.package and not (Path(m.package) / "manifest.json").is_file():
            raise bad(f"{where}.package", f"{m.package} is not a model package (no manifest.json); build it with `kiln export`")
        if not SIZE_RE.match(m.default_size):
            raise bad(f"{where}.default_size", f"must look like 1024x1024, got {m.default_size!r}")
        if m.default_steps is not None and not (1 <= m.default_steps <= config.limits.max_steps):
            raise bad(f"{where}.default_steps", f"must be between 1 and limits.max_steps ({config.limits.max_steps})")
        if m.max_side is not None and m.max_side < 64:
            raise bad(f"{where}.max_side", f"must be at least 64, got {m.max_side}")

    w = config.workers
    if w.local < 0:
        raise bad("workers.local", f"must be 0 or more, got {w.local}")
    if w.local == 0 and not w.remote:
        raise bad("workers", "has no workers: set workers.local >= 1 or list workers.remote addresses")
    if w.local and not any(m.package for m in config.models):
        raise bad("workers.local", "needs at least one model with a `package` to load")
    if w.base_port and not (1024 <= w.base_port <= 65535 - w.local):
        raise bad("workers.base_port", f"must be 0 (free ports) or leave room for {w.local} ports in 1024..65535, got {w.base_port}")
    if w.threads < 0:
        raise bad("workers.threads", f"must be 0 (the runtime's default) or more, got {w.threads}")
    if w.max_batch < 1:
        raise bad("workers.max_batch", f"must be at least 1, got {w.max_batch}")
    if w.max_queue < 1:
        raise bad("workers.max_queue", f"must be at least 1, got {w.max_queue}")
    if w.devices and len(w.devices) != w.local:
        raise bad("workers.devices", f"has {len(w.devices)} entries for {w.local} local workers: give one device per worker")
    for size in w.warmup_sizes:
        if not SIZE_RE.match(size):
            raise bad("workers.warmup_sizes", f"entries look like 256x256, got {size!r}")
    if w.session_cache is not None and w.session_cache < 1:
        raise bad("workers.session_cache", f"must be at least 1, got {w.session_cache}")
    if w.start_timeout_s <= 0:
        raise bad("workers.start_timeout_s", f"must be positive, got {w.start_timeout_s}")
    for addr in w.remote:
        if not ADDRESS_RE.match(addr):
            raise bad("workers.remote", f"entries look like host:port or dns:///name:port, got {addr!r}")
    if w.token and (len(w.token) < 16 or any(c.isspace() for c in w.token)):
        raise bad("workers.token", "must be at least 16 characters without spaces")  # never echoed
    if bool(w.tls_cert_file) != bool(w.tls_key_file):
        raise bad("workers.tls_cert_file/tls_key_file", "come as a pair (a client certificate and its key)")
    if w.tls_cert_file and not w.tls_ca_file:
        raise bad("workers.tls_ca_file", "is needed with a client certificate (TLS to the workers)")
    for setting in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
        value = getattr(w, setting)
        if value and not Path(value).is_file():
            raise bad(f"workers.{setting}", f"{value} is not a file")
    if w.models_refresh_s <= 0:
        raise bad("workers.models_refresh_s", f"must be positive, got {w.models_refresh_s}")

    im = config.images
    if im.ttl_minutes <= 0:
        raise bad("images.ttl_minutes", f"must be positive, got {im.ttl_minutes}")
    if im.cleanup_interval_s <= 0:
        raise bad("images.cleanup_interval_s", f"must be positive, got {im.cleanup_interval_s}")
    if im.response_format not in ("url", "b64_json"):
        raise bad("images.response_format", f"must be 'url' or 'b64_json', got {im.response_format!r}")
    if im.chat_answer not in ("content_parts", "message_images"):
        raise bad("images.chat_answer", f"must be 'content_parts' or 'message_images', got {im.chat_answer!r}")
    if im.max_bytes < 0:
        raise bad("images.max_bytes", f"must be 0 (no cap) or more, got {im.max_bytes}")

    lim = config.limits
    if not (1 <= lim.max_n <= 128):
        raise bad("limits.max_n", f"must be between 1 and 128, got {lim.max_n}")
    if not (1 <= lim.max_steps <= 150):
        raise bad("limits.max_steps", f"must be between 1 and 150 (the engine's cap), got {lim.max_steps}")
    if lim.max_prompt_chars < 1:
        raise bad("limits.max_prompt_chars", f"must be positive, got {lim.max_prompt_chars}")
    if lim.request_timeout_s <= 0:
        raise bad("limits.request_timeout_s", f"must be positive, got {lim.request_timeout_s}")
    if lim.drain_timeout_s is not None and lim.drain_timeout_s < 0:
        raise bad("limits.drain_timeout_s", f"must be 0 or more, got {lim.drain_timeout_s}")
    if lim.retry_after_s < 0:
        raise bad("limits.retry_after_s", f"must be 0 or more, got {lim.retry_after_s}")


def _with_worker_model(m: ModelConfig, source: str) -> ModelConfig:
    """Fill `worker_model`: the package manifest's name, else the public name."""
    if m.worker_model:
        return m
    if m.package:
        from engine.manifest import read_manifest  # msgspec only: no onnxruntime

        try:
            return msgspec.structs.replace(m, worker_model=read_manifest(Path(m.package)).name)
        except KilnError as e:
            raise ConfigError(f"{source}: models {m.name!r} package: {e}") from None
    return msgspec.structs.replace(m, worker_model=m.name)


def _explain(msgspec_message: str) -> str:
    """msgspec's 'Expected `int`, got `str` - at `$.server.port`' -> 'server.port: expected int, got str'."""
    m = re.match(r"^(.*) - at `\$\.?(.*)`$", msgspec_message)
    if not m:
        return msgspec_message
    what, where = m.groups()
    what = what.replace("`", "")
    if what.startswith("Object contains unknown field"):
        return f"{where or 'top level'}: {what.lower()} (see kiln.example.toml for the settings)"
    return f"{where}: {what[0].lower()}{what[1:]}"
