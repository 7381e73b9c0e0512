"""The hub's CA and server certificate, and the signing of edge certificates (§4.2, §5).

The CA and the server certificate are taken from the configured files (``tlsCAFile`` and
friends) when they exist, as cloudcore does. When they do not, the hub creates them once, the
way cloudcore creates its secrets, and keeps them under ``hub.dataDir``
(``ca/rootCA.{crt,key}``, ``certs/server.{crt,key}``), so a restart finds the same CA, the same
server certificate, and the join tokens it issued still verify (the token key is the CA key).

The tools read the same files without creating any (:meth:`CertificateAuthority.load`,
:meth:`CertificateAuthority.load_ca`); only the hub and ``cloudhub init`` create them.

Creation is safe when several hub processes start at once on one data directory: it happens
under an exclusive ``flock`` on ``<dataDir>/.certs.lock``, a new pair is published by renaming a
complete temporary directory into place, and every process then reads what is on disk.
"""

from __future__ import annotations

import base64
import binascii
import errno
import fcntl
import ipaddress
import os
import re
import secrets
import shlex
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL.crypto import X509
from twisted.logger import Logger

from cloudhub.certs.identity import node_uri
from cloudhub.config import HubConfig
from cloudhub.errors import CertificateError
from cloudhub.nodeid import validate_node_id

log = Logger()

Clock = Callable[[], datetime]
SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# §4.2: cloudcore's CA lives 100 years, its server certificate 36500 days.
CA_VALIDITY = timedelta(days=36500)
SERVER_VALIDITY = timedelta(days=36500)
COMMON_NAME = "KubeEdge"
# IP SANs of the server certificate when advertiseAddress is empty.
LOOPBACK_ADDRESSES = ("127.0.0.1", "::1")

# Keys an edge certificate may carry (issue 18): what edgecore generates (ECDSA P-256) and
# the strong alternatives; RSA under 2048 bits and other curves (secp256k1, P-224, P-521,
# Brainpool: not what Go's crypto/tls offers for client certificates) are refused.
MIN_RSA_BITS = 2048
ALLOWED_CURVES = ("secp256r1", "secp384r1")
_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384"}


def _weak_key(public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> str | None:
    """Why ``public_key`` is too weak to certify, naming it; None when it is acceptable."""
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            return f"RSA-{public_key.key_size} (RSA keys need at least {MIN_RSA_BITS} bits)"
        return None
    name = public_key.curve.name
    if name not in ALLOWED_CURVES:
        allowed = " or ".join(_CURVE_NAMES[c] for c in ALLOWED_CURVES)
        return f"ECDSA on curve {name} (only {allowed})"
    return None


# Go's x509.ExtKeyUsage numbers, as sent in the ExtKeyUsages header (§5.2).
GO_EXT_KEY_USAGES = {
    1: ExtendedKeyUsageOID.SERVER_AUTH,
    2: ExtendedKeyUsageOID.CLIENT_AUTH,
}

KEY_MODE = 0o600
CERT_MODE = 0o644
LOCK_NAME = ".certs.lock"


def utc_now() -> datetime:
    return datetime.now(UTC)


def random_serial() -> int:
    """A serial in [1, 2^63), as Go's ``rand.Int(rand.Reader, MaxInt64)`` (never 0, RFC 5280)."""
    return secrets.randbelow(2**63 - 1) + 1


# --- files -----------------------------------------------------------------------------------


def write_atomically(path: str, data: bytes, mode: int = CERT_MODE) -> None:
    """Replace ``path`` with ``data`` so a reader sees the old file or the new one, never half.

    Temp file in the same directory, fsync, rename, fsync of the directory.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _create_files_once(directory: str, files: dict[str, tuple[bytes, int]]) -> bool:
    """Publish all ``files`` in ``directory`` together, unless someone else already did.

    The files are written into a temporary sibling directory which is then renamed onto
    ``directory`` (allowed while that one is missing or empty), so no reader ever sees a key
    without its certificate. If ``directory`` already holds other files, each file is
    hard-linked in, which fails instead of overwriting. Returns False when another process
    got there first; the caller then reads the winner's files.
    """
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
    try:
        for name, (data, mode) in files.items():
            path = os.path.join(tmp, name)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(fd, "wb") as stream:
                stream.write(data)
                stream.flush()
                os.fsync(stream.fileno())
        _fsync_directory(tmp)
        try:
            os.rename(tmp, directory)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
        else:
            os.chmod(directory, 0o755)
            _fsync_directory(parent)
            return True
        if not os.path.isdir(directory):
            raise CertificateError(f"{directory}: exists and is not a directory")
        linked = []
        try:
            for name in files:
                os.link(os.path.join(tmp, name), os.path.join(directory, name))
                linked.append(name)
        except FileExistsError:
            if linked:
                raise CertificateError(
                    f"{os.path.join(directory, name)}: appeared while creating it; "
                    "another process is writing certificates here"
                ) from None
            return False
        _fsync_directory(directory)
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _DirectoryLock:
    """An exclusive ``flock`` held across load-or-create, shared by every hub on the dataDir."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> _DirectoryLock:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


# --- PEM -------------------------------------------------------------------------------------

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL)


