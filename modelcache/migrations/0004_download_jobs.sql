-- 0004: what a user-directed download needs beyond the spec's columns.
--
-- artifact_type and expected_sha256 are what the request asked for (the type
-- is read from the content when absent; a result that does not hash to the
-- expected digest is never kept); sha256 is the digest of what was fetched;
-- rate_bytes_per_second is the transfer's recent rate (written at most once a
-- second, with bytes_done); attempts counts transfers started (a resume is a
-- second attempt); decided_by and reason say who rejected or cancelled a
-- request and why. Credentials are never stored here: they stay in the
-- static configuration.
ALTER TABLE model_downloads
    ADD COLUMN artifact_type text,
    ADD COLUMN expected_sha256 text CHECK (expected_sha256 ~ '^sha256:[0-9a-f]{64}$'),
    ADD COLUMN sha256 text CHECK (sha256 ~ '^sha256:[0-9a-f]{64}$'),
    ADD COLUMN rate_bytes_per_second bigint,
    ADD COLUMN attempts integer NOT NULL DEFAULT 0,
    ADD COLUMN decided_by text,
    ADD COLUMN reason text;
CREATE INDEX model_downloads_created_idx ON model_downloads (created_at, id);
