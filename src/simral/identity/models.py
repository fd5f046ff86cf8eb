"""The regional directory: organisations, professionals, their roles, and their credentials.

Organisations carry their national identifiers (FINESS, SIRET) and the OIDs of the authorities
that assign their patient IDs and accession numbers (DESIGN.md §4, §6). A professional holds a
national id (RPPS-based, ``8`` + RPPS as Pro Santé Connect's ``SubjectNameID``) and one or more
roles per organisation. Sessions, API tokens and break-glass grants are kept server-side so they can
be revoked and audited.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from sqlalchemy import JSON, Boolean, DateTime, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from simral.db.base import Base, utcnow

OrganisationKind = Literal["hospital", "practice", "teleradiology-group", "regional-operator"]
ORGANISATION_KINDS: tuple[str, ...] = ("hospital", "practice", "teleradiology-group", "regional-operator")

#: Secteurs d'activité (TRE_R02-SecteurActivite, code system 1.2.250.1.71.4.2.4) of the CI-SIS
#: healthcare facility types (JDV_J02-XdsHealthcareFacilityTypeCode-CISIS) that imaging sites and
#: reading groups are, with their labels.
ACTIVITY_SECTORS: dict[str, str] = {
    "SA01": "Etablissement public de santé",
    "SA02": "Hôpital militaire du Service de santé des armées",
    "SA03": "Etablissement privé PSPH",
    "SA04": "Etablissement privé non PSPH",
    "SA05": "Centre de santé",
    "SA07": "Cabinet individuel",
    "SA08": "Cabinet de groupe",
    "SA09": "Exercice en société",
    "SA30": "Autre établissement sanitaire",
    "SA36": "Centre anti-cancer",
    "SA43": "Secteur non défini",
    "SA51": "Structure de coopération avec autorisation de soins",
    "SA52": "Maison de santé ou Pôle de santé",
    "SA54": "Centre de dépistage et de prévention",
}
#: Practice settings (JDV_J04-XdsPracticeSettingCode-CISIS, code system 1.2.250.1.213.1.1.4.9).
PRACTICE_SETTINGS: dict[str, str] = {
    "AMBULATOIRE": "Ambulatoire",
    "AMO": "Organisme d'assurance maladie obligatoire",
    "DEPISTAGE": "Dépistage",
    "ESSMS": "Etablissement ou Service Social ou Médico-Social",
    "ETABLISSEMENT": "Etablissement de santé",
    "HAD": "Hospitalisation à domicile",
    "MAD": "Maintien à domicile",
    "PALLIATIF": "Soins palliatifs",
    "SAD": "Soins à domicile",
    "SAMU_SMUR": "SAMU/SMUR",
}
#: What an organisation that was given neither is taken to be, by kind (secteur, practice setting).
DEFAULT_SECTORS: dict[str, tuple[str, str]] = {
    "hospital": ("SA01", "ETABLISSEMENT"),
    "practice": ("SA08", "AMBULATOIRE"),
    "teleradiology-group": ("SA08", "AMBULATOIRE"),
    "regional-operator": ("SA43", "AMBULATOIRE"),
}

Role = Literal[
    "technologist", "radiologist", "referring-physician", "site-admin", "regional-admin", "auditor"
]
ROLES: tuple[str, ...] = (
    "technologist",
    "radiologist",
    "referring-physician",
    "site-admin",
    "regional-admin",
    "auditor",
)


class Organisation(Base):
    """A hospital, a private practice, a teleradiology group or the regional operator."""

    __tablename__ = "organisation"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    code: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(32), default="hospital")
    #: FINESS (9 digits, juridical or geographical entity) and SIRET (14 digits), when known.
    finess: Mapped[str] = mapped_column(String(9), default="")
    siret: Mapped[str] = mapped_column(String(14), default="")
    #: OID of the authority assigning this organisation's patient IDs (IssuerOfPatientID qualifiers).
    patient_id_oid: Mapped[str] = mapped_column(String(64), default="")
    #: OID of the authority assigning its accession numbers (Issuer of Accession Number Sequence).
    accession_oid: Mapped[str] = mapped_column(String(64), default="")
    #: Secteur d'activité (TRE_R02, JDV_J02 XdsHealthcareFacilityTypeCode, e.g. SA01, SA08) and
    #: practice setting (JDV_J04 XdsPracticeSettingCode, e.g. ETABLISSEMENT, AMBULATOIRE) its CDA
    #: documents name (healthCareFacility/code, representedOrganization/standardIndustryClassCode);
    #: empty: the default of its kind (:func:`simral.identity.service.organisation_sector`).
    activity_sector: Mapped[str] = mapped_column(String(8), default="")
    practice_setting: Mapped[str] = mapped_column(String(32), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Professional(Base):
    """A person who logs in: a health professional, an administrator or an auditor."""

    __tablename__ = "professional"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    login: Mapped[str] = mapped_column(String(64), unique=True)
    display_name: Mapped[str] = mapped_column(String(200), default="")
    #: National id of a health professional: ``8`` + RPPS (the PSC ``SubjectNameID``); empty if none.
    national_id: Mapped[str] = mapped_column(String(32), default="", index=True)
    profession: Mapped[str] = mapped_column(String(64), default="")
    #: argon2id hash (PHC string); empty for accounts that only log in through OpenID Connect.
    password_hash: Mapped[str] = mapped_column(String(255), default="")
    #: Base32 TOTP secret (RFC 6238); set at enrolment, confirmed when ``totp_enrolled_at`` is set.
    totp_secret: Mapped[str] = mapped_column(String(64), default="")
    totp_enrolled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: The last TOTP time step accepted, so a code cannot be replayed (RFC 6238 §5.2).
    totp_last_step: Mapped[int] = mapped_column(Integer, default=0)
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    password_changed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    memberships: Mapped[list[Membership]] = relationship(
        back_populates="professional", cascade="all, delete-orphan", lazy="selectin"
    )


class Membership(Base):
    """One role a professional holds in one organisation."""

    __tablename__ = "membership"
    __table_args__ = (UniqueConstraint("professional_id", "organisation_id", "role", name="uq_membership"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    professional_id: Mapped[int] = mapped_column(ForeignKey("professional.id"), index=True)
    organisation_id: Mapped[int] = mapped_column(ForeignKey("organisation.id"), index=True)
    role: Mapped[str] = mapped_column(String(32))

    professional: Mapped[Professional] = relationship(back_populates="memberships")
    organisation: Mapped[Organisation] = relationship(lazy="joined")


class SigningKey(Base):
    """A key simral signs its bearer tokens with (JWK, RFC 7517); older keys verify until retired."""

    __tablename__ = "signing_key"

    kid: Mapped[str] = mapped_column(String(64), primary_key=True)
    private_jwk: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    #: When set, the key no longer signs; it still verifies tokens until ``retired_at`` + max token life.
    retired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ApiToken(Base):
    """An issued bearer token (its JWT id), so it can be listed and revoked."""

    __tablename__ = "api_token"

    jti: Mapped[str] = mapped_column(String(64), primary_key=True)
    professional_id: Mapped[int] = mapped_column(ForeignKey("professional.id"), index=True)
    organisation_code: Mapped[str] = mapped_column(String(32))
    label: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class WebSession(Base):
    """A browser session; the cookie holds a random secret, the table only its SHA-256."""

    __tablename__ = "web_session"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: None while an OpenID Connect login is pending.
    professional_id: Mapped[int | None] = mapped_column(
        ForeignKey("professional.id"), nullable=True, index=True
    )
    organisation_code: Mapped[str] = mapped_column(String(32), default="")
    csrf_token: Mapped[str] = mapped_column(String(64))
    #: "password" until the second factor is checked, then "mfa"; "oidc" after an eidas1 login.
    stage: Mapped[str] = mapped_column(String(16), default="password")
    #: Pending OpenID Connect login (state, nonce, PKCE verifier) before the session exists.
    pending: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    source_address: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class BreakGlass(Base):
    """Emergency access to one study outside the usual rules: a reason, a time limit, an alert."""

    __tablename__ = "break_glass"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    professional_id: Mapped[int] = mapped_column(ForeignKey("professional.id"), index=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    reason: Mapped[str] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AdminAlert(Base):
    """A message for an organisation's administrators (break-glass on one of its studies, lockouts)."""

    __tablename__ = "admin_alert"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    organisation_code: Mapped[str] = mapped_column(String(32), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)
    study_uid: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    acknowledged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
