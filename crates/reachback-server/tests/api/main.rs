//! API tests: every endpoint through the real router, on SQLite and (when
//! `REACHBACK_TEST_POSTGRES` is set) on PostgreSQL, each test on a fresh database.

mod allocation;
mod console;
mod dataplane;
mod events;
mod flows;
mod harness;
mod history;
mod hostile;
mod listing;
mod replicas;
mod scenarios;
mod security;
