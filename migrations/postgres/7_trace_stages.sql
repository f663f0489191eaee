-- A trace's stages, LZ4-compressed, in its own row (traces stored before keep theirs in trace_stages).
ALTER TABLE traces ADD COLUMN stages BYTEA;
