-- 0002: two changes for databases already at version 1.
--
-- 1. blobs_notify no longer fires on last_accessed_at. Pulls record their
--    access times every few seconds and change nothing the blob server serves,
--    so notifying on them made every server re-read blobs for nothing. This
--    change was first made by editing 0001 in place after its first build; a
--    database migrated by that build never saw it, hence this migration (a
--    no-op in effect for a database whose 0001 already had it).
DROP TRIGGER IF EXISTS blobs_notify ON blobs;
-- not on last_accessed_at: pulls are recorded every few seconds and change nothing served
CREATE TRIGGER blobs_notify AFTER INSERT OR DELETE OR UPDATE OF state, size_bytes ON blobs
    FOR EACH ROW EXECUTE FUNCTION notify_blob_change();

-- 2. Each applied migration's sha256 (of the file's bytes) is recorded, and
--    start-up refuses a database whose record differs from the shipped file
--    (db/migrate.py): an applied migration is never edited.
ALTER TABLE schema_migrations
    ADD COLUMN IF NOT EXISTS checksum text CHECK (checksum ~ '^[0-9a-f]{64}$');
-- Rows applied before the column existed get the checksum of 0001_initial.sql
-- as shipped (never to be edited again). The runner records 0002's own.
UPDATE schema_migrations
   SET checksum = 'ece3a3bc2e820b3d4fcef17370a109f5cd4eb2a3ef3aaa4e3120b3c1c08f5e65'
 WHERE version = 1 AND checksum IS NULL;
ALTER TABLE schema_migrations ALTER COLUMN checksum SET NOT NULL;
