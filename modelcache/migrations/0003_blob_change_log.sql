-- 0003: a change log, so the blob server's catalog follows changes incrementally.
--
-- The catalog used to reload every blob row after each reconnection and every
-- minute as a safety net: 1M rows a minute with a million blobs. Every digest
-- the triggers notify about is now also written here with the id of the
-- transaction that changed it. A catalog remembers the oldest transaction
-- still running when it last read (pg_snapshot_xmin); every change it has not
-- seen is then in a row with xid at or above that mark, so "what changed since"
-- is one index range scan, and a missed notification or a dropped LISTEN
-- connection costs a few rows, not a reload. Rows older than a day are pruned
-- (server/catalog.py); a catalog that was away longer reloads whole.
CREATE TABLE blob_changes (
    xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    digest text NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX blob_changes_xid_idx ON blob_changes (xid);

CREATE OR REPLACE FUNCTION notify_blob_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    changed text;
BEGIN
    IF TG_TABLE_NAME = 'blobs' THEN
        changed := COALESCE(NEW.digest, OLD.digest);
    ELSIF TG_TABLE_NAME = 'artifact_files' THEN
        changed := COALESCE(NEW.blob_digest, OLD.blob_digest);
    ELSE
        FOR changed IN SELECT f.blob_digest FROM artifact_files f WHERE f.artifact_id = COALESCE(NEW.id, OLD.id)
        LOOP
            INSERT INTO blob_changes (digest) VALUES (changed);
            PERFORM pg_notify('modelcache_blobs', changed);
        END LOOP;
        RETURN NULL;
    END IF;
    INSERT INTO blob_changes (digest) VALUES (changed);
    PERFORM pg_notify('modelcache_blobs', changed);
    RETURN NULL;
END;
$$;
