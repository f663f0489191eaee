-- One trace per inbound message, built from the stages nodes report.
CREATE TABLE traces (
    id TEXT PRIMARY KEY,
    instance_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    external_id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    sender_name TEXT NOT NULL,
    user_id TEXT NOT NULL,
    message_type TEXT NOT NULL,
    text TEXT NOT NULL,
    status TEXT NOT NULL,
    -- The seq of the stage that set status: a late resend of an earlier stage cannot roll back.
    status_seq BIGINT NOT NULL,
    error_stage TEXT NOT NULL,
    error TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    agent_ms BIGINT NOT NULL,
    node_id TEXT NOT NULL
);
CREATE INDEX traces_by_instance_time ON traces (instance_id, received_at DESC);
CREATE INDEX traces_by_time ON traces (received_at DESC);

CREATE TABLE trace_stages (
    trace_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    stage TEXT NOT NULL,
    at BIGINT NOT NULL,
    duration_ms BIGINT NOT NULL,
    detail TEXT NOT NULL,
    payload TEXT NOT NULL,
    PRIMARY KEY (trace_id, seq)
);

-- The people who talk to each instance. id is a UUIDv5 of the identity in the instance's
-- namespace, so one phone on two tenants is two users.
CREATE TABLE users (
    id TEXT PRIMARY KEY,
    instance_id TEXT NOT NULL,
    identity TEXT NOT NULL,
    display_name TEXT NOT NULL,
    first_seen_at BIGINT NOT NULL,
    last_seen_at BIGINT NOT NULL,
    message_count BIGINT NOT NULL,
    UNIQUE (instance_id, identity)
);
