"""The TLS profile of every listener (DICOM TLS and HTTPS): BCP 195 (RFC 9325), as PS3.15 Annex B asks.

TLS 1.2 or newer; for TLS 1.2 only forward-secret AEAD cipher suites (TLS 1.3's suites all are).
DHE stays beside ECDHE because some modalities offer nothing else.
"""

from __future__ import annotations

import ssl

BCP195_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"


def apply_bcp195(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_TLS12_CIPHERS)
    return context
