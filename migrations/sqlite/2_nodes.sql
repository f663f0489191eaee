-- Data-plane nodes, as they report themselves over the sync stream.
CREATE TABLE nodes (
    id TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    version TEXT NOT NULL,
    applied_revision BIGINT NOT NULL,
    first_seen_at BIGINT NOT NULL,
    last_seen_at BIGINT NOT NULL,
    connected BOOLEAN NOT NULL,
    last_error TEXT NOT NULL
);
