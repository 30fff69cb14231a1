//! Network namespaces for the tests that need more than loopback: a LAN whose hosts find
//! each other by multicast (lan.rs), homes behind NAT routers on a public network
//! (nat.rs). One builder for both: a "public" namespace holding a bridge, hosts plugged
//! into it, and homes behind routers plugged into it; everything made is removed when
//! the [`Namespaces`] is dropped.
//!
//! Making namespaces needs root and iproute2 (iptables too for homes); where that is not
//! allowed, [`namespaces`] says so and the test skips, unless `SHOAL_REQUIRE_NETNS` is
//! set (`.ci/run` sets it).

use std::process::{Command, Stdio};

/// How a home router maps ports.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Nat {
    /// Keeps a socket's port where it can (Linux's usual masquerade): hole punching works.
    Friendly,
    /// A new random port for every destination (`--random-fully`): hole punching
    /// cannot guess it, connections stay relayed.
    Symmetric,
}

/// Network namespaces, removed when dropped.
pub(crate) struct Namespaces {
    id: String,
    made: Vec<String>,
}

impl Namespaces {
    /// The full name of the namespace called `short` in this set.
    pub(crate) fn name(&self, short: &str) -> String {
        format!("sh{}{short}", self.id)
    }

    /// Runs `ip` (and `iptables`, `sysctl`) commands; false at the first that fails.
    fn sh(&self, script: &str) -> bool {
        Command::new("sh")
            .args(["-ec", script])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// A host `short` on the public network (the bridge) at `ip` (/24).
    pub(crate) fn public_host(&mut self, short: &str, ip: &str) -> bool {
        let (ns, public) = (self.name(short), self.name("pub"));
        let (a, b) = (
            format!("v{}{short}a", self.id),
            format!("v{}{short}b", self.id),
        );
        self.made.push(ns.clone());
        self.sh(&format!(
            "ip netns add {ns}
             ip link add {a} type veth peer name {b}
             ip link set {a} netns {ns}
             ip link set {b} netns {public}
             ip -n {public} link set {b} master br0 up
             ip -n {ns} addr add {ip}/24 dev {a}
             ip -n {ns} link set {a} up
             ip -n {ns} link set lo up"
        ))
    }

    /// A host on the public network that also routes multicast there, as a machine on
    /// a LAN does: mDNS sends to 224.0.0.251 (the namespace has no default route).
    pub(crate) fn lan_host(&mut self, short: &str, ip: &str) -> bool {
        if !self.public_host(short, ip) {
            return false;
        }
        let (ns, dev) = (self.name(short), format!("v{}{short}a", self.id));
        self.sh(&format!("ip -n {ns} route add 224.0.0.0/4 dev {dev}"))
    }

    /// A home behind a router whose outside is `wan` on the public network; the home's
    /// one machine is `lan_prefix.2` (`short`), the router `lan_prefix.1`. The router
    /// drops whatever comes in unasked, to the home and to itself: a packet to itself
    /// that it accepted would leave a connection-tracking entry that makes a later
    /// mapping of the same ports pick another port, and hole punching fail.
    pub(crate) fn home(&mut self, short: &str, wan: &str, lan_prefix: &str, nat: Nat) -> bool {
        let router = format!("{short}r");
        if !self.public_host(&router, wan) {
            return false;
        }
        let (r, h) = (self.name(&router), self.name(short));
        let (a, b) = (
            format!("v{}{short}l", self.id),
            format!("v{}{short}h", self.id),
        );
        let out = format!("v{}{router}a", self.id);
        let random = if nat == Nat::Symmetric {
            "--random-fully"
        } else {
            ""
        };
        self.made.push(h.clone());
        self.sh(&format!(
            "ip netns add {h}
             ip link add {a} type veth peer name {b}
             ip link set {a} netns {r}
             ip link set {b} netns {h}
             ip -n {r} addr add {lan_prefix}.1/24 dev {a}
             ip -n {r} link set {a} up
             ip -n {h} addr add {lan_prefix}.2/24 dev {b}
             ip -n {h} link set {b} up
             ip -n {h} link set lo up
             ip -n {h} route add default via {lan_prefix}.1
             ip netns exec {r} sysctl -qw net.ipv4.ip_forward=1
             ip netns exec {r} iptables -t nat -A POSTROUTING -o {out} -j MASQUERADE {random}
             ip netns exec {r} iptables -A FORWARD -i {out} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
             ip netns exec {r} iptables -A FORWARD -i {out} -j DROP
             ip netns exec {r} iptables -A INPUT -i {out} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
             ip netns exec {r} iptables -A INPUT -i {out} -j DROP"
        ))
    }

    /// The public network alone; `None` where namespaces cannot be made here. `tag`
    /// (one letter) keeps the namespaces of tests running at once apart.
    fn new(tag: char, need_iptables: bool) -> Option<Namespaces> {
        let mut n = Namespaces {
            id: format!("{}{tag}", std::process::id() % 1000),
            made: Vec::new(),
        };
        let public = n.name("pub");
        n.made.push(public.clone());
        let ok = (!need_iptables || Command::new("iptables").arg("--version").output().is_ok())
            && n.sh(&format!(
                "ip netns add {public}
                 ip -n {public} link add br0 type bridge
                 ip -n {public} link set br0 up"
            ));
        ok.then_some(n)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in self.made.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Makes the namespaces with `build`, or explains why the test skips (fails under
/// `SHOAL_REQUIRE_NETNS`). `need_iptables` for tests with NAT routers.
pub(crate) fn namespaces(
    tag: char,
    need_iptables: bool,
    build: impl FnOnce(&mut Namespaces) -> bool,
) -> Option<Namespaces> {
    let made = Namespaces::new(tag, need_iptables).and_then(|mut n| build(&mut n).then_some(n));
    if made.is_none() {
        assert!(
            std::env::var_os("SHOAL_REQUIRE_NETNS").is_none(),
            "SHOAL_REQUIRE_NETNS is set but the namespaces cannot be made here (needs root, iproute2{})",
            if need_iptables { ", iptables" } else { "" }
        );
        eprintln!(
            "SKIPPED: cannot create network namespaces here (needs root and `ip`{})",
            if need_iptables { " and `iptables`" } else { "" }
        );
    }
    made
}
