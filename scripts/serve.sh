#!/usr/bin/env bash
# Install (first run only) and run the node with ./config.toml: SQLite and storage under ./var/,
# AE title AI_NODE on port 11112.  Extra arguments go to `dicom-ai-node serve` (e.g. --config PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
export TCP_NODELAY="${TCP_NODELAY:-1}"
.venv/bin/dicom-ai-node db upgrade "$@"
exec .venv/bin/dicom-ai-node serve "$@"
