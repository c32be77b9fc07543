//! A LAN of network namespaces on one bridge, for tests that need several hosts:
//! mDNS discovery, a host cut off and reconnected.
//!
//! ```text
//!   weft-<pid>-<k>-br           weft-<pid>-<k>-h0          weft-<pid>-<k>-h1
//!   ┌──────────────────┐        ┌─────────────────┐        ┌─────────────────┐
//!   │ br0 ── v0 ───────┼────────┼─ eth0 10.231.L.1│        │                 │
//!   │     └─ v1 ───────┼────────┼─────────────────┼────────┼─ eth0 10.231.L.2│
//!   └──────────────────┘        └─────────────────┘        └─────────────────┘
//! ```
//!
//! The bridge lives in its own namespace, so the host's network configuration is never
//! touched. Each host namespace has `lo` up, its address on `eth0`, and the route
//! `224.0.0.0/4 dev eth0` without which multicast (mDNS) has no way out. Names carry
//! the test process's pid; a `Lan` removes its namespaces and every process inside them
//! when dropped (also while a test panics), and the first `Lan` of a process removes
//! namespaces left by earlier test processes that no longer exist.
//!
//! Needs root; tests call [`require_root`] first.

use std::fs::File;
use std::io::Read as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::cli::{run_with_timeout, CliOutput, CLI_TIMEOUT};
use crate::process::{WeftBuilder, WeftProcess};

/// The prefix of every namespace the harness creates: `weft-<pid>-`.
const NS_PREFIX: &str = "weft-";

/// Bound on one `ip` invocation; they are netlink calls that take milliseconds.
const IP_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether the test may build namespaces. Without root, it panics when
/// `WEFT_REQUIRE_NETNS=1` (CI must not skip silently) and otherwise prints
/// `skipped: needs root` and returns false, so the test returns early.
pub fn require_root() -> bool {
    if effective_uid() == Some(0) {
        return true;
    }
    if std::env::var("WEFT_REQUIRE_NETNS").as_deref() == Ok("1") {
        panic!("WEFT_REQUIRE_NETNS=1 but this test process is not root: network namespace tests cannot run");
    }
    eprintln!("skipped: needs root");
    false
}

fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("Uid:"))?;
    // Uid: real effective saved filesystem
    line.split_whitespace().nth(2)?.parse().ok()
}

/// `n` hosts (network namespaces) on one bridge, with a `weft` node in any of them.
pub struct Lan {
    prefix: String,
    subnet: u8,
    bridge_ns: String,
    /// Namespaces created so far, bridge first, so a half-built Lan is still removed.
    created: Vec<String>,
    hosts: Vec<String>,
    nodes: Vec<Option<WeftProcess>>,
}

impl Lan {
    /// Builds the bridge and `n` hosts (at most 250). Panics with the failing `ip`
    /// command when the machine refuses.
    pub fn new(n: usize) -> Lan {
        assert!((1..=250).contains(&n), "a Lan has 1 to 250 hosts, not {n}");
        static CLEANUP: Once = Once::new();
        CLEANUP.call_once(remove_stale_namespaces);

        static NEXT: AtomicU32 = AtomicU32::new(0);
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{NS_PREFIX}{}-{k}", std::process::id());
        let mut lan = Lan {
            bridge_ns: format!("{prefix}-br"),
            prefix,
            // Every Lan is isolated in its own namespaces; distinct subnets only make
            // logs of different tests easier to tell apart.
            subnet: u8::try_from(k % 250).expect("below 250") + 1,
            created: Vec::new(),
            hosts: Vec::new(),
            nodes: Vec::new(),
        };
        if let Err(err) = lan.build(n) {
            panic!("cannot build a LAN of {n} network namespaces: {err:#}");
        }
        lan
    }

