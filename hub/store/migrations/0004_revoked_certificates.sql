-- 4: operator certificates refused by serial or key ID (`callhomehub cert revoke`).
CREATE TABLE revoked_certificates (
    id INTEGER PRIMARY KEY,
    serial INTEGER,
    key_id TEXT,
    time REAL NOT NULL,
    actor TEXT NOT NULL,
    CHECK ((serial IS NULL) != (key_id IS NULL))
);
CREATE UNIQUE INDEX revoked_serial ON revoked_certificates (serial) WHERE serial IS NOT NULL;
CREATE UNIQUE INDEX revoked_key_id ON revoked_certificates (key_id) WHERE key_id IS NOT NULL;
