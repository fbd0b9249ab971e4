-- A connector is recognised by the key it enrolled with (SHA-256 of its
-- SubjectPublicKeyInfo), as a device is: a renewed certificate (same key, new
-- serial) keeps working, a new enrollment (new key) makes the old ones useless.
-- NULL for connectors enrolled before this version: their serial still decides.
ALTER TABLE connectors ADD COLUMN key_fingerprint {BLOB};
