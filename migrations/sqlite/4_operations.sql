-- Stage payloads are stored LZ4-compressed; rows written before this keep theirs in `payload`.
ALTER TABLE trace_stages ADD COLUMN payload_lz4 BLOB;

-- A sender's traces within an instance, newest first. Status is deliberately not indexed: it
-- changes as stages arrive, and leaving it out of every index keeps those updates cheap.
CREATE INDEX traces_by_instance_sender_time ON traces (instance_id, sender, received_at DESC);

CREATE INDEX users_by_instance_last_seen ON users (instance_id, last_seen_at DESC, identity);

-- Jobs that one control plane among several runs (trace retention): the holder renews its
-- lease before it expires; anyone may take an expired one.
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);
