-- 0001: the initial schema. schema_migrations itself is created by the runner (db/migrate.py).

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

CREATE TABLE node_model_availability (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    node_id uuid NOT NULL,
    model_version_id uuid NOT NULL REFERENCES model_versions (id),
    status text NOT NULL CHECK (status IN ('available', 'loading', 'failed', 'evicted')),
    last_checked_at timestamptz NOT NULL DEFAULT now(),
    details jsonb,
    CONSTRAINT node_model_availability_node_id_model_version_id_key UNIQUE (node_id, model_version_id)
);
CREATE INDEX node_model_availability_node_id_idx ON node_model_availability (node_id);

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
    finished_at timestamptz
);
CREATE INDEX model_downloads_state_idx ON model_downloads (state);

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

-- ours: the orchestrator's requests that a node load a model version.
CREATE TABLE node_load_requests (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    node_id uuid NOT NULL,
    model_version_id uuid NOT NULL REFERENCES model_versions (id),
    state text NOT NULL CHECK (state IN ('pending', 'loading', 'available', 'failed', 'cancelled')),
    requested_by text NOT NULL,
    error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX node_load_requests_node_id_state_idx ON node_load_requests (node_id, state);

-- Change notifications keep the blob server's in-memory view current
-- without a query per request. Payloads are blob digests or token ids.
CREATE FUNCTION notify_blob_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'blobs' THEN
        PERFORM pg_notify('modelcache_blobs', COALESCE(NEW.digest, OLD.digest));
    ELSIF TG_TABLE_NAME = 'artifact_files' THEN
        PERFORM pg_notify('modelcache_blobs', COALESCE(NEW.blob_digest, OLD.blob_digest));
    ELSE
        PERFORM pg_notify('modelcache_blobs', f.blob_digest)
           FROM artifact_files f WHERE f.artifact_id = COALESCE(NEW.id, OLD.id);
    END IF;
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
