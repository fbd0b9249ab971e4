//! Tests of the `reachback` binary as users run it: spawned server processes,
//! the CLI, kill -9 durability, several replicas on one PostgreSQL database, and
//! the data plane end to end in network namespaces (TPROXY and TUN connectors).

mod console;
mod dataplane;
mod dns;
mod durability;
mod events;
mod history;
mod process;
mod reference;
mod renewal;
mod replicas;
mod replicas_netns;
mod secrets;
mod socks5;
mod tls;
mod tun;
mod udp;
mod walkthrough;
