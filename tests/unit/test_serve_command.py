"""``serve`` refuses bad configuration before any worker starts, naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def _serve(service: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NZ_")}
    return subprocess.run(
        [sys.executable, "-m", "neuronetz_gateway.cli", "serve", service, "--port", "1"],
        capture_output=True,
        text=True,
        env={**clean, **env},
        timeout=30,
        check=False,
    )


def test_proxy_names_an_unwritable_spool_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    result = _serve("proxy", NZ_GATEWAY_SECRET="s" * 40, NZ_AUDIT_SPOOL_DIR=str(blocker / "spool"))
    assert result.returncode == 2
    assert "NZ_AUDIT_SPOOL_DIR" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_secret_is_named() -> None:
    result = _serve("auth")
    assert result.returncode == 2
    assert result.stderr.startswith("error: NZ_GATEWAY_SECRET must be set")


def test_bad_url_is_named() -> None:
    result = _serve("auth", NZ_GATEWAY_SECRET="s" * 40, NZ_REDIS_URL="http://nope")
    assert result.returncode == 2
    assert "NZ_REDIS_URL" in result.stderr


def test_an_otlp_protocol_other_than_http_is_named() -> None:
    result = _serve(
        "auth",
        NZ_GATEWAY_SECRET="s" * 40,
        OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:4318",
        OTEL_EXPORTER_OTLP_PROTOCOL="grpc",
    )
    assert result.returncode == 2
    assert "OTEL_EXPORTER_OTLP_PROTOCOL" in result.stderr
    assert "Traceback" not in result.stderr
