-- 10: the generation (settings 'generation') of the last change to each node row or its
-- leases, so a hub reads only the nodes changed since its last read (hub.store.revisions)
-- instead of the whole node list at every change. 0: not changed since this migration.
ALTER TABLE nodes ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;
CREATE INDEX nodes_revision ON nodes (revision);
