-- modelcache registry: the fresh-install truth.
-- Numbered files in migrations/ upgrade older databases to the same schema;
-- tests/test_schema.py proves both roads give the same result.
-- The first four tables are the spec's (spec/model_management.md) with our
-- additions marked "ours".

CREATE TABLE schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    -- sha256 of the migration file's bytes: start-up refuses a database whose
    -- applied migrations differ from the shipped files (db/migrate.py)
    checksum text NOT NULL CHECK (checksum ~ '^[0-9a-f]{64}$')
);

CREATE TABLE models (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name text NOT NULL,
    vendor text,
    description text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    updated_by text NOT NULL,
    -- NULLS NOT DISTINCT: two models "llama3" without a vendor are the same model.
    CONSTRAINT models_name_vendor_key UNIQUE NULLS NOT DISTINCT (name, vendor)
);
CREATE INDEX models_name_idx ON models (name);

CREATE TABLE model_versions (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    model_id uuid NOT NULL REFERENCES models (id),
    version text NOT NULL,
    capabilities jsonb NOT NULL DEFAULT '{}'::jsonb,
    default_parameters jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT model_versions_model_id_version_key UNIQUE (model_id, version)
);
CREATE INDEX model_versions_model_id_idx ON model_versions (model_id);

-- ours: the store's index. Integrity metadata lives here.
CREATE TABLE blobs (
    digest text PRIMARY KEY CHECK (digest ~ '^sha256:[0-9a-f]{64}$'),
    size_bytes bigint NOT NULL CHECK (size_bytes >= 0),
    xxh3_128 text NOT NULL CHECK (xxh3_128 ~ '^[0-9a-f]{32}$'),
    state text NOT NULL DEFAULT 'present'
        CHECK (state IN ('present', 'quarantined', 'evicted')),
    created_at timestamptz NOT NULL DEFAULT now(),
    verified_at timestamptz NOT NULL DEFAULT now(),
    last_accessed_at timestamptz
);

