//! DNS for client hostnames, without I/O: the connector answers A/AAAA for the
//! bound devices' hostnames, PTR for their virtual IPs, SOA/NS for each client
//! domain, NXDOMAIN/NODATA with the zone's SOA for names nobody holds, and
//! REFUSED (or "forward") for everything else. Bytes in, bytes out over an
//! in-memory [`Table`]; the connector's socket loop is a thin shell around it.

pub mod answer;
pub mod name;
pub mod ratelimit;
pub mod table;

pub use answer::{Answerer, Outcome, Transport, rcode, rtype};
pub use name::{Name, NameError};
pub use ratelimit::RateLimiter;
pub use table::{Range, Table, TableError};

#[cfg(test)]
mod tests;
