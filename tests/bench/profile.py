"""py-spy profiles of the gateway's services under load, summarised for the report.

py-spy is a tool, not a project dependency: it lives in ``.bench/tools-venv``
(created on first use). ``record --format raw`` writes collapsed stacks
(``frame;frame;frame count``); the summary is the share of samples per
function, by own time and inclusive, which is what points at a hot path.
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

from tests.bench.litellm_peer import _base_python

__all__ = ["ensure_py_spy", "record", "summarise"]

#: Start-up frames under which everything runs (CLI, Granian's process management).
_SCAFFOLDING = (
    "<frozen runpy>",
    "typer/",
    "click/",
    "multiprocessing/",
    "granian/server/",
    "neuronetz_gateway/cli/",
    "threading.py",
)
_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def ensure_py_spy(tools_venv: Path) -> str:
    """The ``py-spy`` binary, installed into ``tools_venv`` when missing."""
    binary = tools_venv / "bin" / "py-spy"
    if binary.is_file():
        return str(binary)
    subprocess.run([_base_python(), "-m", "venv", str(tools_venv)], check=True, capture_output=True)
    result = subprocess.run(
        [str(tools_venv / "bin" / "pip"), "install", "-q", "py-spy"],
        capture_output=True,
        text=True,
        check=False,
    )
    if not binary.is_file():
        raise RuntimeError("pip install py-spy failed: " + result.stderr.strip()[-300:])
    return str(binary)


def record(py_spy: str, pid: int, seconds: int, output: Path) -> subprocess.Popen[bytes]:
    """Start sampling ``pid`` and its subprocesses (Granian's worker) for ``seconds``."""
    argv = [
        py_spy, "record", "--pid", str(pid), "--subprocesses", "--nonblocking",
        "--rate", "200", "--duration", str(seconds), "--format", "raw",
        "--output", str(output),
    ]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _location(frame: str) -> tuple[str, str]:
    """``fn (path/to/site-packages/pkg/mod.py:12)`` -> (``pkg/mod.py``, ``fn``)."""
    match = _FRAME.match(frame.strip())
    if not match:
        return "", frame.strip()
    path = match["file"]
    for marker in ("site-packages/", "services/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return path, match["fn"]


def _package(path: str) -> str:
    """The top-level package of a frame's file (``asyncio``, ``redis``, ``neuronetz_gateway``)."""
    head = path.split("/", 1)[0]
    return head.removesuffix(".py") or "?"


def summarise(raw: Path, *, top: int = 12) -> dict[str, Any]:
    """Where the sampled CPU went: by package and function (own time), and inclusive.

    py-spy records only threads that are running (not idle in the event loop),
    so the shares are of busy time. A leaf frame that calls into native code
    (Granian's Rust I/O, a C extension) carries that native time as its own.
    Inclusive shares skip the start-up chain (CLI, Granian's process management).
    """
    own: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [
            _location(f)
            for f in stack.split(";")
            if f and not f.startswith(("process ", "thread "))
        ]
        if not frames:
            continue
        total += count
        leaf_path, leaf_fn = frames[-1]
        own[f"{leaf_path}:{leaf_fn}"] += count
        packages[_package(leaf_path)] += count
        for path, fn in {f"{p}:{f}": (p, f) for p, f in frames}.values():
            inclusive[f"{path}:{fn}"] += count
    if total == 0:
        return {"samples": 0, "packages": [], "self": [], "inclusive": [], "ours": []}
    below_scaffolding = [
        (fn, n / total)
        for fn, n in inclusive.most_common()
        if not fn.startswith(_SCAFFOLDING) and n / total < 0.9
    ]
    return {
        "samples": total,
        "packages": [(name, n / total) for name, n in packages.most_common(top)],
        "self": [(fn, n / total) for fn, n in own.most_common(top)],
        "ours": [(fn, s) for fn, s in below_scaffolding if fn.startswith("neuronetz_gateway/")][
            : top + 4
        ],
        "inclusive": [
            (fn, s) for fn, s in below_scaffolding if not fn.startswith("neuronetz_gateway/")
        ][:top],
    }
