//! The peer baseline on the same topology: the kernel's NAT (nftables) on each node, keepalived
//! (VRRP) moving the floating addresses, and optionally conntrackd (FTFW) syncing the kernel's
//! connection table, driven by keepalived's notify scripts the way Debian's
//! `/usr/share/doc/conntrackd/examples/sync/primary-backup.sh` drives it.
//!
//! Per node (`$L`), in order:
//! ```text
//! ip -n $L addr add 203.0.113.100/32 dev lo          # the SNAT address is local
//! ip netns exec $L nft -f nat.nft                    # nat_ruleset(): DNAT by jhash, SNAT
//! ip netns exec $L sysctl -w net.netfilter.nf_conntrack_tcp_be_liberal=1
//! ip netns exec $L conntrackd -C conntrackd-lN.conf  # variant "conntrackd" only
//! ip netns exec $L keepalived -n -l -D -P -f keepalived-lN.conf -p ... -r ...
//! ```

use std::path::Path;
use std::time::Duration;

use super::{front_addr, node_role, peer_of, HaLab, SNAT4, SNAT6, VIP4, VIP6};

/// The conntrackd sync port (UDP, on the front link).
pub const CONNTRACKD_PORT: u16 = 3780;
/// The jhash seed both nodes use, so that they place a flow on the same backend.
pub const JHASH_SEED: &str = "0x5eed1e55";

/// Which keepalived setup to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepalivedOpts {
    /// Also run conntrackd (FTFW over the front link) with the primary-backup notify script.
    pub conntrackd: bool,
    /// VRRPv3 with 0.1 s adverts (keepalived ignores `authentication` with VRRPv3); otherwise
    /// VRRPv2, 1 s adverts and `auth_type PASS`.
    pub fast_v3: bool,
}

/// The kernel NAT of one node: TCP VIP:80 → backends :8080 and UDP VIP:7000 → backends :7000,
/// the backend chosen by `jhash` over the 4-tuple (same seed on both nodes), SNAT to
/// [`SNAT4`] / [`SNAT6`] of whatever was DNATed and leaves through `back0`.
pub fn nat_ruleset() -> String {
    let mut s = String::new();
    for (fam, table, a, vip, snat, b) in [
        ("ip", "lb_nat4", "ip", VIP4, SNAT4, "198.51.100.1"),
        ("ip6", "lb_nat6", "ip6", VIP6, SNAT6, "2001:db8:b::1"),
    ] {
        let map = (0..3)
            .map(|i| format!("{i} : {b}{}", i + 1))
            .collect::<Vec<_>>()
            .join(", ");
        s.push_str(&format!(
            "table {fam} {table} {{\n  chain prerouting {{\n    \
             type nat hook prerouting priority dstnat; policy accept;\n"
        ));
        for (proto, port, bport) in [("tcp", 80, 8080), ("udp", 7000, 7000)] {
            s.push_str(&format!(
                "    {a} daddr {vip} {proto} dport {port} counter dnat to jhash {a} saddr . {proto} sport . \
                 {a} daddr . {proto} dport mod 3 seed {JHASH_SEED} map {{ {map} }} : {bport}\n"
            ));
        }
        s.push_str(&format!(
            "  }}\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    \
             oifname \"back0\" ct status dnat counter snat to {snat}\n  }}\n}}\n"
        ));
    }
    s
}

/// keepalived.conf of node `node`: one VRRP instance on `front0` (unicast to the peer's front
/// address, `nopreempt`, both nodes start as BACKUP) holding the floating addresses: IPv4 in
/// `virtual_ipaddress`, IPv6 in `virtual_ipaddress_excluded` (an instance's advertised
/// addresses are of one family). `notify`: the notify script for master / backup / fault.
pub fn keepalived_conf(node: u8, opts: KeepalivedOpts, notify: Option<&Path>) -> String {
    let prio = if node == 1 { 200 } else { 100 };
    let (version, advert, auth) = if opts.fast_v3 {
        (3, "0.1", String::new())
    } else {
        (
            2,
            "1",
            "  authentication {\n    auth_type PASS\n    auth_pass lbpair16\n  }\n".to_owned(),
        )
    };
    let notify = notify
        .map(|p| {
            let p = p.display();
            format!(
                "  notify_master \"{p} primary\"\n  notify_backup \"{p} backup\"\n  \
                 notify_fault \"{p} fault\"\n"
            )
        })
        .unwrap_or_default();
    format!(
        "global_defs {{\n  router_id {role}\n  vrrp_version {version}\n  script_user root\n}}\n\n\
         vrrp_instance VI_LB {{\n  state BACKUP\n  interface front0\n  virtual_router_id 51\n  \
         priority {prio}\n  advert_int {advert}\n  nopreempt\n  unicast_src_ip {src}\n  \
         unicast_peer {{\n    {peer}\n  }}\n  check_unicast_src\n{auth}  virtual_ipaddress {{\n    \
         192.0.2.10/24 dev front0\n    198.51.100.1/24 dev back0\n  }}\n  \
         virtual_ipaddress_excluded {{\n    2001:db8:c::10/64 dev front0\n    \
         2001:db8:b::1/64 dev back0\n  }}\n{notify}}}\n",
        role = node_role(node),
        src = front_addr(node),
        peer = front_addr(peer_of(node)),
    )
}

