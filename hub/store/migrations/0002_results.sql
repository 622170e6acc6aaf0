-- 2: monitoring results (latest state plus bounded history per host/service).
CREATE TABLE results (
    id INTEGER PRIMARY KEY,
    node TEXT NOT NULL,
    host TEXT NOT NULL,
    service TEXT NOT NULL,
    code INTEGER NOT NULL,
    output TEXT NOT NULL,
    time REAL NOT NULL,
    received REAL NOT NULL
);
CREATE INDEX results_by_check ON results (host, service, id);
