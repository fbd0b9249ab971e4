-- Replicas list their open flows beside their sessions and connectors (issue 21):
-- the flows that entered at the replica (policy checked there), as of its last
-- heartbeat; zeroed when it is declared dead or stops.
ALTER TABLE replicas ADD COLUMN flows BIGINT NOT NULL DEFAULT 0;
