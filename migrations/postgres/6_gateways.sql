-- Which data-plane node runs each Discord bot's gateway, until when (unix ms) unless it renews.
-- One row per instance, so a bot has at most one holder; deleting the instance drops its lease.
CREATE TABLE gateway_leases (
    instance_id TEXT PRIMARY KEY REFERENCES instances (id) ON DELETE CASCADE,
    node_id TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    granted_at BIGINT NOT NULL
);
CREATE INDEX gateway_leases_by_node ON gateway_leases (node_id);

-- What a node last reported of each Discord bot's gateway (connecting, ready, error, closed),
-- why when it is error, which node and when (0: never). An error reported after the instance's
-- last update keeps the bot from being leased until the instance changes.
ALTER TABLE instance_connections ADD COLUMN gateway_state TEXT NOT NULL DEFAULT '';
ALTER TABLE instance_connections ADD COLUMN gateway_error TEXT NOT NULL DEFAULT '';
ALTER TABLE instance_connections ADD COLUMN gateway_node_id TEXT NOT NULL DEFAULT '';
ALTER TABLE instance_connections ADD COLUMN gateway_at BIGINT NOT NULL DEFAULT 0;
