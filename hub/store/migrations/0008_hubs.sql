-- 8: several hubs on one registry. Each running hub has a row (its peer address,
-- its peer public key as an OpenSSH line, when it started and its last heartbeat);
-- a node's `hub` is the hub holding its tunnel now (NULL: none, or a single hub).
CREATE TABLE hubs (
    id TEXT PRIMARY KEY,
    peer_address TEXT NOT NULL DEFAULT '',
    peer_key TEXT NOT NULL DEFAULT '',
    started DOUBLE PRECISION NOT NULL,
    heartbeat DOUBLE PRECISION NOT NULL
);
ALTER TABLE nodes ADD COLUMN hub TEXT;
