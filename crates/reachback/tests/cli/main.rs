//! Tests of the `reachback` binary as users run it: spawned server processes,
//! the CLI, kill -9 durability, and several replicas on one PostgreSQL database.

mod durability;
mod process;
mod replicas;
mod walkthrough;
