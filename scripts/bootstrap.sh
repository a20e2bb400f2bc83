#!/usr/bin/env bash
# The project's one set-up: what the README tells a new user to run and what CI
# (.ci/run) runs, so the two cannot drift. Safe to repeat; installs only what is missing.
#   Debian packages: caddy, postgresql, redis-server (+ tools), prometheus (promtool), nodejs/npm
#   Python tools, pinned: tools/requirements.txt (pdm, go-task)
#   The coding agents the end-to-end suite runs, pinned: tools/coding-agents.txt (npm, into
#   .tools/npm, which git ignores)
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive

apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then $SUDO apt-get update -qq; apt_updated=1; fi
  $SUDO apt-get install -y -qq "$@" >/dev/null
}
have_pg_binaries() {
  command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
}

command -v caddy >/dev/null 2>&1 || apt_install caddy
have_pg_binaries || apt_install postgresql postgresql-client
command -v pg_dump >/dev/null 2>&1 || apt_install postgresql-client
command -v redis-server >/dev/null 2>&1 || apt_install redis-server
command -v redis-cli >/dev/null 2>&1 || apt_install redis-tools
command -v openssl >/dev/null 2>&1 || apt_install openssl
command -v promtool >/dev/null 2>&1 || apt_install prometheus
command -v npm >/dev/null 2>&1 || apt_install nodejs npm
# initdb refuses root: the test harness runs it as this user.
id postgres >/dev/null 2>&1 || $SUDO useradd --system --home /var/lib/postgresql --shell /bin/sh postgres

# Debian's own python3 comes without pip and refuses installs outside a venv
# (PEP 668, "externally-managed-environment"): bring pip, and let it install the
# pinned tools for this user's python3 (the variable is ignored where not needed).
python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip python3-venv
PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q -r tools/requirements.txt

# Claude Code and Codex CLI, exactly the pinned versions (tests/e2e/test_coding_agents.py).
mapfile -t agents < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' tools/coding-agents.txt)
npm ls --prefix .tools/npm "${agents[@]}" >/dev/null 2>&1 \
  || npm install --prefix .tools/npm --no-audit --no-fund --loglevel=error "${agents[@]}"

caddy version
task --version
pdm --version
