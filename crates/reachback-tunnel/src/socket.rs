//! The data plane's TCP sockets: which congestion control they ask the kernel for.

/// The TCP congestion control of the data plane's connections: the tunnels, the
/// connector's intercepted connections and the agent's connections to local services.
///
/// BBR paces every connection with a timer per burst of packets; on a virtual
/// machine each timer is an exit to the hypervisor, and a relayed flow crosses
/// three of Reachback's sending sockets in each direction. CUBIC sends by the
/// window and sets no such timers: measured in the lab of `docs/benchmarks.md` on
/// a machine whose default is BBR, it cut the relay's CPU per byte by about a
/// quarter. So Reachback asks for CUBIC unless told otherwise (`--tcp-congestion`,
/// see `docs/decisions.md`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Congestion {
    /// whatever the machine's `net.ipv4.tcp_congestion_control` says
    #[default]
    System,
    /// a named algorithm (`cubic`, `bbr`, `reno`, …)
    Named(String),
}

/// What the data plane asks for when nobody says otherwise.
pub const DEFAULT_CONGESTION: &str = "cubic";

impl Congestion {
    /// Reads `--tcp-congestion`: `system`, or the name of an algorithm this
    /// machine offers (checked on a throwaway socket). With no value, CUBIC where
    /// it can be had and the system's choice where it cannot.
    pub fn resolve(requested: Option<&str>) -> anyhow::Result<Congestion> {
        let Some(name) = requested else {
            let wanted = Congestion::Named(DEFAULT_CONGESTION.into());
            return Ok(match wanted.probe() {
                Ok(()) => wanted,
                Err(error) => {
                    tracing::info!(algorithm = DEFAULT_CONGESTION, %error, "the data plane keeps the system's TCP congestion control");
                    Congestion::System
                }
            });
        };
        if name == "system" {
            return Ok(Congestion::System);
        }
        anyhow::ensure!(
            !name.is_empty() && name.len() < 16 && name.bytes().all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'_'),
            "--tcp-congestion must be `system` or an algorithm's name (lowercase letters, digits, `_`; at most 15), not {name:?}"
        );
        let congestion = Congestion::Named(name.into());
        congestion.probe().map_err(|error| {
            // unprivileged processes may only pick from the allowed list
            let (list, offered) = if error.kind() == std::io::ErrorKind::PermissionDenied {
                ("tcp_allowed_congestion_control", "allows without privileges")
            } else {
                ("tcp_available_congestion_control", "offers")
            };
            let names = std::fs::read_to_string(format!("/proc/sys/net/ipv4/{list}")).unwrap_or_default();
            anyhow::anyhow!("TCP congestion control {name:?} cannot be used here ({error}); this machine {offered}: {}", names.trim())
        })?;
        Ok(congestion)
    }

    fn probe(&self) -> std::io::Result<()> {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
        self.apply(&socket)
    }

    /// Sets the algorithm on a TCP socket (nothing for [`Congestion::System`]).
    pub fn apply<S: std::os::fd::AsFd>(&self, socket: &S) -> std::io::Result<()> {
        match self {
            Congestion::System => Ok(()),
            Congestion::Named(name) => socket2::SockRef::from(socket).set_tcp_congestion(name.as_bytes()),
        }
    }
}

/// Raises the soft limit on open files to the hard one (often 1,024 → 524,288):
/// every relayed flow holds a socket at the agent and the connector (a UDP flow in
/// tproxy mode too), so the flow caps, not the descriptor limit, are what limit.
pub fn raise_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(error) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::debug!(%error, "could not raise the open-file limit");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn congestion_names_are_checked_before_use() {
        assert_eq!(Congestion::resolve(Some("system")).expect("system"), Congestion::System);
        let error = Congestion::resolve(Some("no-such thing")).expect_err("a bad name").to_string();
        assert!(error.contains("--tcp-congestion must be"), "{error}");
        let error = Congestion::resolve(Some("nosuchalgo")).expect_err("an unknown algorithm").to_string();
        assert!(error.contains("cannot be used here") && error.contains("this machine offers"), "{error}");
        // reno is built into every Linux kernel
        assert_eq!(Congestion::resolve(Some("reno")).expect("reno"), Congestion::Named("reno".into()));
        let default = Congestion::resolve(None).expect("the default");
        assert!(matches!(&default, Congestion::System) || default == Congestion::Named(DEFAULT_CONGESTION.into()), "{default:?}");
    }

    #[tokio::test]
    async fn the_algorithm_is_set_on_the_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let stream = tokio::net::TcpStream::connect(listener.local_addr().expect("address")).await.expect("connect");
        Congestion::Named("reno".into()).apply(&stream).expect("reno");
        let name = socket2::SockRef::from(&stream).tcp_congestion().expect("read back");
        assert_eq!(String::from_utf8_lossy(&name).trim_end_matches('\0'), "reno");
    }
}
