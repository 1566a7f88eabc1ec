"""Zero-trust admission: a mesh authority key, peer certificates, a signed policy.

``documents`` is the pure codec (sign, verify, the rules of what a document
may say); ``state`` decides who is admitted from the documents at hand and
keeps them on disk; ``admission`` runs the exchange on every new connection
and gates every other stream until it is decided. See docs/security.md.
"""

from .documents import (
    ROLES,
    Authority,
    Certificate,
    Policy,
    Revocation,
    SigningAuthority,
    decode_certificate,
    decode_policy,
)

__all__ = [
    "ROLES", "Authority", "Certificate", "Policy", "Revocation", "SigningAuthority",
    "decode_certificate", "decode_policy",
]
