-- 3: per-node console command template (serial ports behind a console server).
ALTER TABLE nodes ADD COLUMN console TEXT;