/// Paths of node `node`'s conntrackd files in `dir`: (config, lock, control socket, log).
pub fn conntrackd_paths(dir: &Path, node: u8) -> [String; 4] {
    let r = node_role(node);
    ["conf", "lock", "ctl", "file.log"].map(|x| {
        dir.join(format!("conntrackd-{r}.{x}"))
            .to_string_lossy()
            .into_owned()
    })
}

/// conntrackd.conf of node `node`: FTFW over UDP unicast on the front link, every protocol,
/// the nodes' own addresses ignored; files in `dir`.
pub fn conntrackd_conf(dir: &Path, node: u8) -> String {
    let [_, lock, ctl, log] = conntrackd_paths(dir, node);
    format!(
        "Sync {{\n\tMode FTFW {{\n\t\tDisableExternalCache Off\n\t\tPurgeTimeout 5\n\t}}\n\
         \tUDP {{\n\t\tIPv4_address {src}\n\t\tIPv4_Destination_Address {dst}\n\t\tPort {CONNTRACKD_PORT}\n\
         \t\tInterface front0\n\t\tSndSocketBuffer 1249280\n\t\tRcvSocketBuffer 1249280\n\t\tChecksum on\n\t}}\n}}\n\
         General {{\n\tHashSize 32768\n\tHashLimit 131072\n\tLogFile {log}\n\tSyslog off\n\
         \tLockFile {lock}\n\tUNIX {{\n\t\tPath {ctl}\n\t}}\n\tNetlinkBufferSize 2097152\n\
         \tNetlinkBufferSizeMaxGrowth 8388608\n\tNetlinkOverrunResync On\n\
         \tFilter From Userspace {{\n\t\tAddress Ignore {{\n\t\t\tIPv4_address 127.0.0.1\n\
         \t\t\tIPv4_address 192.0.2.11\n\t\t\tIPv4_address 192.0.2.12\n\t\t\tIPv6_address ::1\n\
         \t\t}}\n\t}}\n}}\n",
        src = front_addr(node),
        dst = front_addr(peer_of(node)),
    )
}

/// The notify script of node `node`: Debian's `primary-backup.sh` with this node's conntrackd
/// files, logging each step with a Unix-ms time stamp to `notify-lN.log` instead of `logger`.
pub fn notify_script(dir: &Path, node: u8) -> String {
    let [conf, lock, _, _] = conntrackd_paths(dir, node);
    let log = dir.join(format!("notify-{}.log", node_role(node)));
    format!(
        r#"#!/bin/sh
# /usr/share/doc/conntrackd/examples/sync/primary-backup.sh for one node of the lab.
CONNTRACKD_BIN=/usr/sbin/conntrackd
CONNTRACKD_LOCK={lock}
CONNTRACKD_CONFIG={conf}
LOG={log}
say() {{ echo "$(date +%s%3N) $*" >> $LOG; }}
run() {{
    $CONNTRACKD_BIN -C $CONNTRACKD_CONFIG "$@" >> $LOG 2>&1
    rc=$?
    [ $rc -eq 1 ] && say "ERROR: conntrackd $* failed"
    return $rc
}}
say "$1: begin"
case "$1" in
  primary)
    run -c          # commit the external cache into the kernel table
    say "primary: committed"
    run -f          # flush the internal and the external caches
    run -R          # resynchronize the internal cache with the kernel table
    run -B          # send a bulk update to the backups
    ;;
  backup)
    if ! $CONNTRACKD_BIN -C $CONNTRACKD_CONFIG -s >/dev/null 2>&1; then
        if [ -f $CONNTRACKD_LOCK ]; then
            say "WARNING: conntrackd was not cleanly stopped"
            rm -f $CONNTRACKD_LOCK
        fi
        run -d || {{ say "ERROR: cannot launch conntrackd"; exit 1; }}
    fi
    run -t          # shorten kernel timers to remove zombie entries
    run -n          # request a resync from the master
    ;;
  fault)
    run -t
    ;;
  *)
    say "ERROR: unknown state transition"
    exit 1
    ;;