-- ours: digests the triggers below notified about, by transaction, so the blob server's
-- catalog can ask what changed since it last read (migrations/0003_blob_change_log.sql).
CREATE TABLE blob_changes (
    xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    digest text NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX blob_changes_xid_idx ON blob_changes (xid);

CREATE TABLE model_artifacts (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    model_version_id uuid NOT NULL REFERENCES model_versions (id),
    artifact_type text NOT NULL CHECK (artifact_type IN ('gguf', 'safetensors', 'ollama')),
    -- the single file's sha256, or the manifest's for a multi-file artifact (64 hex)
    sha256 text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    size_bytes bigint NOT NULL CHECK (size_bytes >= 0),
    cache_path text NOT NULL,
    source_uri text,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- ours
    state text NOT NULL DEFAULT 'staged'
        CHECK (state IN ('staged', 'promoted', 'evicted', 'quarantined')),
    pinned boolean NOT NULL DEFAULT false,
    last_accessed_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now(),
    updated_by text NOT NULL,
    CONSTRAINT model_artifacts_sha256_key UNIQUE (sha256)
);
CREATE INDEX model_artifacts_model_version_id_idx ON model_artifacts (model_version_id);
CREATE INDEX model_artifacts_state_idx ON model_artifacts (state);

-- ours: the files of an artifact; a single-file artifact has one row.
CREATE TABLE artifact_files (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    artifact_id uuid NOT NULL REFERENCES model_artifacts (id) ON DELETE CASCADE,
    path text NOT NULL,
    blob_digest text NOT NULL REFERENCES blobs (digest),
    size_bytes bigint NOT NULL CHECK (size_bytes >= 0),
    media_type text NOT NULL,
    CONSTRAINT artifact_files_artifact_id_path_key UNIQUE (artifact_id, path)
);
CREATE INDEX artifact_files_blob_digest_idx ON artifact_files (blob_digest);

-- ours: registered nodes (migrations/0005_nodes.sql). token_name is the node token the last
-- registration minted; last_seen_at the last registration or heartbeat.
CREATE TABLE nodes (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name text NOT NULL,
    labels jsonb NOT NULL DEFAULT '{}'::jsonb,
    facts jsonb NOT NULL DEFAULT '{}'::jsonb,
    token_name text,
    last_seen_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    updated_by text NOT NULL
);
CREATE INDEX nodes_labels_idx ON nodes USING gin (labels);

CREATE TABLE node_model_availability (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    -- ours: the reference (a deleted node's rows go with it)
    node_id uuid NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
    model_version_id uuid NOT NULL REFERENCES model_versions (id),
    status text NOT NULL CHECK (status IN ('available', 'loading', 'failed', 'evicted')),
    last_checked_at timestamptz NOT NULL DEFAULT now(),
    details jsonb,
    CONSTRAINT node_model_availability_node_id_model_version_id_key UNIQUE (node_id, model_version_id)
);
CREATE INDEX node_model_availability_node_id_idx ON node_model_availability (node_id);
CREATE INDEX node_model_availability_model_version_id_idx ON node_model_availability (model_version_id);

-- ours, in CyNodeAI's preference shape; model management uses scope 'system'.
CREATE TABLE preference_entries (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    scope_type text NOT NULL CHECK (scope_type IN ('system', 'user', 'group', 'project', 'task')),
    scope_id uuid,
    key text NOT NULL,
    value jsonb,
    value_type text NOT NULL CHECK (value_type IN ('string', 'number', 'boolean', 'object', 'array')),
    version integer NOT NULL DEFAULT 1,
    updated_at timestamptz NOT NULL DEFAULT now(),
    updated_by text NOT NULL,
    CONSTRAINT preference_entries_scope_key UNIQUE NULLS NOT DISTINCT (scope_type, scope_id, key)
);
CREATE INDEX preference_entries_scope_idx ON preference_entries (scope_type, scope_id);
CREATE INDEX preference_entries_key_idx ON preference_entries (key);

CREATE TABLE preference_audit_log (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    entry_id uuid NOT NULL REFERENCES preference_entries (id),
    old_value jsonb,
    new_value jsonb,
    changed_at timestamptz NOT NULL DEFAULT now(),
    changed_by text NOT NULL,
    reason text
);
CREATE INDEX preference_audit_log_entry_id_idx ON preference_audit_log (entry_id);
CREATE INDEX preference_audit_log_changed_at_idx ON preference_audit_log (changed_at);

-- ours: every model management action, allowed or denied.
CREATE TABLE model_audit_log (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    subject_type text NOT NULL,
    subject_id text,
    action text NOT NULL CHECK (action ~ '^[a-z_]+\.[a-z_]+$'),
    resource_type text NOT NULL,
    resource text,
    decision text NOT NULL CHECK (decision IN ('allow', 'deny')),
    outcome text,
    reason text,
    details jsonb
);
CREATE INDEX model_audit_log_created_at_idx ON model_audit_log (created_at DESC, id DESC);
CREATE INDEX model_audit_log_action_idx ON model_audit_log (action);

-- ours: user-directed download jobs.
CREATE TABLE model_downloads (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    source text NOT NULL,
    reference text NOT NULL,
    model_name text,
    model_vendor text,
    version text,
    requested_by text NOT NULL,
    state text NOT NULL CHECK (state IN
        ('pending_approval', 'queued', 'running', 'completed', 'failed', 'rejected', 'cancelled')),
    bytes_done bigint NOT NULL DEFAULT 0,
    bytes_total bigint,
    error text,
    approved_by text,
    artifact_id uuid REFERENCES model_artifacts (id),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    started_at timestamptz,
    finished_at timestamptz,
    -- migrations/0004_download_jobs.sql: what was asked (type, expected digest), what came
    -- (sha256), the recent rate, transfers started, and who rejected or cancelled it and why
    artifact_type text,
    expected_sha256 text CHECK (expected_sha256 ~ '^sha256:[0-9a-f]{64}$'),
    sha256 text CHECK (sha256 ~ '^sha256:[0-9a-f]{64}$'),
    rate_bytes_per_second bigint,
    attempts integer NOT NULL DEFAULT 0,
    decided_by text,
    reason text
);
CREATE INDEX model_downloads_state_idx ON model_downloads (state);
CREATE INDEX model_downloads_created_idx ON model_downloads (created_at, id);

-- ours: bearer tokens; only the sha256 of the secret is stored.
CREATE TABLE api_tokens (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name text NOT NULL,
    role text NOT NULL CHECK (role IN ('admin', 'operator', 'node', 'reader')),
    token_sha256 text NOT NULL CHECK (token_sha256 ~ '^[0-9a-f]{64}$'),
    node_id uuid,
    created_at timestamptz NOT NULL DEFAULT now(),
    created_by text NOT NULL,
    expires_at timestamptz,
    revoked_at timestamptz,
    CONSTRAINT api_tokens_token_sha256_key UNIQUE (token_sha256),
    CONSTRAINT api_tokens_name_key UNIQUE (name)
);

-- ours: which model versions a group of nodes (a label selector) should hold: listed versions,
-- or the newest promoted version meeting capability requirements.
CREATE TABLE placements (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    selector jsonb NOT NULL DEFAULT '{}'::jsonb,
    model_version_ids uuid[] NOT NULL DEFAULT '{}',
    requirements jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    created_by text NOT NULL
);

-- ours: the orchestrator's requests that a node load a model version.
CREATE TABLE node_load_requests (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    node_id uuid NOT NULL,
    model_version_id uuid NOT NULL REFERENCES model_versions (id),
    state text NOT NULL CHECK (state IN ('pending', 'loading', 'available', 'failed', 'cancelled')),
    requested_by text NOT NULL,
    error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    -- the artifact to pull (chosen for the node's runtimes), the placement that asked
    artifact_id uuid REFERENCES model_artifacts (id),
    placement_id uuid REFERENCES placements (id) ON DELETE SET NULL
);
CREATE INDEX node_load_requests_node_id_state_idx ON node_load_requests (node_id, state);
-- at most one open request per node and version
CREATE UNIQUE INDEX node_load_requests_open_key ON node_load_requests (node_id, model_version_id)
    WHERE state IN ('pending', 'loading');
CREATE INDEX node_load_requests_model_version_id_idx ON node_load_requests (model_version_id);

-- Change notifications keep the blob server's in-memory view current
-- without a query per request. Payloads are blob digests or token ids; blob digests are
-- also logged in blob_changes, for a catalog that missed notifications.
CREATE FUNCTION notify_blob_change() RETURNS trigger LANGUAGE plpgsql AS $$
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

-- not on last_accessed_at: pulls are recorded every few seconds and change nothing served
CREATE TRIGGER blobs_notify AFTER INSERT OR DELETE OR UPDATE OF state, size_bytes ON blobs
    FOR EACH ROW EXECUTE FUNCTION notify_blob_change();
CREATE TRIGGER artifact_files_notify AFTER INSERT OR UPDATE OR DELETE ON artifact_files
    FOR EACH ROW EXECUTE FUNCTION notify_blob_change();
CREATE TRIGGER model_artifacts_notify AFTER UPDATE OF state ON model_artifacts
    FOR EACH ROW EXECUTE FUNCTION notify_blob_change();

CREATE FUNCTION notify_token_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('modelcache_tokens', COALESCE(NEW.id, OLD.id)::text);
    RETURN NULL;
END;
$$;

CREATE TRIGGER api_tokens_notify AFTER INSERT OR UPDATE OR DELETE ON api_tokens
    FOR EACH ROW EXECUTE FUNCTION notify_token_change();

-- A node long-polling for its load requests is woken by this (payload: the node id).
CREATE FUNCTION notify_load_request() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('modelcache_loads', NEW.node_id::text);
    RETURN NULL;
END;
$$;

CREATE TRIGGER node_load_requests_notify AFTER INSERT OR UPDATE OF state ON node_load_requests
    FOR EACH ROW EXECUTE FUNCTION notify_load_request();
