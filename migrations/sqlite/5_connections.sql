-- What each instance's channel last said about its connection (Evolution's connection.update
-- and qrcode.updated, as nodes report them). 0 means never.
CREATE TABLE instance_connections (
    instance_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    status_reason BIGINT NOT NULL,
    wuid TEXT NOT NULL,
    profile_name TEXT NOT NULL,
    connection_at BIGINT NOT NULL,
    qr_at BIGINT NOT NULL
);
