"""Bearer JWTs from an identity provider (PyJWT), for users who already run one.

One key source, chosen in the config: an HS256 secret
(``gateway.jwt_secret_file``) or a public key (``gateway.jwt_public_key_file``,
PEM key or certificate). The algorithms accepted follow from the key's type
and nothing else, never from the token: an RSA key verifies RS*/PS*, an
Ed25519/Ed448 key EdDSA, an EC key the ES* of its curve, a secret HS256.
So ``alg: none`` and the old trick of HMAC-signing with the public key as
the secret both fail, as does any algorithm the key was not made for.

Every token must carry ``exp``; ``aud`` and ``iss`` are checked when
configured. The role comes from ``gateway.jwt_role_claim`` (a string, or a
list of which the highest known role counts, as providers that put several
roles in one claim do). A genuine token without a known role is answered
403, not 401: the caller proved who it is, it just may do nothing here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from ..errors import ConfigError
from .roles import Role

LEEWAY_SECONDS = 30  # clock skew between this node and the identity provider
MIN_SECRET_BYTES = 32  # RFC 7518 §3.2: an HS256 key of at least 256 bits
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


class TokenRejected(Exception):
    """The JWT is malformed, forged, expired or not meant for us; the text says which."""


def looks_like_jwt(token: str) -> bool:
    """Compact JWS: three base64url parts. Our own API keys never contain a dot."""
    return token.count(".") == 2


def algorithms_for(key: Any) -> tuple[str, ...]:
    """The algorithms a public key can verify; raises ValueError for other keys."""
    if isinstance(key, rsa.RSAPublicKey):
        return ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return ("EdDSA",)
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _EC_ALGORITHMS:
        return (_EC_ALGORITHMS[key.curve.name],)
    raise ValueError(f"unsupported public key type {type(key).__name__} (expected RSA, Ed25519, Ed448 or EC P-256/384/521)")


def _read(path: Path, key: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror or exc}") from exc


def load_public_key(pem: bytes) -> Any:
    """A PEM public key, or the public key of a PEM certificate."""
    if b"BEGIN CERTIFICATE" in pem:
        return x509.load_pem_x509_certificate(pem).public_key()
    return load_pem_public_key(pem)


@dataclass(frozen=True)
class JwtVerifier:
    key: Any  # bytes (HS256 secret) or a cryptography public key
    algorithms: tuple[str, ...]
    role_claim: str = "role"
    audience: str = ""
    issuer: str = ""

    @classmethod
    def from_config(cls, gateway: Any) -> JwtVerifier | None:
        """The verifier ``gateway.jwt_*`` describe; None when no JWT key is configured."""
        common = {"role_claim": gateway.jwt_role_claim, "audience": gateway.jwt_audience,
                  "issuer": gateway.jwt_issuer}
        if gateway.jwt_secret_file is not None:
            secret = _read(gateway.jwt_secret_file, "gateway.jwt_secret_file").strip()
            if len(secret) < MIN_SECRET_BYTES:
                raise ConfigError("gateway.jwt_secret_file", (
                    f"{gateway.jwt_secret_file}: an HS256 secret needs at least {MIN_SECRET_BYTES} bytes, "
                    f"got {len(secret)} (a short one is guessed offline from any token)"))
            return cls(secret, ("HS256",), **common)
        if gateway.jwt_public_key_file is not None:
            path = gateway.jwt_public_key_file
            try:
                key = load_public_key(_read(path, "gateway.jwt_public_key_file"))
                return cls(key, algorithms_for(key), **common)
            except ValueError as exc:
                raise ConfigError("gateway.jwt_public_key_file", f"{path}: {exc}") from exc
        return None

    def verify(self, token: str) -> dict[str, Any]:
        """The token's claims if it is genuine, current and ours; else :class:`TokenRejected`."""
        try:
            return jwt.decode(
                token,
                self.key,
                algorithms=list(self.algorithms),
                audience=self.audience or None,
                issuer=self.issuer or None,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp"], "verify_aud": bool(self.audience)},
            )
        except jwt.PyJWTError as exc:
            raise TokenRejected(str(exc) or type(exc).__name__) from None

    def role_of(self, claims: dict[str, Any]) -> Role | None:
        """The role the claims grant, or None. A dotted claim name is also tried as a
        path (``realm_access.role``) when no claim has that exact name."""
        value: Any = claims.get(self.role_claim)
        if self.role_claim not in claims and "." in self.role_claim:
            value = claims
            for part in self.role_claim.split("."):
                value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, list):
            roles = [r for r in map(Role.parse, value) if r is not None]
            return max(roles) if roles else None
        return Role.parse(value)
