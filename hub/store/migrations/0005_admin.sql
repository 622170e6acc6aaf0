-- 5: operators marked admin may approve, revoke, remove and switch access in the web console.
ALTER TABLE users ADD COLUMN admin INTEGER NOT NULL DEFAULT 0;
