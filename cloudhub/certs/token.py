"""Join tokens: ``<sha256 hex of the CA DER>.<HS256 JWT>`` keyed with the CA key (§5.4).

The JWT's only claim is ``exp``. The HMAC key is the CA key's DER exactly as cloudcore holds it
(:attr:`CertificateAuthority.ca_key_der`), so tokens cloudcore issued for the same CA verify
here and the other way round. Verification checks the signature and the expiry only: a token
stays valid until its own ``exp``, across refreshes and hub restarts.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import jwt
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from cloudhub.certs.authority import CertificateAuthority
from cloudhub.config import HubConfig
from cloudhub.errors import TokenError

log = Logger()

ALGORITHM = "HS256"
HOUR = 3600


class TokenKey(Protocol):
    """What tokens need of a CA: its hash and its key DER.

    A :class:`CertificateAuthority`, or the CA alone as ``cloudhub token`` reads it
    (:class:`~cloudhub.certs.authority.RootCA`): no server certificate is involved.
    """

    @property
    def ca_hash(self) -> str: ...

    @property
    def ca_key_der(self) -> bytes: ...


def make_token(authority: TokenKey, now: float, lifetime: float) -> str:
    """A join token for ``authority`` that expires ``lifetime`` seconds after ``now``."""
    # Go's StandardClaims.ExpiresAt is whole seconds.
    signed = jwt.encode({"exp": int(now + lifetime)}, authority.ca_key_der, algorithm=ALGORITHM)
    return f"{authority.ca_hash}.{signed}"


def split_token(token: str) -> tuple[str, str]:
    """``(ca_hash, jwt)`` of a join token; :class:`TokenError` unless it has 4 dot-parts."""
    parts = token.strip().split(".")
    if len(parts) != 4 or not all(parts):
        raise TokenError(
            "token credentials are in the wrong format: expected "
            "<ca-hash>.<jwt-header>.<jwt-payload>.<jwt-signature>"
        )
    return parts[0], ".".join(parts[1:])


def verify_jwt(authority: TokenKey, token: str, now: float) -> dict[str, Any]:
    """The claims of ``token`` (a compact JWS) if signed with the CA key and not expired.

    Only HS256 is accepted (``alg: none`` and every other algorithm fail). ``exp`` is
    required; ``nbf`` and ``iat`` are checked when present, like cloudcore's jwt library.
    Time comes from ``now`` (the reactor's clock), not from the wall clock, so that
    tests can move it. Any problem raises :class:`TokenError` with the reason.
    """
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            authority.ca_key_der,
            algorithms=[ALGORITHM],
            options={
                "require": ["exp"],
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
            },
        )
    except jwt.InvalidTokenError as e:
        raise TokenError(f"invalid token: {e}") from None
    except (ValueError, TypeError) as e:  # belt and braces: never let bad input escape
        raise TokenError(f"invalid token: {e}") from None
    exp = _number(claims, "exp")
    if exp is None or now >= exp:
        raise TokenError("invalid token: the token has expired")
    nbf = _number(claims, "nbf")
    if nbf is not None and now < nbf:
        raise TokenError("invalid token: the token is not valid yet")
    iat = _number(claims, "iat")
    if iat is not None and now < iat:
        raise TokenError("invalid token: the token was issued in the future")
    return claims


def _number(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TokenError(f"invalid token: claim {name!r} must be a number")
    return float(value)


class TokenIssuer(Service):
    """Issues a join token now and a new one every ``refresh_hours`` while running.

    Each token expires 2 × ``refresh_hours`` after it was issued (§5.4), so the current one
    always has at least ``refresh_hours`` left. :attr:`current` is the token to hand out;
    :meth:`verify` accepts any unexpired token of the same CA, not only the current one.
    """

    def __init__(
        self, authority: CertificateAuthority, refresh_hours: int, reactor: IReactorTime
    ) -> None:
        self.setName("tokens")
        self.authority = authority
        self.refresh_seconds = refresh_hours * HOUR
        self.reactor = reactor
        self._loop: LoopingCall | None = None
        self.current = self._issue()

    def _issue(self) -> str:
        return make_token(self.authority, self.reactor.seconds(), 2 * self.refresh_seconds)

    def refresh(self) -> str:
        """Replace :attr:`current` with a new token and return it."""
        self.current = self._issue()
        log.info(
            "issued a new join token, valid for {hours} hours",
            hours=2 * self.refresh_seconds // HOUR,
        )
        return self.current

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.refresh)
        self._loop.clock = self.reactor
        self._loop.start(self.refresh_seconds, now=False).addErrback(
            lambda f: log.failure("join token refresh stopped", f)
        )

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def verify(self, token: str) -> dict[str, Any]:
        """The claims of the JWT ``token`` (parts 1-3 of a join token); see :func:`verify_jwt`."""
        return verify_jwt(self.authority, token, self.reactor.seconds())


def issue_token(config: HubConfig) -> str:
    """A fresh join token for the hub configured by ``config`` (``cloudhub token``).

    Only reads: the CA where the hub finds it (:meth:`CertificateAuthority.load_ca`), and
    nothing else, since the token key is the CA key. No CA yet raises
    :class:`~cloudhub.errors.CertificateError` saying to start the hub or run
    ``cloudhub init``. The token is valid for 2 × ``tokenRefreshDuration`` hours from now; a
    running hub on the same CA accepts it.
    """
    authority = CertificateAuthority.load_ca(config)
    lifetime = 2 * config.cloudhub.token_refresh_duration * HOUR
    return make_token(authority, time.time(), lifetime)
