"""Fixtures and hooks only (the helpers are in ``tests/support``): the property-based
tests' profiles, the session's keys and test certificates, and the rule that under CI a
skipped test fails."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import settings

from tests.support.requirements import IN_CI, require
from tests.support.tls import TLSFiles, trustme_available, write_tls_files

# Property-based tests: `make test` draws the same examples on every run (a fixed seed,
# no example database), so CI never passes or fails by luck; `make fuzz` selects the
# "fuzz" profile and a fresh seed per round, and prints any failing example to keep.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("fuzz", derandomize=False, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under CI a skipped test is a failure, and so is a run that ran no test."""
    if not IN_CI:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if skipped:
        print(f"\nCI=true: {skipped} test(s) skipped; a skip is a failure here.")
        session.exitstatus = 1


@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    """An RSA key for RS256 tokens (made once per run: it is slow)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def ec_key() -> ec.EllipticCurvePrivateKey:
    """A P-256 key for ES256 tokens."""
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A test CA and a server certificate for 127.0.0.1 / localhost, as PEM files
    (``tests.support.tls``); skips (fails under CI) without ``trustme``."""
    require("trustme", trustme_available(), "pip install -e '.[test]'")
    return write_tls_files(tmp_path_factory.mktemp("tls"))
