-- Tessera registry, schema version 2: the attestation key of each TPM-attested device.
-- ak_public is the AK's marshalled TPM2B_PUBLIC (base64), the key whose name the
-- enrollment's credential activation proved to live in the device's TPM; brokers check
-- step-up quotes against it (tessera export-attestation-keys). NULL for devices enrolled
-- without a TPM, and for devices enrolled before this migration.

ALTER TABLE devices ADD COLUMN ak_public TEXT;
