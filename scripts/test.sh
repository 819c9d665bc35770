#!/usr/bin/env bash
# Install what the tests need (dcmtk, Orthanc, Chromium and openssl from Debian, the OHIF viewer from npm,
# the Python packages into ./.venv), make sure PostgreSQL answers on 127.0.0.1:5432, and run the
# whole test suite.  Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
missing=()
[ -x /usr/bin/storescu ] || missing+=(dcmtk)
[ -x /usr/sbin/Orthanc ] || missing+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/openssl ] || missing+=(openssl)  # makes the test certificates for DICOM TLS and HTTPS
if [ ${#missing[@]} -gt 0 ]; then
  $sudo apt-get update -qq
  # Orthanc's own service is not used: the tests start Orthanc with configurations of their own.
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null && command -v pg_ctlcluster >/dev/null; then
  $sudo pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
fi
scripts/install.sh test
tests/ohif/install.sh  # playwright-core (npm ci) + the prebuilt OHIF viewer (npm pack @ohif/app); no browser download
# The venv's tools (dciodvfy, dcmqi) after the system's, so dcmtk's storescu is not shadowed by pynetdicom's.
export PATH="$PATH:$PWD/.venv/bin"
exec .venv/bin/python -m pytest "$@"
