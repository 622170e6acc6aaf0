-- 6: operators' device sessions through the console gateway and the web terminal:
-- who, which node, from where, when, how it ended, bytes, and its recording (asciicast
-- file under DATA/recordings/, NULL when not recorded or pruned).
CREATE TABLE sessions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    "user" TEXT NOT NULL,
    node TEXT NOT NULL,
    source TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL,
    command TEXT,
    started REAL NOT NULL,
    ended REAL,
    exit_status INTEGER,
    exit_signal TEXT,
    bytes_to_device INTEGER NOT NULL DEFAULT 0,
    bytes_from_device INTEGER NOT NULL DEFAULT 0,
    recording TEXT,
    recording_bytes INTEGER NOT NULL DEFAULT 0,
    truncated INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX sessions_by_node ON sessions (node, started);
CREATE INDEX sessions_recorded ON sessions (started) WHERE recording IS NOT NULL;
