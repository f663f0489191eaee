-- Which data-plane node runs each Discord bot's gateway, until when (unix ms) unless it renews.
-- One row per instance, so a bot has at most one holder. A lease is never freed early, not even
-- when the bot stops being eligible (its holder may run it until it hears so): it runs out, and
-- only then may another node take it. Deleting the instance drops its lease (its id never
-- comes back).
CREATE TABLE gateway_leases (
    instance_id TEXT PRIMARY KEY REFERENCES instances (id) ON DELETE CASCADE,
    node_id TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    granted_at BIGINT NOT NULL
);
CREATE INDEX gateway_leases_by_node ON gateway_leases (node_id);

-- What a node last reported of each Discord bot's gateway (connecting, ready, error, closed),
-- why when it is error, which node, when the control plane received it (unix ms, 0: never) and
-- the instance's config revision the gateway ran with. An error at the instance's current
-- revision keeps the bot from being leased until the instance changes (its revision grows).
ALTER TABLE instance_connections ADD COLUMN gateway_state TEXT NOT NULL DEFAULT '';
ALTER TABLE instance_connections ADD COLUMN gateway_error TEXT NOT NULL DEFAULT '';
ALTER TABLE instance_connections ADD COLUMN gateway_node_id TEXT NOT NULL DEFAULT '';
ALTER TABLE instance_connections ADD COLUMN gateway_at BIGINT NOT NULL DEFAULT 0;
ALTER TABLE instance_connections ADD COLUMN gateway_revision BIGINT NOT NULL DEFAULT 0;

-- One Discord bot serves one instance (two would both run it and answer every message twice):
-- the lowercase hex SHA-256 of the instance's trimmed bot token, NULL unless it is a Discord
-- instance with a token. Bot tokens are long random secrets, so an unkeyed hash gives nothing
-- away (API keys are stored the same way). NULLs are distinct in a unique index, so instances
-- without a token never collide.
ALTER TABLE instances ADD COLUMN discord_token_sha256 TEXT;
CREATE UNIQUE INDEX instances_by_discord_token ON instances (discord_token_sha256);
