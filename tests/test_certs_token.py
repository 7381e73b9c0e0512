"""Join tokens: cloudcore's format, HS256 with the CA key, refreshed on the reactor's clock."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cloudhub.certs.authority import CertificateAuthority
from cloudhub.certs.token import (
    TokenIssuer,
    issue_token,
    make_token,
    split_token,
    verify_jwt,
)
from cloudhub.errors import CertificateError, TokenError
from tests.helpers_tls import CLOUDCORE_JWT_HEADER, make_config

HOUR = 3600
START = 1_800_000_000.0


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def go_style_token(key: bytes, claims: Any, header: bytes | None = None) -> str:
    """A compact JWS built by hand, as golang-jwt would, independent of PyJWT."""
    header = header or b'{"alg":"HS256","typ":"JWT"}'
    signing_input = f"{b64(header)}.{b64(json.dumps(claims).encode())}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


class TokenTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.config = make_config(self.mktemp())
        self.authority = CertificateAuthority.load_or_create(self.config)
        self.clock = Clock()
        self.clock.advance(START)
        self.issuer = TokenIssuer(self.authority, 12, self.clock)

    def jwt_of(self, token: str) -> str:
        return split_token(token)[1]

    def test_format(self) -> None:
        token = self.issuer.current
        parts = token.split(".")
        self.assertEqual(len(parts), 4)
        self.assertEqual(parts[0], hashlib.sha256(self.authority.ca_der).hexdigest())
        self.assertEqual(parts[1], CLOUDCORE_JWT_HEADER)
        header = jwt.get_unverified_header(self.jwt_of(token))
        self.assertEqual(header, {"alg": "HS256", "typ": "JWT"})
        claims = jwt.decode(self.jwt_of(token), options={"verify_signature": False})
        # The only claim is exp = issue time + 2 x tokenRefreshDuration.
        self.assertEqual(claims, {"exp": int(START) + 24 * HOUR})

    def test_verify_good(self) -> None:
        self.assertEqual(
            self.issuer.verify(self.jwt_of(self.issuer.current)), {"exp": int(START) + 24 * HOUR}
        )

    def test_cloudcore_token_verifies(self) -> None:
        """A token signed elsewhere with the same CA key DER (as cloudcore does) is accepted."""
        token = go_style_token(self.authority.ca_key_der, {"exp": int(START) + 60})
        self.issuer.verify(token)

    def test_refresh_on_timer(self) -> None:
        first = self.issuer.current
        self.issuer.startService()
        self.clock.advance(12 * HOUR - 1)
        self.assertEqual(self.issuer.current, first)
        self.clock.advance(1)
        second = self.issuer.current
        self.assertNotEqual(second, first)
        claims = jwt.decode(self.jwt_of(second), options={"verify_signature": False})
        self.assertEqual(claims["exp"], int(START) + 36 * HOUR)
        # The earlier token is still good until its own exp.
        self.issuer.verify(self.jwt_of(first))
        self.clock.advance(12 * HOUR - 1)
        self.issuer.verify(self.jwt_of(first))
        self.clock.advance(1)
        self.assertRaises(TokenError, self.issuer.verify, self.jwt_of(first))
        self.issuer.verify(self.jwt_of(second))
        self.issuer.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        third = self.issuer.current
        self.clock.advance(100 * HOUR)
        self.assertEqual(self.issuer.current, third)

    def test_expired(self) -> None:
        token = self.jwt_of(self.issuer.current)
        self.clock.advance(24 * HOUR)
        e = self.assertRaises(TokenError, self.issuer.verify, token)
        self.assertIn("expired", str(e))

    def test_not_before_and_issued_at(self) -> None:
        key = self.authority.ca_key_der
        for claims in (
            {"exp": START + 60, "nbf": START + 30},
            {"exp": START + 60, "iat": START + 30},
        ):
            self.assertRaises(TokenError, self.issuer.verify, go_style_token(key, claims))
        self.issuer.verify(go_style_token(key, {"exp": START + 60, "nbf": START, "iat": START}))

    def test_forged(self) -> None:
        key = self.authority.ca_key_der
        exp = int(START) + HOUR
        good = jwt.encode({"exp": exp}, key, algorithm="HS256")
        header, payload, signature = good.split(".")
        other_key = CertificateAuthority.load_or_create(make_config(self.mktemp())).ca_key_der
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ec_key = ec.generate_private_key(ec.SECP256R1())
        none = b64(b'{"alg":"none","typ":"JWT"}')
        forged = {
            "alg none": f"{none}.{payload}.",
            "alg none, signature kept": f"{none}.{payload}.{signature}",
            "HS512, same key": jwt.encode({"exp": exp}, key, algorithm="HS512"),
            "HS384, same key": jwt.encode({"exp": exp}, key, algorithm="HS384"),
            "RS256": jwt.encode({"exp": exp}, rsa_key, algorithm="RS256"),
            "ES256": jwt.encode({"exp": exp}, ec_key, algorithm="ES256"),
            "wrong key": jwt.encode({"exp": exp}, other_key, algorithm="HS256"),
            "tampered payload": f"{header}.{b64(json.dumps({'exp': exp + 10**6}).encode())}"
            f".{signature}",
            "tampered signature": f"{header}.{payload}.{signature[:-2]}AA",
            "no exp": go_style_token(key, {"sub": "x"}),
            "exp not a number": go_style_token(key, {"exp": "tomorrow"}),
            "exp a boolean": go_style_token(key, {"exp": True}),
            "empty": "",
            "one part": "abc",
            "two parts": "abc.def",
            "garbage parts": "a.b.c",
            "not base64": "@@@.###.$$$",
            "not JSON": f"{b64(b'not json')}.{payload}.{signature}",
            "claims not an object": go_style_token(key, [1, 2]),
            "whole join token": self.issuer.current,
            "non-ASCII": "é.é.é",
        }
        accepted = []
        for name, token in forged.items():
            try:
                self.issuer.verify(token)
            except TokenError:
                continue
            accepted.append(name)
        self.assertEqual(accepted, [])
        self.issuer.verify(good)

    def test_restart_keeps_tokens_valid(self) -> None:
        token = self.jwt_of(self.issuer.current)
        restarted = CertificateAuthority.load_or_create(self.config)
        clock = Clock()
        clock.advance(START + 23 * HOUR)
        TokenIssuer(restarted, 12, clock).verify(token)

    def test_issue_token_for_cli(self) -> None:
        token = issue_token(self.config)
        ca_hash, signed = split_token(token)
        self.assertEqual(ca_hash, self.authority.ca_hash)
        claims = verify_jwt(self.authority, signed, time.time())
        self.assertLess(abs(claims["exp"] - (time.time() + 24 * HOUR)), 5)

    def test_issue_token_needs_a_ca(self) -> None:
        """``cloudhub token`` only reads: no CA is an error, and nothing is created."""
        config = make_config(self.mktemp())
        e = self.assertRaises(CertificateError, issue_token, config)
        self.assertIn("no CA yet", str(e))
        self.assertIn("cloudhub init", str(e))
        self.assertFalse(os.path.exists(config.hub.data_dir))

    def test_issue_token_needs_only_the_ca(self) -> None:
        """No server pair (or a stale one) does not matter: the token key is the CA key."""
        for name in ("server.crt", "server.key"):
            os.unlink(self.config.data_path("certs", name))
        token = issue_token(self.config)
        self.assertEqual(split_token(token)[0], self.authority.ca_hash)
        verify_jwt(self.authority, split_token(token)[1], time.time())
        self.assertEqual(os.listdir(self.config.data_path("certs")), [])

    def test_root_ca_tokens_are_the_authoritys(self) -> None:
        """A token made from the CA alone verifies with the whole authority, and back."""
        root = CertificateAuthority.load_ca(self.config)
        self.assertEqual(root.ca_hash, self.authority.ca_hash)
        token = make_token(root, START, 90)
        self.assertEqual(split_token(token)[0], self.authority.ca_hash)
        verify_jwt(self.authority, split_token(token)[1], START)
        verify_jwt(root, self.jwt_of(self.issuer.current), START)

    def test_make_token_lifetime(self) -> None:
        token = make_token(self.authority, START, 90)
        claims = verify_jwt(self.authority, split_token(token)[1], START + 89)
        self.assertEqual(claims["exp"], int(START) + 90)
        self.assertRaises(TokenError, verify_jwt, self.authority, split_token(token)[1], START + 90)

    def test_split_token(self) -> None:
        for bad in ("abc.def", "a.b.c", "a.b.c.d.e", "", "....", "a..c.d"):
            e = self.assertRaises(TokenError, split_token, bad)
            self.assertIn("wrong format", str(e))
        self.assertEqual(split_token("h.a.b.c"), ("h", "a.b.c"))
