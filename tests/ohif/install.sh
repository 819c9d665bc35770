#!/usr/bin/env bash
# Install what tests/test_ohif.py needs beside Debian's chromium:
#   tests/ohif/node_modules/playwright-core  (npm ci; drives /usr/bin/chromium, never downloads a browser)
#   tests/ohif/viewer/                        (the prebuilt OHIF viewer: dist/ of the npm package @ohif/app)
# @ohif/app is fetched with `npm pack` (npm checks the tarball against the registry's integrity hash)
# and only its dist/ is unpacked: `npm install @ohif/app` would pull its build-time dependency tree.
# Idempotent: does nothing when both are there at the pinned versions.
set -euo pipefail
cd "$(dirname "$0")"
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
version=$(node -p 'require("./package.json").ohifApp')

if [ ! -e node_modules/playwright-core/package.json ] ||
   [ "$(node -p 'require("./node_modules/playwright-core/package.json").version')" != \
     "$(node -p 'require("./package-lock.json").packages["node_modules/playwright-core"].version')" ]; then
  npm ci --no-audit --no-fund --ignore-scripts --loglevel=error
fi

if [ "$(cat viewer/.ohif-app-version 2>/dev/null)" != "$version" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  npm pack "@ohif/app@$version" --pack-destination "$tmp" --loglevel=error >/dev/null
  # Source maps (~30 MB) are left out; everything else of dist/ is served as shipped.
  tar -xzf "$tmp"/ohif-app-*.tgz -C "$tmp" --exclude='*.map' package/dist
  [ -e "$tmp/package/dist/index.html" ] || { echo "@ohif/app@$version has no dist/index.html" >&2; exit 1; }
  rm -rf viewer
  mv "$tmp/package/dist" viewer
  echo "$version" > viewer/.ohif-app-version
fi
