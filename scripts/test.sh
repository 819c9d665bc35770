#!/usr/bin/env bash
# Install what the tests need (dcmtk from Debian, the Python packages into ./.venv), make sure
# PostgreSQL answers on 127.0.0.1:5432, and run the whole test suite.  Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
if [ ! -x /usr/bin/storescu ]; then
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dcmtk >/dev/null
fi
if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null && command -v pg_ctlcluster >/dev/null; then
  $sudo pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
fi
scripts/install.sh test
# The venv's tools (dciodvfy, dcmqi) after the system's, so dcmtk's storescu is not shadowed by pynetdicom's.
export PATH="$PATH:$PWD/.venv/bin"
exec .venv/bin/python -m pytest "$@"
