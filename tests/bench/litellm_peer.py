"""LiteLLM's proxy, the peer users would otherwise pick, in a virtual environment of its own.

Not a project dependency: ``ensure_litellm()`` builds ``.bench/litellm-venv``
with ``python3 -m venv`` + ``pip install 'litellm[proxy]'`` once and reuses it
(the stamp file records that the install finished). The proxy runs with a
master key, one worker (its default, like each of our services), and one
model, ``ollama_chat/llama3.2``, on the same simulator as everything else.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

__all__ = [
    "LITELLM_MASTER_KEY",
    "LITELLM_MODEL",
    "LiteLLMInstall",
    "litellm_command",
    "litellm_config",
    "litellm_env",
]

LITELLM_MASTER_KEY = "sk-nzbench-master-key-0123456789"
#: The model name clients send; LiteLLM maps it to ``ollama_chat/llama3.2``.
LITELLM_MODEL = "llama3.2"
_STAMP = ".nz-installed"


def _base_python() -> str:
    """A system ``python3`` for the venv: LiteLLM must not share the project's packages."""
    return shutil.which("python3") or sys.executable


class LiteLLMInstall:
    """The cached venv; ``start()`` installs in the background, ``wait()`` reports."""

    def __init__(self, venv: Path) -> None:
        self.venv = venv
        self.log_path = venv.parent / "litellm-install.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def executable(self) -> Path:
        """The ``litellm`` console script inside the venv."""
        return self.venv / "bin" / "litellm"

    @property
    def cached(self) -> bool:
        """Whether a finished install is there already."""
        return (self.venv / _STAMP).is_file() and self.executable.is_file()

    def start(self) -> None:
        """Begin creating the venv and installing (no-op when cached)."""
        if self.cached:
            return
        shutil.rmtree(self.venv, ignore_errors=True)
        self.venv.parent.mkdir(parents=True, exist_ok=True)
        pip = self.venv / "bin" / "pip"
        script = (
            f"'{_base_python()}' -m venv '{self.venv}' && "
            f"'{pip}' install --disable-pip-version-check -q 'litellm[proxy]' && "
            f"touch '{self.venv / _STAMP}'"
        )
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                ["/bin/sh", "-c", script], stdout=log, stderr=subprocess.STDOUT
            )

    def wait(self, timeout: float = 480.0) -> str | None:
        """Wait for the install; None when usable, else the reason it is not."""
        if self._proc is not None:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
                return f"pip install 'litellm[proxy]' took longer than {timeout:.0f}s"
        if self.cached:
            return None
        lines = (
            self.log_path.read_text(errors="replace").splitlines() if self.log_path.exists() else []
        )
        tail = [line for line in lines if "is ignored: it is neither" not in line][-5:]
        return "installing litellm[proxy] failed: " + (" / ".join(tail) or "no output")


def litellm_config(simulator_url: str) -> str:
    """The proxy's YAML config: one model on the simulator, a master key, no database."""
    return (
        "model_list:\n"
        f"  - model_name: {LITELLM_MODEL}\n"
        "    litellm_params:\n"
        "      model: ollama_chat/llama3.2\n"
        f"      api_base: {simulator_url}\n"
        "general_settings:\n"
        f"  master_key: {LITELLM_MASTER_KEY}\n"
        "litellm_settings:\n"
        "  drop_params: true\n"
        "  telemetry: false\n"
    )


def litellm_command(install: LiteLLMInstall, config: Path, port: int) -> list[str]:
    """The command line of the proxy on 127.0.0.1:``port``."""
    return [
        str(install.executable),
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]


def litellm_env(base: dict[str, str]) -> dict[str, str]:
    """The environment for the proxy: offline cost map, quiet logs, no telemetry."""
    env = {k: v for k, v in base.items() if not k.startswith(("NZ_", "VIRTUAL_ENV"))}
    env.update(
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        LITELLM_LOG="ERROR",
        LITELLM_TELEMETRY="False",
        DISABLE_SCHEMA_UPDATE="True",
        PYTHONUNBUFFERED="1",
    )
    env.pop("DATABASE_URL", None)  # no database: the master key alone
    return env
