-- 7: master/clone pairs. A pair is a row of nodes of kind 'pair' (node and pair names are
-- one namespace, and its own port leases are leases like a node's); its members are here.
CREATE TABLE pairs (
    pair_id INTEGER PRIMARY KEY REFERENCES nodes(id) ON DELETE CASCADE,
    master_id INTEGER NOT NULL UNIQUE REFERENCES nodes(id),
    clone_id INTEGER NOT NULL UNIQUE REFERENCES nodes(id),
    CHECK (master_id != clone_id)
);
