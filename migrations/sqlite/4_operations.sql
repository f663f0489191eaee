-- Stage payloads are stored LZ4-compressed; rows written before this keep theirs in `payload`.
ALTER TABLE trace_stages ADD COLUMN payload_lz4 BLOB;

-- Filters of `trace list` that narrow within an instance, newest first.
CREATE INDEX traces_by_instance_status_time ON traces (instance_id, status, received_at DESC);
CREATE INDEX traces_by_instance_sender_time ON traces (instance_id, sender, received_at DESC);

CREATE INDEX users_by_instance_last_seen ON users (instance_id, last_seen_at DESC, identity);

-- Jobs that one control plane among several runs (trace retention): the holder renews its
-- lease before it expires; anyone may take an expired one.
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);
