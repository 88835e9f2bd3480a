"""The TLS context of upstream calls: certificates verified against ``SSL_CERT_FILE`` /
``SSL_CERT_DIR`` when set (a private CA, a corporate proxy's), else certifi's bundle as
the SDKs use, else the system's."""

from __future__ import annotations

import functools
import os
import ssl


@functools.cache
def client_context() -> ssl.SSLContext:
    """One context for the process (contexts are costly to build; sharing one also shares
    its session cache). Read once: the environment is the process's configuration."""
    cafile = os.environ.get("SSL_CERT_FILE") or None
    capath = os.environ.get("SSL_CERT_DIR") or None
    if cafile is None and capath is None:
        try:
            import certifi

            cafile = certifi.where()
        except ImportError:
            pass
    context = ssl.create_default_context(cafile=cafile, capath=capath)
    context.set_alpn_protocols(["http/1.1"])
    return context