def pem_block(data: bytes, where: str) -> tuple[str, bytes]:
    """The type and DER of the first PEM block in ``data``, as Go's ``pem.Decode`` reads it.

    The CA key's DER is the token's HMAC key (§5.4), so it is taken exactly as the block holds
    it, not re-encoded.
    """
    match = _PEM_BLOCK.search(data)
    if match is None:
        raise CertificateError(f"{where}: no PEM block found")
    kind = match.group(1).decode("ascii")
    body = match.group(2)
    if b":" in body:
        raise CertificateError(
            f"{where}: PEM block {kind!r} has headers (an encrypted key?); "
            "only unencrypted keys are supported"
        )
    try:
        der = base64.b64decode(b"".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        raise CertificateError(f"{where}: PEM block {kind!r} is not valid base64") from None
    return kind, der


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as stream:
            return stream.read()
    except OSError as e:
        raise CertificateError(f"{path}: cannot read: {e.strerror or e}") from None


def _load_certificate(path: str) -> x509.Certificate:
    data = _read(path)
    kind, der = pem_block(data, path)
    if kind != "CERTIFICATE":
        raise CertificateError(f"{path}: expected a CERTIFICATE PEM block, found {kind!r}")
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as e:
        raise CertificateError(f"{path}: not a valid certificate: {e}") from None


def _load_key(path: str) -> tuple[SigningKey, bytes]:
    """The private key in ``path`` and the DER its PEM block holds."""
    _, der = pem_block(_read(path), path)
    try:
        key = serialization.load_der_private_key(der, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise CertificateError(f"{path}: not a usable private key: {e}") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise CertificateError(
            f"{path}: {type(key).__name__} keys are not supported (use ECDSA or RSA)"
        )
    return key, der


def _exists(path: str) -> bool:
    """Whether ``path`` exists; a directory we may not look into is an error, not "no"."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM):
            raise CertificateError(f"{path}: cannot look for it: {e.strerror}") from None
        return False
    return True


def _pair_state(cert_path: str, key_path: str) -> bool:
    """True when both files exist, False when neither; only one is an error naming the other."""
    has_cert = _exists(cert_path)
    has_key = _exists(key_path)
    if has_cert != has_key:
        present, missing = (cert_path, key_path) if has_cert else (key_path, cert_path)
        raise CertificateError(f"{missing}: missing, but its pair {present} exists")
    return has_cert


def _spki(public: PublicKeyTypes) -> bytes:
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _key_matches(cert: x509.Certificate, key: SigningKey) -> bool:
    return _spki(cert.public_key()) == _spki(key.public_key())


def _key_pem(key: SigningKey) -> bytes:
    # SEC1 "EC PRIVATE KEY" (or PKCS#1) as cloudcore writes it; its DER is the HMAC key (§5.4).
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# --- building certificates -------------------------------------------------------------------


def _name(common_name: str | None, organizations: Iterable[str] = ()) -> x509.Name:
    # Go's pkix.Name order: O before CN (§5.2 copies only these two).
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
    if common_name:
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def _generate_ca(now: datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A CA like cloudcore's (§4.2): P-256, CN KubeEdge, 100 years, CertSign, IsCA."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(COMMON_NAME)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(now)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=True,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _authority_key_identifier(ca: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca.public_key()  # type: ignore[arg-type]
        )
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


@dataclass(frozen=True)
class ServerNames:
    """The SANs the server certificate must carry: edges check them (§4.2, failure mode D3)."""

    dns: frozenset[str]
    ips: frozenset[IPAddress]

    @classmethod
    def from_config(cls, config: HubConfig) -> ServerNames:
        addresses = config.cloudhub.advertise_address or list(LOOPBACK_ADDRESSES)
        return cls(
            dns=frozenset(name for name in config.cloudhub.dns_names if name),
            ips=frozenset(ipaddress.ip_address(a) for a in addresses),
        )

    def missing_from(self, cert: x509.Certificate) -> list[str]:
        """The configured names ``cert`` lacks, as text for the log."""
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            dns = set(san.get_values_for_type(x509.DNSName))
            ips = set(san.get_values_for_type(x509.IPAddress))
        except x509.ExtensionNotFound:
            dns, ips = set(), set()
        return sorted(self.dns - dns) + sorted(str(ip) for ip in self.ips - ips)


def _generate_server(
    ca: x509.Certificate, ca_key: SigningKey, names: ServerNames, now: datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The hub's TLS certificate (§4.2): P-256, CN/O KubeEdge, ServerAuth, configured SANs."""
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in sorted(names.dns)]
    sans += [x509.IPAddress(ip) for ip in sorted(names.ips, key=str)]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(COMMON_NAME, [COMMON_NAME]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(now)
        .not_valid_after(now + SERVER_VALIDITY)
        .add_extension(_leaf_key_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_authority_key_identifier(ca), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether ``ca``'s key signed ``cert`` (the only chain we issue is one level deep)."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def certificate_names(cert: x509.Certificate) -> list[str]:
    """The DNS names, then the IP addresses, in ``cert``'s subjectAltName (for people)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    dns = sorted(san.get_values_for_type(x509.DNSName))
    return dns + sorted(str(ip) for ip in san.get_values_for_type(x509.IPAddress))


def _check_ca(cert: x509.Certificate, path: str, now: datetime) -> None:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = constraints.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        log.warn("{path}: the CA certificate is not marked as a CA (IsCA)", path=path)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        log.warn(
            "{path}: the CA certificate is outside its validity ({start} to {end})",
            path=path,
            start=cert.not_valid_before_utc.isoformat(),
            end=cert.not_valid_after_utc.isoformat(),
        )


def _server_problem(
    cert: x509.Certificate,
    key: SigningKey,
    ca: x509.Certificate,
    names: ServerNames,
    now: datetime,
) -> str | None:
    if not _key_matches(cert, key):
        return "its key file holds another key"
    if cert.issuer != ca.subject or not issued_by(cert, ca):
        return "it is not signed by the CA"
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        return "it is expired or not yet valid"
    missing = names.missing_from(cert)
    if missing:
        return f"it lacks the configured names {', '.join(missing)}"
    return None


# --- finding what is on disk (read-only) -----------------------------------------------------
#
# The hub, `cloudhub init`, `cloudhub token` and `cloudhub check-config` all look in the same
# places in the same order, so the tools see exactly the files the hub serves.


def ca_candidates(config: HubConfig) -> list[tuple[str, str]]:
    """Where the CA pair is looked for, in order: tlsCAFile/tlsCAKeyFile, then ours in dataDir.

    The last one is where the hub creates a CA when there is none.
    """
    hub = config.cloudhub
    configured = (hub.tls_ca_file, hub.tls_ca_key_file)
    ours = (config.data_path("ca", "rootCA.crt"), config.data_path("ca", "rootCA.key"))
    return [configured] if ours == configured else [configured, ours]


def server_candidates(config: HubConfig) -> list[tuple[str, str]]:
    """Where the server pair is looked for, in order: tlsCertFile/tlsPrivateKeyFile, then ours.

    The last one is where the hub creates (or replaces) its server certificate.
    """
    hub = config.cloudhub
    configured = (hub.tls_cert_file, hub.tls_private_key_file)
    ours = (config.data_path("certs", "server.crt"), config.data_path("certs", "server.key"))
    return [configured] if ours == configured else [configured, ours]


def find_ca(config: HubConfig) -> tuple[str, str] | None:
    """The (certificate, key) paths of the CA the hub would use, or None when there is none yet.

    Only looks, creates nothing. Raises :class:`CertificateError` when one file of a pair
    exists without the other: the hub refuses to start then, rather than make a second CA.
    """
    for pair in ca_candidates(config):
        if _pair_state(*pair):
            return pair
    return None


@dataclass(frozen=True)
class RootCA:
    """The CA certificate and key as read from disk: all a join token needs (§5.4)."""

    certificate: x509.Certificate
    key: SigningKey
    key_der: bytes
    path: str
    key_path: str

    @classmethod
    def read(cls, cert_path: str, key_path: str, now: datetime) -> RootCA:
        """Load a CA pair; :class:`CertificateError` naming the file if unusable or mismatched."""
        cert = _load_certificate(cert_path)
        key, der = _load_key(key_path)
        if not _key_matches(cert, key):
            raise CertificateError(
                f"{key_path}: this key does not belong to the CA certificate {cert_path}"
            )
        _check_ca(cert, cert_path, now)
        return cls(cert, key, der, cert_path, key_path)

    @property
    def ca_der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)

    @property
    def ca_hash(self) -> str:
        """Lowercase hex SHA-256 of the CA DER: the first part of a join token (§5.4)."""
        return self.certificate.fingerprint(hashes.SHA256()).hex()

    @property
    def ca_key_der(self) -> bytes:
        """The join tokens' HMAC key (see :attr:`CertificateAuthority.ca_key_der`)."""
        return self.key_der


@dataclass(frozen=True)
class ServerPair:
    """A usable server certificate and key found on disk, and where."""

    path: str
    key_path: str
    certificate: x509.Certificate
    key: SigningKey


def find_server_pair(
    config: HubConfig, ca: x509.Certificate, now: datetime
) -> tuple[ServerPair | None, list[tuple[str, str]]]:
    """The server pair the hub would serve with ``ca``, read-only: the first usable candidate.

    Also returns ``(path, problem)`` for each pair before it that exists but is not usable
    (another CA's, expired, lacking a configured name ...): the hub leaves those alone and
    makes its own under dataDir. Half a pair or an unreadable file raises
    :class:`CertificateError`, as at start-up.
    """
    names = ServerNames.from_config(config)
    rejected: list[tuple[str, str]] = []
    for cert_path, key_path in server_candidates(config):
        if not _pair_state(cert_path, key_path):
            continue
        cert = _load_certificate(cert_path)
        key, _ = _load_key(key_path)
        problem = _server_problem(cert, key, ca, names, now)
        if problem is None:
            return ServerPair(cert_path, key_path, cert, key), rejected
        rejected.append((cert_path, problem))
    return None, rejected


def _how_to_create(config: HubConfig, directory: str) -> str:
    """The end of a "not there yet" error: what creates the files, and where."""
    if config.path == "<defaults>":
        init = "cloudhub init"
    elif config.path.startswith("<"):
        init = "cloudhub init --config FILE"
    else:
        init = f"cloudhub init --config {shlex.quote(config.path)}"
    return f"start the hub once (it creates one in {directory}) or run `{init}`"


def _no_ca_message(config: HubConfig) -> str:
    candidates = ca_candidates(config)
    (cert, key), *ours = candidates
    looked = f"cloudHub.tlsCAFile {cert} with tlsCAKeyFile {key}"
    if ours:
        looked += f", then {ours[0][0]} with {ours[0][1]}"
    directory = os.path.dirname(candidates[-1][0])
    return f"no CA yet (looked for {looked}): {_how_to_create(config, directory)}"


# --- the authority ---------------------------------------------------------------------------


class CertificateAuthority:
    """The CA that signs edge certificates, and the hub's own server certificate.

    The hub builds it with :meth:`load_or_create`; the tools read it with :meth:`load`, or
    take the CA alone with :meth:`load_ca`. ``clock`` (returns an aware UTC datetime) decides
    "now" for signing and for checking client certificates, so tests can move time.
    """

    def __init__(
        self,
        ca_certificate: x509.Certificate,
        ca_key: SigningKey,
        ca_key_der: bytes,
        server_certificate: x509.Certificate,
        server_key: SigningKey,
        signing_days: int = 365,
        clock: Clock = utc_now,
    ) -> None:
        if not _key_matches(ca_certificate, ca_key):
            raise CertificateError("the CA key does not belong to the CA certificate")
        if not _key_matches(server_certificate, server_key):
            raise CertificateError("the server key does not belong to the server certificate")
        self.ca_certificate = ca_certificate
        self._ca_key = ca_key
        self._ca_key_der = ca_key_der
        self.server_certificate = server_certificate
        self._server_key = server_key
        self.signing_days = signing_days
        self.clock = clock

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def load_or_create(cls, config: HubConfig, clock: Clock = utc_now) -> CertificateAuthority:
        """Load the configured CA and server certificate, or create them under ``dataDir``.

        Raises :class:`CertificateError` naming the file for an unreadable or inconsistent
        file, or when only one file of a certificate/key pair exists.
        """
        try:
            return cls._load_or_create(config, clock)
        except OSError as e:  # permissions, full disk, read-only dataDir ...
            where = e.filename or config.hub.data_dir
            raise CertificateError(f"{where}: {e.strerror or e}") from None

    @classmethod
    def _load_or_create(cls, config: HubConfig, clock: Clock) -> CertificateAuthority:
        with _DirectoryLock(config.data_path(LOCK_NAME)):
            ca_paths = find_ca(config)
            if ca_paths is None:
                ca_paths = ca_candidates(config)[-1]
                cls._create_ca(ca_paths, clock())
            ca = RootCA.read(*ca_paths, clock())
            server_cert, server_key = cls._server_pair(config, ca.certificate, ca.key, clock())
        log.info(
            "certificate authority {subject} from {path}, sha256 {digest}",
            subject=ca.certificate.subject.rfc4514_string(),
            path=ca.path,
            digest=ca.ca_hash,
        )
        return cls(
            ca.certificate,
            ca.key,
            ca.key_der,
            server_cert,
            server_key,
            signing_days=config.cloudhub.edge_cert_signing_duration,
            clock=clock,
        )

    @classmethod
    def load_ca(cls, config: HubConfig, clock: Clock = utc_now) -> RootCA:
        """The hub's CA, read where :meth:`load_or_create` finds it; nothing is created.

        All ``cloudhub token`` needs: a join token is keyed with the CA key alone, so a
        missing or stale server certificate does not stop it. No CA yet raises
        :class:`CertificateError` naming the places looked and what creates one; half a pair,
        an unreadable file or a key of another certificate raise as in :meth:`load_or_create`.
        """
        paths = find_ca(config)
        if paths is None:
            raise CertificateError(_no_ca_message(config))
        return RootCA.read(*paths, clock())

    @classmethod
    def load(cls, config: HubConfig, clock: Clock = utc_now) -> CertificateAuthority:
        """The CA and server certificate :meth:`load_or_create` would use, creating nothing.

        No directory, file or lock file is made, so this is safe as any user and beside a
        running hub. Where :meth:`load_or_create` would create or replace something (no CA,
        no usable server pair) this raises :class:`CertificateError` saying so. A join token
        needs only the CA: see :meth:`load_ca`.
        """
        ca = cls.load_ca(config, clock)
        found, rejected = find_server_pair(config, ca.certificate, clock())
        if found is None:
            candidates = server_candidates(config)
            why = "; ".join(f"{path}: {problem}" for path, problem in rejected)
            if not why:
                why = "no " + " or ".join(cert for cert, _ in candidates)
            directory = os.path.dirname(candidates[-1][0])
            raise CertificateError(
                f"no usable server certificate ({why}): {_how_to_create(config, directory)}"
            )
        return cls(
            ca.certificate,
            ca.key,
            ca.key_der,
            found.certificate,
            found.key,
            signing_days=config.cloudhub.edge_cert_signing_duration,
            clock=clock,
        )

    @staticmethod
    def _create_ca(paths: tuple[str, str], now: datetime) -> None:
        cert, key = _generate_ca(now)
        directory = os.path.dirname(paths[0])
        if os.path.dirname(paths[1]) != directory:  # pragma: no cover - our own layout
            raise CertificateError(f"{paths}: CA files must share a directory")
        created = _create_files_once(
            directory,
            {
                os.path.basename(paths[0]): (_cert_pem(cert), CERT_MODE),
                os.path.basename(paths[1]): (_key_pem(key), KEY_MODE),
            },
        )
        if created:
            log.info("created a new certificate authority in {directory}", directory=directory)

    @classmethod
    def _server_pair(
        cls,
        config: HubConfig,
        ca: x509.Certificate,
        ca_key: SigningKey,
        now: datetime,
    ) -> tuple[x509.Certificate, SigningKey]:
        """The configured server pair if usable, else ours under dataDir, else a new one."""
        found, rejected = find_server_pair(config, ca, now)
        for path, problem in rejected:
            log.warn(
                "{path}: not using this server certificate: {problem}", path=path, problem=problem
            )
        if found is not None:
            return found.certificate, found.key
        names = ServerNames.from_config(config)
        ours = server_candidates(config)[-1]
        cert, new_key = _generate_server(ca, ca_key, names, now)
        cert_pem, key_pem = _cert_pem(cert), _key_pem(new_key)
        directory = os.path.dirname(ours[0])
        files = {"server.crt": (cert_pem, CERT_MODE), "server.key": (key_pem, KEY_MODE)}
        if not _create_files_once(directory, files):
            # Replacing a stale pair: key first; a crash in between leaves a mismatched pair,
            # which the next start detects and replaces again.
            write_atomically(ours[1], key_pem, KEY_MODE)
            write_atomically(ours[0], cert_pem, CERT_MODE)
        log.info(
            "created a server certificate in {directory} for {names}",
            directory=directory,
            names=", ".join(sorted(names.dns) + sorted(str(ip) for ip in names.ips)),
        )
        # Read back what is on disk, so every process serves the same files.
        return _load_certificate(ours[0]), _load_key(ours[1])[0]

    # -- what others read -----------------------------------------------------------------

    @property
    def ca_der(self) -> bytes:
        """The CA certificate in DER: the body of ``GET /ca.crt`` (§5.1)."""
        return self.ca_certificate.public_bytes(serialization.Encoding.DER)

    @property
    def ca_pem(self) -> bytes:
        return _cert_pem(self.ca_certificate)

    @property
    def ca_hash(self) -> str:
        """Lowercase hex SHA-256 of :attr:`ca_der`: the first part of a join token (§5.4)."""
        return self.ca_certificate.fingerprint(hashes.SHA256()).hex()

    @property
    def ca_key_der(self) -> bytes:
        """The join tokens' HMAC key: the CA key DER exactly as cloudcore holds it (§5.4).

        SEC1 ``EC PRIVATE KEY`` DER for a CA we generated; for a CA key file, the DER inside
        its PEM block whatever the format, so tokens cloudcore issued for it verify here.
        """
        return self._ca_key_der

    @property
    def server_cert_pem(self) -> bytes:
        return _cert_pem(self.server_certificate)

    @property
    def server_key_pem(self) -> bytes:
        return _key_pem(self._server_key)

    # -- signing --------------------------------------------------------------------------

    def sign_csr(
        self,
        csr_der: bytes,
        ext_key_usages: Sequence[int] | None = None,
        node_name: str = "",
    ) -> bytes:
        """Sign an edge's DER PKCS#10 CSR as cloudcore does (§5.2); returns the cert DER.

        Only CN and O of the CSR subject are kept (none of its SANs), the CSR's public key;
        the certificate lives ``edgeCertSigningDuration`` days from now. ``ext_key_usages``
        are Go ``x509.ExtKeyUsage`` numbers (1 ServerAuth, 2 ClientAuth); None or empty means
        ClientAuth. Beyond cloudcore, a ``node_name`` is named in the certificate as its one
        SAN, the URI ``urn:cloudhub:node:<node_name>`` (:mod:`cloudhub.certs.identity`); it
        must be a valid node id. Without one the certificate names no node, as cloudcore's.
        A CSR that does not parse, has a bad signature, a weak key (RSA under
        :data:`MIN_RSA_BITS` bits, a curve not in :data:`ALLOWED_CURVES`, anything but ECDSA
        or RSA) or asks for another usage, or an invalid ``node_name``, raises
        :class:`CertificateError` with the reason.
        """
        if node_name:
            problem = validate_node_id(node_name)
            if problem is not None:
                raise CertificateError(f"invalid node name: {problem}")
        who = f" from node {node_name!r}" if node_name else ""
        usages = self._usages(ext_key_usages, who)
        try:
            csr = x509.load_der_x509_csr(csr_der)
        except ValueError as e:
            raise CertificateError(f"the CSR{who} is not a DER PKCS#10 request: {e}") from None
        try:
            signature_ok = csr.is_signature_valid
            public_key = csr.public_key()
        except (ValueError, UnsupportedAlgorithm) as e:
            raise CertificateError(f"the CSR{who} has an unusable public key: {e}") from None
        if not signature_ok:
            raise CertificateError(f"the CSR{who} has an invalid signature")
        if not isinstance(public_key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
            raise CertificateError(
                f"the CSR{who} has a {type(public_key).__name__}; ECDSA or RSA keys only"
            )
        weakness = _weak_key(public_key)
        if weakness is not None:
            raise CertificateError(f"the CSR{who} has a weak key: {weakness}")
        subject = csr.subject
        common_names = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        organizations = subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        now = self.clock()
        try:
            builder = (
                x509.CertificateBuilder()
                .subject_name(
                    _name(
                        str(common_names[-1].value) if common_names else None,
                        [str(o.value) for o in organizations],
                    )
                )
                .issuer_name(self.ca_certificate.subject)
                .public_key(public_key)
                .serial_number(random_serial())
                .not_valid_before(now)
                .not_valid_after(now + timedelta(days=self.signing_days))
                .add_extension(_leaf_key_usage(), critical=True)
                .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                .add_extension(_authority_key_identifier(self.ca_certificate), critical=False)
            )
            if node_name:
                # Not critical: the subject is not empty, and edgecore reads nothing of it.
                names = [x509.UniformResourceIdentifier(node_uri(node_name))]
                builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
            cert = builder.sign(self._ca_key, hashes.SHA256())
        except ValueError as e:
            raise CertificateError(f"cannot sign the CSR{who}: {e}") from None
        return cert.public_bytes(serialization.Encoding.DER)

    @staticmethod
    def _usages(numbers: Sequence[int] | None, who: str) -> list[x509.ObjectIdentifier]:
        if not numbers:
            return [ExtendedKeyUsageOID.CLIENT_AUTH]
        usages = []
        for number in numbers:
            if isinstance(number, bool) or number not in GO_EXT_KEY_USAGES:
                raise CertificateError(
                    f"unsupported extended key usage {number!r} requested{who} "
                    "(only 1 = ServerAuth and 2 = ClientAuth)"
                )
            if GO_EXT_KEY_USAGES[number] not in usages:
                usages.append(GO_EXT_KEY_USAGES[number])
        return usages

    def verify_client_certificate(self, cert: x509.Certificate | X509) -> None:
        """Accept ``cert`` for renewal: signed by our CA, valid now, usable for ClientAuth.

        ``cert`` may be a ``cryptography`` certificate or a pyOpenSSL ``X509`` (what a TLS
        transport's ``getPeerCertificate()`` returns). Raises :class:`CertificateError`
        saying which check failed (§5.2 step 1).
        """
        if isinstance(cert, X509):
            cert = cert.to_cryptography()
        serial = f"serial {cert.serial_number:x}"
        if cert.issuer != self.ca_certificate.subject or not issued_by(cert, self.ca_certificate):
            raise CertificateError(f"client certificate {serial} is not signed by this hub's CA")
        now = self.clock()
        if now < cert.not_valid_before_utc:
            raise CertificateError(
                f"client certificate {serial} is not valid before "
                f"{cert.not_valid_before_utc.isoformat()}"
            )
        if now > cert.not_valid_after_utc:
            raise CertificateError(
                f"client certificate {serial} expired at {cert.not_valid_after_utc.isoformat()}"
            )
        try:
            usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            raise CertificateError(
                f"client certificate {serial} has no extended key usage (ClientAuth needed)"
            ) from None
        if (
            ExtendedKeyUsageOID.CLIENT_AUTH not in usages
            and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in usages
        ):
            raise CertificateError(f"client certificate {serial} is not for ClientAuth")