    fn build(&mut self, n: usize) -> anyhow::Result<()> {
        let br = self.bridge_ns.clone();
        ip(&["netns", "add", &br])?;
        self.created.push(br.clone());
        ip(&["-n", &br, "link", "set", "lo", "up"])?;
        // Snooping off: with no multicast querier on this bridge, flood all multicast.
        ip(&[
            "-n",
            &br,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        ip(&["-n", &br, "link", "set", "br0", "up"])?;
        for i in 0..n {
            let host = format!("{}-h{i}", self.prefix);
            ip(&["netns", "add", &host])?;
            self.created.push(host.clone());
            let port = bridge_port(i);
            ip(&[
                "-n", &br, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &host,
            ])?;
            ip(&["-n", &br, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", &br, "link", "set", &port, "up"])?;
            let cidr = format!("{}/24", self.host_addr_of(i));
            ip(&["-n", &host, "addr", "add", &cidr, "dev", "eth0"])?;
            ip(&["-n", &host, "link", "set", "lo", "up"])?;
            ip(&["-n", &host, "link", "set", "eth0", "up"])?;
            ip(&["-n", &host, "route", "add", "224.0.0.0/4", "dev", "eth0"])?;
            self.hosts.push(host);
            self.nodes.push(None);
        }
        Ok(())
    }

    /// The number of hosts.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// The namespace name of host `i`.
    pub fn host_ns(&self, i: usize) -> &str {
        &self.hosts[i]
    }

    /// The address of host `i` on the LAN: `10.231.<lan>.<i + 1>`.
    pub fn host_addr(&self, i: usize) -> Ipv4Addr {
        assert!(i < self.hosts.len(), "host {i} of {}", self.hosts.len());
        self.host_addr_of(i)
    }

    fn host_addr_of(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(
            10,
            231,
            self.subnet,
            u8::try_from(i + 1).expect("at most 250 hosts"),
        )
    }

    /// Runs `program args..` inside host `i` (`ip netns exec`), bounded by
    /// [`CLI_TIMEOUT`].
    pub async fn exec(&self, i: usize, program: &str, args: &[&str]) -> CliOutput {
        let mut command = tokio::process::Command::new("ip");
        command
            .args(["netns", "exec", &self.hosts[i], program])
            .args(args);
        let shown = format!(
            "ip netns exec {} {program} {}",
            self.hosts[i],
            args.join(" ")
        );
        run_with_timeout(command, shown, CLI_TIMEOUT).await
    }

    /// Starts `weft run` on host `i`: mDNS on, listening on `/ip4/0.0.0.0/tcp/0`, API on
    /// `127.0.0.1:0` inside the host. `configure` adds options (spaces, bootstrap, ...).
    /// The node belongs to the Lan; reach it with [`Lan::weft`].
    pub async fn start_weft(
        &mut self,
        i: usize,
        configure: impl FnOnce(WeftBuilder) -> WeftBuilder,
    ) -> &mut WeftProcess {
        assert!(self.nodes[i].is_none(), "host {i} already runs a node");
        let builder = WeftProcess::builder()
            .netns(&self.hosts[i])
            .mdns(true)
            .listen("/ip4/0.0.0.0/tcp/0");
        let node = configure(builder).start().await;
        self.nodes[i].insert(node)
    }

    /// The node on host `i`; panics when none was started.
    pub fn weft(&self, i: usize) -> &WeftProcess {
        self.nodes[i]
            .as_ref()
            .unwrap_or_else(|| panic!("no node started on host {i}"))
    }

    /// The node on host `i`, for stop/kill/restart.
    pub fn weft_mut(&mut self, i: usize) -> &mut WeftProcess {
        self.nodes[i]
            .as_mut()
            .unwrap_or_else(|| panic!("no node started on host {i}"))
    }

    /// Cuts host `i` off the LAN: its bridge port goes down, so its `eth0` loses
    /// carrier but keeps its addresses and routes (as when a cable is pulled).
    pub fn link_down(&self, i: usize) {
        self.set_bridge_port(i, "down");
    }

    /// Reconnects host `i`.
    pub fn link_up(&self, i: usize) {
        self.set_bridge_port(i, "up");
    }

    fn set_bridge_port(&self, i: usize, state: &str) {
        assert!(i < self.hosts.len(), "host {i} of {}", self.hosts.len());
        let port = bridge_port(i);
        if let Err(err) = ip(&["-n", &self.bridge_ns, "link", "set", &port, state]) {
            panic!("cannot set the link of host {i} {state}: {err:#}");
        }
    }

    /// Host `i`'s listen address on the LAN (`/ip4/<host_addr>/tcp/<port>`), for
    /// `--bootstrap`; panics when its node printed none.
    pub fn lan_listen_addr(&self, i: usize) -> String {
        let own = format!("/ip4/{}/tcp/", self.host_addr(i));
        let node = self.weft(i);
        node.listen_addrs()
            .iter()
            .find(|addr| addr.starts_with(&own))
            .cloned()
            .unwrap_or_else(|| {
                node.fail(format!(
                    "host {i} listens on no {own}.. address: {:?}",
                    node.listen_addrs()
                ))
            })
    }

    /// Splits the LAN: no host of `side_a` can reach a host of `side_b` and back (an
    /// `unreachable` /32 route each way), while each side still talks within itself and
    /// multicast (mDNS) still crosses. [`Lan::heal_partition`] undoes it.
    pub fn partition(&self, side_a: &[usize], side_b: &[usize]) {
        self.set_partition(side_a, side_b, "add");
    }

    /// Removes the routes [`Lan::partition`] added for the same two sides.
    pub fn heal_partition(&self, side_a: &[usize], side_b: &[usize]) {
        self.set_partition(side_a, side_b, "del");
    }

    fn set_partition(&self, side_a: &[usize], side_b: &[usize], action: &str) {
        for &a in side_a {
            for &b in side_b {
                assert_ne!(a, b, "host {a} is on both sides");
                for (from, to) in [(a, b), (b, a)] {
                    let target = format!("{}/32", self.host_addr(to));
                    let ns = &self.hosts[from];
                    if let Err(err) = ip(&["-n", ns, "route", action, "unreachable", &target]) {
                        panic!("cannot {action} the route from host {from} to host {to}: {err:#}");
                    }
                }
            }
        }
    }

    /// A TCP listener inside host `i`, on its LAN address and a free port.
    pub fn tcp_listener(&self, i: usize) -> TcpListener {
        let addr = SocketAddr::from((self.host_addr(i), 0));
        in_netns(&self.hosts[i], || TcpListener::bind(addr))
            .and_then(|bound| bound.with_context(|| format!("bind {addr}")))
            .unwrap_or_else(|err| panic!("TCP listener in host {i}: {err:#}"))
    }

    /// A TCP connection from inside host `i` to `addr`, giving up after `timeout`.
    pub fn tcp_connect(
        &self,
        i: usize,
        addr: SocketAddr,
        timeout: Duration,
    ) -> std::io::Result<TcpStream> {
        in_netns(&self.hosts[i], || {
            TcpStream::connect_timeout(&addr, timeout)
        })
        .unwrap_or_else(|err| panic!("entering host {i}: {err:#}"))
    }

    /// A UDP socket inside host `i`, bound to `port` on all its addresses.
    pub fn udp_socket(&self, i: usize, port: u16) -> UdpSocket {
        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        in_netns(&self.hosts[i], || UdpSocket::bind(addr))
            .and_then(|bound| bound.with_context(|| format!("bind {addr}")))
            .unwrap_or_else(|err| panic!("UDP socket in host {i}: {err:#}"))
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        // Nodes first: each prints its log tail when the test is failing.
        self.nodes.clear();
        for ns in self.created.iter().rev() {
            kill_processes_in(ns);
            if let Err(err) = ip(&["netns", "delete", ns]) {
                eprintln!("weft-tests: could not remove namespace {ns}: {err:#}");
            }
        }
    }
}

fn bridge_port(i: usize) -> String {
    format!("v{i}")
}

/// Runs `f` on a thread that has entered network namespace `ns`; sockets it creates
/// stay in that namespace when handed back.
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    let path = format!("/run/netns/{ns}");
    let file = File::open(&path).with_context(|| format!("open {path}"))?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                // SAFETY: setns on a valid namespace fd; it changes only this thread's
                // network namespace, and this thread ends when `f` returns.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error())
                        .with_context(|| format!("setns into {ns}"));
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Runs `ip args..`, bounded by [`IP_TIMEOUT`]; its stdout, or an error with stderr.
fn ip(args: &[&str]) -> anyhow::Result<String> {
    let mut child = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run `ip` (is iproute2 installed?)")?;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > IP_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "`ip {}` did not finish within {IP_TIMEOUT:?}",
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut out) = child.stdout.take() {
        out.read_to_string(&mut stdout)?;
    }
    if let Some(mut err) = child.stderr.take() {
        err.read_to_string(&mut stderr)?;
    }
    let output = Output {
        status,
        stdout: stdout.into_bytes(),
        stderr: stderr.into_bytes(),
    };
    if !output.status.success() {
        bail!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// SIGKILLs every process still inside namespace `ns` (one this test process made).
fn kill_processes_in(ns: &str) {
    let Ok(pids) = ip(&["netns", "pids", ns]) else {
        return;
    };
    for pid in pids
        .split_whitespace()
        .filter_map(|p| p.parse::<libc::pid_t>().ok())
    {
        // SAFETY: plain syscall; the pid is a process inside a namespace we created.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Removes `weft-<pid>-*` namespaces whose test process no longer exists (an
/// interrupted run). Namespaces of live test processes are left alone.
fn remove_stale_namespaces() {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for name in list
        .lines()
        .filter_map(|line| line.split_whitespace().next())
    {
        let Some(owner) = name
            .strip_prefix(NS_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if owner == std::process::id() || std::path::Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        eprintln!("weft-tests: removing namespace {name} left by dead test process {owner}");
        kill_processes_in(name);
        if let Err(err) = ip(&["netns", "delete", name]) {
            eprintln!("weft-tests: could not remove stale namespace {name}: {err:#}");
        }
    }
}
