-- 1: the foundation schema.
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE nodes (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE COLLATE NOCASE,
    kind TEXT NOT NULL DEFAULT 'callhome',
    key_blob BLOB UNIQUE,
    fingerprint TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL CHECK (state IN ('pending', 'approved', 'revoked')),
    created REAL NOT NULL,
    last_seen REAL,
    peer TEXT NOT NULL DEFAULT '',
    online INTEGER NOT NULL DEFAULT 0,
    online_since REAL,
    public INTEGER NOT NULL DEFAULT 0,
    device_user TEXT NOT NULL DEFAULT 'root',
    host_key BLOB
);
CREATE TABLE leases (
    node_id INTEGER NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
    service TEXT NOT NULL,
    port INTEGER NOT NULL UNIQUE,
    active INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (node_id, service)
);
CREATE TABLE users (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE COLLATE NOCASE,
    password_hash TEXT,
    created REAL NOT NULL
);
CREATE TABLE user_keys (
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    key_blob BLOB NOT NULL,
    fingerprint TEXT NOT NULL,
    PRIMARY KEY (user_id, key_blob)
);
CREATE TABLE grants (
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    pattern TEXT NOT NULL,
    PRIMARY KEY (user_id, pattern)
);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
