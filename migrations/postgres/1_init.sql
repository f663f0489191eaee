-- The config revision: one row, bumped once by every config-changing transaction. Its row lock
-- orders those transactions, so revisions become visible in commit order (a sequence would not).
CREATE TABLE config_head (
    id SMALLINT PRIMARY KEY CHECK (id = 1),
    revision BIGINT NOT NULL,
    -- Change-log entries at or below this revision have been deleted.
    compacted_revision BIGINT NOT NULL
);
INSERT INTO config_head (id, revision, compacted_revision) VALUES (1, 0, 0);

-- What each revision changed, for data-plane nodes resuming from a revision they hold.
CREATE TABLE config_changes (
    revision BIGINT NOT NULL,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    op TEXT NOT NULL CHECK (op IN ('upsert', 'delete')),
    payload TEXT,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (revision, kind, key)
);

CREATE TABLE instances (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    channel TEXT NOT NULL,
    active BOOLEAN NOT NULL,
    -- JSON settings; secrets inside are sealed with the master key.
    spec TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    revision BIGINT NOT NULL
);
CREATE INDEX instances_by_channel ON instances (channel, name);

CREATE TABLE access_rules (
    id BIGSERIAL PRIMARY KEY,
    instance_id TEXT NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    pattern TEXT NOT NULL,
    action TEXT NOT NULL CHECK (action IN ('allow', 'block')),
    created_at BIGINT NOT NULL,
    UNIQUE (instance_id, pattern)
);

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    admin BOOLEAN NOT NULL,
    -- JSON array of instance-name patterns; empty for admin keys.
    instance_patterns TEXT NOT NULL,
    description TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    last_used_at BIGINT,
    revoked_at BIGINT
);
