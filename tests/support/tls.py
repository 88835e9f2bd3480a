"""A test certificate authority and a server certificate for ``127.0.0.1`` / ``localhost``
(made with ``trustme``), written as PEM files, for servers over TLS that a client trusts
only when told to (``SSL_CERT_FILE=ca.pem``).

No pytest here (the bench may serve TLS too); the session fixture is ``tls_files`` in
``tests/conftest.py``, which skips (fails under CI) when ``trustme`` is missing.

Usage::

    files = write_tls_files(folder)   # folder/ca.pem, folder/server.pem, folder/server.key
    files.server_context()            # for loop.create_server(ssl=...)
    files.client_context()            # trusts the test CA only
"""

from __future__ import annotations

import importlib.util
import ssl
from dataclasses import dataclass
from pathlib import Path

#: the names the server certificate is valid for (subjectAltName): loopback only
SERVER_NAMES = ("127.0.0.1", "localhost", "::1")

# The variables that choose which certificates a client trusts: Python's ssl module and
# httpx read the first two; requests, curl and Nix's OpenSSL the others. A subprocess whose
# trust a test controls starts without any of them.
TRUST_VARIABLES = (
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "NIX_SSL_CERT_FILE",
)


def trustme_available() -> bool:
    return importlib.util.find_spec("trustme") is not None


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """The PEM files of one test CA and one server certificate it signed."""

    ca: Path  # the CA certificate: what a client trusts (SSL_CERT_FILE)
    cert: Path  # the server's certificate chain, leaf first
    key: Path  # the server's private key

    def server_context(self) -> ssl.SSLContext:
        """A server-side context presenting the certificate (no client certificates)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        return context

    def client_context(self) -> ssl.SSLContext:
        """A client-side context that verifies against the test CA, and only it."""
        return ssl.create_default_context(cafile=str(self.ca))


def write_tls_files(folder: Path, names: tuple[str, ...] = SERVER_NAMES) -> TLSFiles:
    """Make a new CA and a server certificate for ``names``; write ``ca.pem``,
    ``server.pem`` (the chain) and ``server.key`` into ``folder`` (created if missing)."""
    import trustme  # a test dependency: imported only when certificates are made

    folder.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    issued = ca.issue_cert(*names)
    files = TLSFiles(ca=folder / "ca.pem", cert=folder / "server.pem", key=folder / "server.key")
    ca.cert_pem.write_to_path(str(files.ca))
    files.cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(files.key))
    files.key.chmod(0o600)
    return files
