-- 0005: nodes, placements, and what load requests need to be worked (issue 11).
--
-- A node is registered by an operator (POST /v1/nodes) with labels and the facts it runs
-- with; token_name names the node token its registration minted (re-registering revokes it
-- and mints another). last_seen_at is the last registration or heartbeat: a node silent
-- past nodes.heartbeat_timeout is stale and never chosen.
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

-- What a node holds goes with the node: a deleted node's availability rows are removed.
ALTER TABLE node_model_availability
    ADD CONSTRAINT node_model_availability_node_id_fkey FOREIGN KEY (node_id) REFERENCES nodes (id)
        ON DELETE CASCADE;
CREATE INDEX node_model_availability_model_version_id_idx ON node_model_availability (model_version_id);

-- Which model versions a group of nodes (a label selector) should hold: listed versions, or
-- the newest promoted version meeting capability requirements.
CREATE TABLE placements (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    selector jsonb NOT NULL DEFAULT '{}'::jsonb,
    model_version_ids uuid[] NOT NULL DEFAULT '{}',
    requirements jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    created_by text NOT NULL
);

-- The artifact a request asks the node to pull (chosen for the node's runtimes when the
-- request is made), the placement that made it, and at most one open request per node and
-- version.
ALTER TABLE node_load_requests
    ADD COLUMN artifact_id uuid REFERENCES model_artifacts (id),
    ADD COLUMN placement_id uuid REFERENCES placements (id) ON DELETE SET NULL;
CREATE UNIQUE INDEX node_load_requests_open_key ON node_load_requests (node_id, model_version_id)
    WHERE state IN ('pending', 'loading');
CREATE INDEX node_load_requests_model_version_id_idx ON node_load_requests (model_version_id);

-- A node long-polling for its load requests is woken by this, not by polling: the payload is
-- the node id.
CREATE FUNCTION notify_load_request() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('modelcache_loads', NEW.node_id::text);
    RETURN NULL;
END;
$$;

CREATE TRIGGER node_load_requests_notify AFTER INSERT OR UPDATE OF state ON node_load_requests
    FOR EACH ROW EXECUTE FUNCTION notify_load_request();
