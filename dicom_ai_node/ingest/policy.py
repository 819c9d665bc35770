"""Who may open an association: the called AE title, an optional allow-list of senders, their certificates."""

from __future__ import annotations

from dataclasses import dataclass

from dicom_ai_node.config import AllowedCaller, subject_attributes

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 §9.3.4:
# rejected-permanent, DICOM UL service-user, calling / called AE title not recognized.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)

# Short names used in configured subjects (RFC 4514) -> the names Python's ssl gives in getpeercert().
_SUBJECT_NAMES = {
    "CN": "commonName",
    "O": "organizationName",
    "OU": "organizationalUnitName",
    "C": "countryName",
    "L": "localityName",
    "ST": "stateOrProvinceName",
    "DC": "domainComponent",
    "UID": "userId",
    "EMAILADDRESS": "emailAddress",
    "SERIALNUMBER": "serialNumber",
}

Subject = frozenset[tuple[str, str]]  # (long attribute name, value) pairs of a certificate subject


def certificate_subject(peer_certificate: dict | None) -> Subject | None:
    """The subject of a certificate as Python's `SSLSocket.getpeercert()` gives it; None without one."""
    if not peer_certificate:
        return None
    return frozenset(attribute for rdn in peer_certificate.get("subject", ()) for attribute in rdn)


def describe_subject(subject: Subject | None) -> str:
    return ",".join(f"{name}={value}" for name, value in sorted(subject)) if subject else "no client certificate"


@dataclass(frozen=True)
class Rejection:
    reason: str
    result_source_diagnostic: tuple[int, int, int]


@dataclass(frozen=True)
class AssociationPolicy:
    our_ae_title: str
    require_called_ae_title: bool
    allowed_callers: tuple[AllowedCaller, ...]

    def check(self, called_ae: str, calling_ae: str, host: str, subject: Subject | None = None) -> Rejection | None:
        """None to accept, else why the association is rejected.

        `subject` is the sender's client certificate subject on the TLS port
        (the certificate is already verified against the configured CA).
        """
        called_ae, calling_ae = called_ae.strip(), calling_ae.strip()
        if self.require_called_ae_title and called_ae != self.our_ae_title:
            return Rejection(
                f"called AE title {called_ae!r} is not this node's {self.our_ae_title!r}", REJECT_CALLED_AE
            )
        if not self.allowed_callers:
            return None
        titles = [caller for caller in self.allowed_callers if caller.ae_title == calling_ae]
        if not titles:
            return Rejection(f"calling AE title {calling_ae!r} is not in dimse.allowed_callers", REJECT_CALLING_AE)
        from_host = [caller for caller in titles if caller.host in (None, host)]
        if not from_host:
            hosts = ", ".join(sorted(str(caller.host) for caller in titles))
            return Rejection(
                f"calling AE title {calling_ae!r} is allowed only from {hosts}, not from {host}", REJECT_CALLING_AE
            )
        if not any(_subject_matches(caller.tls_subject, subject) for caller in from_host):
            wanted = " or ".join(sorted(str(caller.tls_subject) for caller in from_host))
            return Rejection(
                f"calling AE title {calling_ae!r} must present a client certificate with subject {wanted}, "
                f"not {describe_subject(subject)}",
                REJECT_CALLING_AE,
            )
        return None


def _subject_matches(wanted: str | None, subject: Subject | None) -> bool:
    """Every attribute type the configured subject names has exactly the configured values in the certificate.

    Types it does not name (an OU, a C) may be anything; a second CN next to the wanted one is not accepted.
    """
    if wanted is None:
        return True
    if subject is None:
        return False
    expected: dict[str, set[str]] = {}
    for name, value in subject_attributes(wanted):
        expected.setdefault(_SUBJECT_NAMES.get(name, name), set()).add(value)
    return all({value for name, value in subject if name == attribute} == values
               for attribute, values in expected.items())
