"""Run the services as local uvicorn processes on loopback (no Docker).

    stack = LocalStack(workdir="runs/local")        # ports 8100 (orchestrator), 8101.. providers
    with stack:                                     # start, wait for /readyz, stop on exit
        stack.deploy(load_artifact("artifacts/default"))
        stack.orchestrator_url                      # http://127.0.0.1:8100

Layout of the work directory:

    WORKDIR/
      secrets/tokens/<provider>   each provider's bearer token (0600); the orchestrator's
      secrets/admin_token         token for registering models (0600)
      provider-a/ ...             each provider's own data directory (qumos.store)
      orchestrator/               registered models (company parts only)
      logs/<service>.log          stdout + stderr of each process

`qumos up`, `qumos demo` and the integration tests all use this module. Stopping sends
SIGTERM, waits, then SIGKILL. The attacker service is started too when
services/attacker/app.py exists (`with_attacker`).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from qumos.errors import StackError
from qumos.spec import provider_name

HOST = "127.0.0.1"
ATTACKER_APP = Path(__file__).resolve().parents[2] / "services" / "attacker" / "app.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def write_secret(path: Path, value: str | None = None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    value = value or secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
    os.chmod(path, 0o600)
    return value


@dataclass
class Service:
    name: str
    app: str  # "module:factory"
    port: int
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        cmd = [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            self.app,
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            "--no-access-log",
            "--no-proxy-headers",
        ]  # loopback: no proxy in front
        self.proc = subprocess.Popen(
            cmd,
            env={**os.environ, **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # Ctrl-C goes to us, not it
        log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: a crash, not a shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class LocalStack:
    workdir: Path | str = Path("runs/local")
    n_providers: int = 3
    orchestrator_port: int = 8100
    provider_ports: list[int] | None = None  # default 8101, 8102, ...
    attacker_port: int | None = None  # default: orchestrator_port + 10
    with_attacker: bool | None = None  # None: start it when services/attacker/app.py exists
    breached: str = "provider-b"  # the provider directory the attacker reads
    provider_env: dict[str, dict[str, str]] = field(default_factory=dict)  # extra settings
    orchestrator_env: dict[str, str] = field(default_factory=dict)
    services: dict[str, Service] = field(default_factory=dict)

    def __post_init__(self):
        self.workdir = Path(self.workdir).resolve()
        if self.attacker_port is None:
            self.attacker_port = self.orchestrator_port + 10
        ports = self.provider_ports or [
            self.orchestrator_port + 1 + i for i in range(self.n_providers)
        ]
        if len(ports) != self.n_providers:
            raise StackError(f"provider_ports: {len(ports)} ports for {self.n_providers} providers")
        self.provider_names = [provider_name(i) for i in range(self.n_providers)]
        self.tokens_dir = self.workdir / "secrets" / "tokens"
        self.admin_token_file = self.workdir / "secrets" / "admin_token"
        self.attacker_token_file = self.workdir / "secrets" / "attacker_token"
        # a client API key for the stack's own clients (demo, attacker, tests), made at start
        self.client_key_file = self.workdir / "secrets" / "client_key"
        logs = self.workdir / "logs"
        for name, port in zip(self.provider_names, ports):
            env = {
                "QUMOS_PROVIDER_NAME": name,
                "QUMOS_PROVIDER_DATA_DIR": str(self.workdir / name),
                "QUMOS_PROVIDER_TOKEN_FILE": str(self.tokens_dir / name),
                **self.provider_env.get(name, {}),
            }
            self.services[name] = Service(
                name, "services.provider.app:create_app", port, env, logs / f"{name}.log"
            )
        self.services["orchestrator"] = Service(
            "orchestrator",
            "services.orchestrator.app:create_app",
            self.orchestrator_port,
            {
                "QUMOS_ORCH_DATA_DIR": str(self.workdir / "orchestrator"),
                "QUMOS_ORCH_PROVIDERS": ",".join(
                    f"{n}={self.services[n].url}" for n in self.provider_names
                ),
                "QUMOS_ORCH_TOKENS_DIR": str(self.tokens_dir),
                "QUMOS_ORCH_ADMIN_TOKEN_FILE": str(self.admin_token_file),
                **self.orchestrator_env,
            },
            logs / "orchestrator.log",
        )
        if self.with_attacker is None:
            self.with_attacker = ATTACKER_APP.is_file()
        if self.with_attacker:
            # Hook for the attacker service (services/attacker/app.py, QUMOS_ATTACKER_*).
            self.services["attacker"] = Service(
                "attacker",
                "services.attacker.app:create_app",
                self.attacker_port,
                {
                    "QUMOS_ATTACKER_BREACHED_DIR": str(self.workdir / self.breached),
                    "QUMOS_ATTACKER_DATA_DIR": str(self.workdir / "attacker"),
                    "QUMOS_ATTACKER_ADMIN_TOKEN_FILE": str(self.attacker_token_file),
                    "QUMOS_ATTACKER_ORCHESTRATOR_URL": self.orchestrator_url,
                    "QUMOS_ATTACKER_API_KEY_FILE": str(self.client_key_file),
                },
                logs / "attacker.log",
            )

    # ----- addresses and secrets ------------------------------------------------------------
    @property
    def orchestrator_url(self) -> str:
        return self.services["orchestrator"].url

    @property
    def provider_urls(self) -> dict[str, str]:
        return {n: self.services[n].url for n in self.provider_names}

    def data_dir(self, provider: str) -> Path:
        return Path(self.workdir) / provider

    def token(self, provider: str) -> str:
        return (self.tokens_dir / provider).read_text().strip()

    @property
    def admin_token(self) -> str:
        return self.admin_token_file.read_text().strip()

    @property
    def client_key(self) -> str:
        """The stack's client API key (created at start, `create_key` makes more)."""
        return self.client_key_file.read_text().strip()

    def create_key(self, name: str, **quota) -> str:
        from qumos.client import create_key

        return create_key(self.orchestrator_url, self.admin_token, name, **quota)["key"]

    def client(self, timeout: float = 60.0, key: str | None = None):
        """An httpx.Client sending the stack's client key (or `key`)."""
        from qumos.client import make_client

        return make_client(
            timeout=timeout, headers={"Authorization": f"Bearer {key or self.client_key}"}
        )

    @property
    def attacker_token(self) -> str:
        """Submits attack jobs to the attacker service."""
        return self.attacker_token_file.read_text().strip()

    def _write_secrets(self) -> None:
        """Fresh tokens for every start: one per provider, one for the admin."""
        for name in self.provider_names:
            write_secret(self.tokens_dir / name)
        write_secret(self.admin_token_file)
        write_secret(self.attacker_token_file)

    # ----- lifecycle ------------------------------------------------------------------------
    def start(self, timeout: float = 90.0) -> LocalStack:
        for s in self.services.values():
            if _port_in_use(s.port):
                raise StackError(
                    f"{s.name}: port {HOST}:{s.port} is already in use; stop "
                    "what runs there or choose other ports"
                )
        self._write_secrets()
        try:
            for s in self.services.values():
                s.start()
            self.wait_ready(timeout=timeout)
            if not self.client_key_file.is_file():  # a restarted stack keeps its key
                write_secret(self.client_key_file, self.create_key("localstack"))
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, names: list[str] | None = None, timeout: float = 90.0) -> None:
        from qumos.client import wait_ready

        def alive(name: str) -> None:
            s = self.services[name]
            if not s.alive():
                raise StackError(
                    f"{name} exited during startup (code "
                    f"{s.proc.returncode if s.proc else '?'}); last lines "
                    f"of {s.log_path}:\n{s.log_tail()}"
                )

        def log_tail(waiting: list[str]) -> str:
            s = self.services[waiting[0]]
            return f"; last lines of {s.log_path}:\n{s.log_tail()}"

        pending = list(names or self.services)
        wait_ready(
            {n: self.services[n].url for n in pending}, timeout, check=alive, detail=log_tail
        )

    def stop(self) -> None:
        for s in reversed(list(self.services.values())):
            if s.proc is not None and s.proc.poll() is None:
                s.proc.terminate()
        for s in self.services.values():
            s.stop()

    def kill(self, name: str) -> None:
        self.services[name].kill()

    def restart(self, name: str, timeout: float = 60.0) -> None:
        s = self.services[name]
        s.stop()
        s.start()
        self.wait_ready([name], timeout=timeout)

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----- deployment -----------------------------------------------------------------------
    def deploy(self, artifact) -> dict:
        from qumos.deploy import deploy_artifact

        tokens = {n: self.token(n) for n in self.provider_names}
        return deploy_artifact(
            artifact, self.orchestrator_url, self.admin_token, self.provider_urls, tokens
        )

    def describe(self) -> dict:
        return {
            "workdir": str(self.workdir),
            "services": {
                n: {"url": s.url, "pid": s.proc.pid if s.proc else None, "log": str(s.log_path)}
                for n, s in self.services.items()
            },
        }


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((HOST, port)) == 0


def stack_on_free_ports(workdir: Path | str, **kw) -> LocalStack:
    """A stack on free ephemeral ports (tests)."""
    n = kw.pop("n_providers", 3)
    return LocalStack(
        workdir=workdir,
        n_providers=n,
        orchestrator_port=free_port(),
        provider_ports=[free_port() for _ in range(n)],
        attacker_port=free_port(),
        **kw,
    )
