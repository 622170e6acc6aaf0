-- 9: the web console's sessions and one-time sign-in links, shared by every hub and
-- worker on this registry. Only SHA-256 hashes (hex) of the session id, of the device
-- web UI proxy cookie and of a link's token are kept: reading the registry lets no one
-- sign in. `login_*` is what the sign-in stood on (hub.rules.logins.OperatorLogin):
-- the user row's id and created time and its credential ('key:' and the public key in
-- base64, 'password:' and the bcrypt hash the users row holds too, or '').
CREATE TABLE web_sessions (
    id_hash TEXT PRIMARY KEY,
    browse_hash TEXT NOT NULL UNIQUE,
    user_name TEXT NOT NULL,
    login_id BIGINT,
    login_created DOUBLE PRECISION,
    credential TEXT NOT NULL DEFAULT '',
    address TEXT NOT NULL DEFAULT '',
    created DOUBLE PRECISION NOT NULL,
    used DOUBLE PRECISION NOT NULL,
    expires DOUBLE PRECISION NOT NULL
);
CREATE INDEX web_sessions_user ON web_sessions (user_name);
CREATE INDEX web_sessions_used ON web_sessions (used);
CREATE INDEX web_sessions_expires ON web_sessions (expires);
CREATE TABLE web_links (
    token_hash TEXT PRIMARY KEY,
    user_name TEXT NOT NULL,
    login_id BIGINT,
    login_created DOUBLE PRECISION,
    credential TEXT NOT NULL DEFAULT '',
    expires DOUBLE PRECISION NOT NULL
);
CREATE INDEX web_links_user ON web_links (user_name);
CREATE INDEX web_links_expires ON web_links (expires);