esac
say "$1: end"
exit 0
"#,
        log = log.display()
    )
}

impl HaLab {
    /// Loads [`nat_ruleset`] on node `node`, makes the SNAT addresses local and TCP window
    /// tracking liberal (a flow picked up by another node mid-stream is not dropped for its
    /// sequence numbers; the conntrack-tools manual asks for it with FTFW).
    pub fn kernel_nat(&mut self, node: u8) {
        let role = node_role(node);
        let path = self.lab.write(&format!("nat-{role}.nft"), &nat_ruleset());
        self.sh(
            role,
            &format!(
                "set -e; ip addr add {SNAT4}/32 dev lo; ip addr add {SNAT6}/128 dev lo nodad; \
                 nft -f {}; sysctl -qw net.netfilter.nf_conntrack_tcp_be_liberal=1",
                path.display()
            ),
        );
    }

    /// Starts keepalived on node `node` as process `keepalived-lN` (and, with
    /// [`KeepalivedOpts::conntrackd`], its notify script first). The same call restarts it after
    /// a kill.
    pub fn start_keepalived(&mut self, node: u8, opts: KeepalivedOpts) {
        let role = node_role(node);
        let dir = self.lab.dir.clone();
        let notify = opts.conntrackd.then(|| {
            let p = dir.join(format!("notify-{role}.sh"));
            std::fs::write(&p, notify_script(&dir, node)).expect("notify script");
            set_mode(&p, 0o755);
            p
        });
        let conf = self.lab.write(
            &format!("keepalived-{role}.conf"),
            &keepalived_conf(node, opts, notify.as_deref()),
        );
        let f = |x: &str| {
            dir.join(format!("{x}-{role}.pid"))
                .to_string_lossy()
                .into_owned()
        };
        let (conf, pid, vrrp_pid) = (
            conf.to_string_lossy().into_owned(),
            f("keepalived"),
            f("vrrp"),
        );
        self.start(
            role,
            &format!("keepalived-{role}"),
            &[
                "keepalived",
                "-n",
                "-l",
                "-D",
                "-G",
                "-P",
                "-f",
                &conf,
                "-p",
                &pid,
                "-r",
                &vrrp_pid,
            ],
        );
    }

    /// Starts conntrackd on node `node` in the foreground as process `conntrackd-lN`, removing
    /// the lock file and control socket a killed one left; waits until it answers `-s`.
    pub fn start_conntrackd(&mut self, node: u8) {
        let role = node_role(node);
        let dir = self.lab.dir.clone();
        let [conf, lock, ctl, _] = conntrackd_paths(&dir, node);
        std::fs::write(&conf, conntrackd_conf(&dir, node)).expect("conntrackd.conf");
        let _ = std::fs::remove_file(&lock);
        let _ = std::fs::remove_file(&ctl);
        let name = format!("conntrackd-{role}");
        self.start(role, &name, &["conntrackd", "-C", &conf]);
        let up = self.lab.wait_for(Duration::from_secs(10), || {
            self.try_sh(role, &format!("conntrackd -C {conf} -s >/dev/null"))
                .ok()
        });
        assert!(
            up.is_some(),
            "conntrackd on {role} did not start: {}",
            self.log(&name)
        );
    }

    /// `conntrackd -s` of node `node` (statistics), or the error.
    pub fn conntrackd_stats(&self, node: u8) -> String {
        let [conf, ..] = conntrackd_paths(&self.lab.dir, node);
        self.try_sh(node_role(node), &format!("conntrackd -C {conf} -s"))
            .unwrap_or_else(|e| e)
    }

    /// The notify script's log of node `node`.
    pub fn notify_log(&self, node: u8) -> String {
        std::fs::read_to_string(self.lab.dir.join(format!("notify-{}.log", node_role(node))))
            .unwrap_or_default()
    }

    /// The kernel's conntrack entry count on node `node`.
    pub fn conntrack_count(&self, node: u8) -> u64 {
        self.try_sh(
            node_role(node),
            "cat /proc/sys/net/netfilter/nf_conntrack_count",
        )
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
    }
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}
