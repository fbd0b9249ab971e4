-- Where a connector answers DNS for client hostnames (its --dns-listen
-- addresses, comma-separated, as its last hello said), for the connector list.
ALTER TABLE connectors ADD COLUMN dns_listeners TEXT;
