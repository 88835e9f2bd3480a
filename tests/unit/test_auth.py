"""sseserver.web.auth without sockets: where a token is taken from, which tokens are accepted
(HS256 secret; RS256/ES256 public key as PEM text or a path) and which are refused (401
with ``WWW-Authenticate``), and how Mercure claims are read. Keys are generated here."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sseserver.http.request import Request
from sseserver.web.auth import LEEWAY_S, Authenticator, Claims, token_from
from sseserver.wire.errors import HTTPError
from tests.support.jwt_keys import b64url, public_pem

SECRET = "unit-test-secret-that-is-long-enough-for-hs256"


def _unsigned(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(payload).encode())


def _hs256_with(key: bytes, payload: dict[str, Any]) -> str:
    """An HS256 token made by hand (PyJWT refuses a PEM as an HMAC key when encoding)."""
    signing_input = _unsigned({"alg": "HS256", "typ": "JWT"}, payload)
    sig = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64url(sig)


def _request(
    headers: list[tuple[str, str]] = (),  # type: ignore[assignment]
    query: str = "",
) -> Request:
    return Request(
        method="GET",
        target="/v1/stream" + ("?" + query if query else ""),
        path="/v1/stream",
        query_string=query,
        headers=[(k.lower().encode(), v.encode("latin-1")) for k, v in headers],
        http_version="1.1",
    )


def _refused(auth: Authenticator, token: str) -> HTTPError:
    with pytest.raises(HTTPError) as info:
        auth.decode(token)
    exc = info.value
    assert exc.status == 401
    assert ("WWW-Authenticate", 'Bearer realm="sseserver"') in exc.headers
    return exc


# --------------------------------------------------------------------------------------
# Where the token comes from
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "query", "expected"),
    [
        ([("Authorization", "Bearer abc")], "", "abc"),
        ([("Authorization", "bearer abc")], "", "abc"),
        ([("Authorization", "BEARER   abc  ")], "", "abc"),
        ([("Cookie", "sseserver_token=abc")], "", "abc"),
        ([("Cookie", "mercureAuthorization=abc")], "", "abc"),
        ([("Cookie", "theme=dark; sseserver_token=abc; x=1")], "", "abc"),
        ([], "access_token=abc", "abc"),
        ([], "q=hi&access_token=abc&x=1", "abc"),
        # Precedence: header, then cookie, then query.
        ([("Authorization", "Bearer h"), ("Cookie", "sseserver_token=c")], "access_token=q", "h"),
        ([("Cookie", "sseserver_token=c")], "access_token=q", "c"),
        ([("Cookie", "sseserver_token=a; mercureAuthorization=b")], "", "a"),
        # Not bearer tokens: fall through to the next source.
        ([("Authorization", "Basic dXNlcjpwYXNz")], "access_token=q", "q"),
        ([("Authorization", "Bearer ")], "access_token=q", "q"),
        ([("Authorization", "Bearer")], "", None),
        ([("Cookie", "sseserver_token=")], "", None),
        ([("Cookie", "other=abc")], "", None),
        ([("Cookie", '=;;==garbage"')], "access_token=q", "q"),
        ([], "access_token=", None),
        ([], "", None),
    ],
)
def test_token_from(headers: list[tuple[str, str]], query: str, expected: str | None) -> None:
    assert token_from(_request(headers, query)) == expected


# --------------------------------------------------------------------------------------
# HS256
# --------------------------------------------------------------------------------------


def test_auth_off() -> None:
    auth = Authenticator()
    assert not auth.enabled
    assert auth.authenticate(_request()) is None
    assert auth.authenticate(_request([("Authorization", "Bearer garbage")])) is None


def test_hs256_accepts_and_reads_claims() -> None:
    auth = Authenticator(secret=SECRET)
    exp = int(time.time()) + 60
    token = jwt.encode(
        {"sub": "alice", "exp": exp, "mercure": {"subscribe": ["a", "b/{id}"], "publish": "a"}},
        SECRET,
        algorithm="HS256",
    )
    claims = auth.authenticate(_request([("Authorization", f"Bearer {token}")]))
    assert isinstance(claims, Claims)
    assert claims.subject == "alice"
    assert claims.subscribe == ("a", "b/{id}")
    assert claims.publish == ("a",)
    assert claims.expires_at == exp


def test_claims_absent_or_odd() -> None:
    auth = Authenticator(secret=SECRET)
    claims = auth.decode(jwt.encode({}, SECRET, algorithm="HS256"))
    assert (claims.subject, claims.publish, claims.subscribe, claims.expires_at) == (
        None,
        None,
        None,
        None,
    )
    claims = auth.decode(jwt.encode({"sub": "s", "mercure": {"subscribe": [1, 2]}}, SECRET))
    assert claims.subscribe == ()  # not a list of strings: grants nothing
    _refused(auth, jwt.encode({"sub": 42}, SECRET))  # RFC 7519: sub is a string
    claims = auth.decode(jwt.encode({"mercure": "everything"}, SECRET))
    assert claims.subscribe is None and claims.publish is None


def test_missing_token_401_when_required() -> None:
    auth = Authenticator(secret=SECRET)
    with pytest.raises(HTTPError) as info:
        auth.authenticate(_request())
    assert info.value.status == 401
    assert ("WWW-Authenticate", 'Bearer realm="sseserver"') in info.value.headers
    assert auth.authenticate(_request(), required=False) is None


def test_bad_token_401_even_when_not_required() -> None:
    auth = Authenticator(secret=SECRET)
    with pytest.raises(HTTPError):
        auth.authenticate(_request([("Authorization", "Bearer nope")]), required=False)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b.c",
        "a.b",
        "....",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.",  # signature stripped
        "x" * 5000,
    ],
)
def test_malformed_tokens_401(token: str) -> None:
    exc = _refused(Authenticator(secret=SECRET), token)
    assert len(exc.message) <= 200


def test_wrong_secret_401() -> None:
    token = jwt.encode({"sub": "x"}, "some-other-secret-that-is-long-enough!!", algorithm="HS256")
    assert _refused(Authenticator(secret=SECRET), token).code == "invalid_token"


def test_tampered_payload_401() -> None:
    token = jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256")
    head, _, sig = token.split(".")
    forged = head + "." + b64url(json.dumps({"sub": "admin"}).encode()) + "." + sig
    _refused(Authenticator(secret=SECRET), forged)


def test_alg_none_401() -> None:
    token = _unsigned({"alg": "none", "typ": "JWT"}, {"sub": "admin"}) + "."
    _refused(Authenticator(secret=SECRET), token)


def test_hs384_not_accepted() -> None:
    token = jwt.encode({"sub": "x"}, SECRET + SECRET, algorithm="HS384")
    _refused(Authenticator(secret=SECRET + SECRET), token)


def test_expiry_and_leeway() -> None:
    auth = Authenticator(secret=SECRET)
    now = int(time.time())
    # Within the leeway: still accepted.
    auth.decode(jwt.encode({"exp": now - (LEEWAY_S - 2)}, SECRET))
    exc = _refused(auth, jwt.encode({"exp": now - (LEEWAY_S + 5)}, SECRET))
    assert exc.code == "token_expired"
    auth.decode(jwt.encode({"nbf": now + (LEEWAY_S - 2)}, SECRET))
    _refused(auth, jwt.encode({"nbf": now + LEEWAY_S + 60}, SECRET))
    _refused(auth, jwt.encode({"exp": "tomorrow"}, SECRET))


def test_audience_and_issuer() -> None:
    auth = Authenticator(secret=SECRET, audience="sse", issuer="https://id.example")
    good = {"aud": "sse", "iss": "https://id.example"}
    auth.decode(jwt.encode(good, SECRET))
    auth.decode(jwt.encode({**good, "aud": ["other", "sse"]}, SECRET))
    _refused(auth, jwt.encode({**good, "aud": "other"}, SECRET))
    _refused(auth, jwt.encode({**good, "iss": "https://evil.example"}, SECRET))
    _refused(auth, jwt.encode({"iss": "https://id.example"}, SECRET))  # aud missing
    _refused(auth, jwt.encode({"aud": "sse"}, SECRET))  # iss missing


def test_audience_not_configured_ignores_aud() -> None:
    Authenticator(secret=SECRET).decode(jwt.encode({"aud": "whatever"}, SECRET))


# --------------------------------------------------------------------------------------
# RS256 / ES256
# --------------------------------------------------------------------------------------


def test_rs256_with_pem_text(rsa_key: rsa.RSAPrivateKey) -> None:
    auth = Authenticator(public_key=public_pem(rsa_key))
    assert auth.enabled
    claims = auth.decode(jwt.encode({"sub": "r"}, rsa_key, algorithm="RS256"))
    assert claims.subject == "r"


def test_es256_with_pem_text(ec_key: ec.EllipticCurvePrivateKey) -> None:
    auth = Authenticator(public_key=public_pem(ec_key))
    claims = auth.decode(jwt.encode({"sub": "e"}, ec_key, algorithm="ES256"))
    assert claims.subject == "e"


def test_public_key_from_a_path(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    path = tmp_path / "key.pem"
    path.write_text(public_pem(ec_key))
    auth = Authenticator(public_key=str(path))
    assert auth.decode(jwt.encode({"sub": "p"}, ec_key, algorithm="ES256")).subject == "p"


def test_public_key_path_missing_fails_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        Authenticator(public_key=str(tmp_path / "nope.pem"))


def test_hs256_signed_with_the_public_key_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    """The classic algorithm confusion: the attacker knows the public key and uses it as
    an HMAC secret."""
    pem = public_pem(rsa_key)
    auth = Authenticator(public_key=pem)
    _refused(auth, _hs256_with(pem.encode(), {"sub": "admin"}))
    _refused(auth, _hs256_with(SECRET.encode(), {"sub": "admin"}))


def test_rs256_from_another_key_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    auth = Authenticator(public_key=public_pem(rsa_key))
    _refused(auth, jwt.encode({"sub": "x"}, other, algorithm="RS256"))


def test_es256_token_against_an_rsa_key_refused(
    rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    auth = Authenticator(public_key=public_pem(rsa_key))
    _refused(auth, jwt.encode({"sub": "x"}, ec_key, algorithm="ES256"))


def test_alg_none_refused_with_a_public_key(rsa_key: rsa.RSAPrivateKey) -> None:
    auth = Authenticator(public_key=public_pem(rsa_key))
    _refused(auth, _unsigned({"alg": "none"}, {"sub": "admin"}) + ".")


def test_asymmetric_token_refused_by_a_secret(rsa_key: rsa.RSAPrivateKey) -> None:
    auth = Authenticator(secret=SECRET)
    _refused(auth, jwt.encode({"sub": "x"}, rsa_key, algorithm="RS256"))
