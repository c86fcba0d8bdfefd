-- Tessera registry, schema version 1.
-- Portable between SQLite and PostgreSQL: text timestamps (ISO 8601, UTC, fixed width,
-- so they sort as text), base64 text for binary values, ids assigned by the registry
-- under its writer lock so the revocation feed's order is the commit order.

CREATE TABLE devices (
    serial                  TEXT PRIMARY KEY,
    identity                TEXT NOT NULL UNIQUE,
    kind                    TEXT NOT NULL,
    public_key              TEXT NOT NULL,
    key_backend             TEXT NOT NULL,
    attestation             TEXT NOT NULL,
    ek_fingerprint          TEXT,
    device_class            TEXT NOT NULL,
    status                  TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
    enrolled_at             TEXT NOT NULL,
    updated_at              TEXT NOT NULL,
    enrolled_by             TEXT NOT NULL,
    enrollment_cert_serial  TEXT NOT NULL,
    operational_cert_serial TEXT NOT NULL,
    operational_not_after   TEXT
);

-- One active device per TPM: a second enrollment of the same EK must be explicit.
CREATE UNIQUE INDEX devices_active_ek ON devices (ek_fingerprint) WHERE status = 'active';

-- Every credential ever issued, so revocation can list them all on the CRL.
CREATE TABLE credentials (
    cert_serial   TEXT PRIMARY KEY,
    device_serial TEXT NOT NULL,
    profile       TEXT NOT NULL,
    issued_at     TEXT NOT NULL,
    not_after     TEXT NOT NULL,
    revoked_at    TEXT
);
CREATE INDEX credentials_device ON credentials (device_serial);

-- The revocation feed brokers follow: ids only grow, so "since <id>" catches up.
CREATE TABLE revocations (
    id           BIGINT PRIMARY KEY,
    serial       TEXT NOT NULL,
    identity     TEXT NOT NULL,
    cert_serials TEXT NOT NULL,
    reason       TEXT NOT NULL,
    revoked_at   TEXT NOT NULL,
    revoked_by   TEXT NOT NULL
);

-- State between the round trips of a multi-step enrollment; each row is used once.
CREATE TABLE pending (
    token      TEXT PRIMARY KEY,
    payload    TEXT NOT NULL,
    expires_at TEXT NOT NULL
);

CREATE TABLE counters (
    name  TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO counters (name, value) VALUES ('crl_number', 0);
