-- Flows cross replicas (issue 21): a replica that takes a flow for an address it does
-- not hold asks which replica holds the session of that address, and where that
-- replica's tunnel endpoint is reached by its peers (its own addresses, not the
-- endpoints handed to clients, which may name every replica or a load balancer).
CREATE INDEX client_sessions_address ON client_sessions (virtual_ip);
ALTER TABLE replicas ADD COLUMN relay_endpoints TEXT NOT NULL DEFAULT '';
