//! Proves the namespace harness itself: traffic from the client to the backends through plain
//! kernel routing in the balancer namespace (no balancer process), TCP and UDP, IPv4 and IPv6.

mod common;

use std::time::Duration;

use common::{need_root, need_tool, Lab};

#[test]
fn kernel_routing_between_namespaces() {
    if !need_root() || !need_tool("socat") || !need_tool("curl") {
        return;
    }
    let mut lab = Lab::new("harness");
    let t = lab.topology(2);
    for b in t.backends.clone() {
        lab.http_server(&b, 8080);
        lab.udp_echo(&b.ns, &format!("echo-{}", b.name), b.v4, 7000);
    }
    let b1 = &t.backends[0];
    let got = lab
        .curl_many(&t.client, &format!("http://{}:8080/id", b1.v4), 3)
        .unwrap();
    assert_eq!(got, vec!["b1", "b1", "b1"]);
    let got = lab
        .curl_many(
            &t.client,
            &format!("http://[{}]:8080/id", t.backends[1].v6),
            1,
        )
        .unwrap();
    assert_eq!(got, vec!["b2"]);
    assert_eq!(
        lab.udp_ask(&t.client, b1.v4, 7000, "hello").unwrap(),
        "hello"
    );
    // The guard removes everything: remember a namespace and check after drop.
    let ns = t.balancer.clone();
    drop(lab);
    let list = common::run_timeout(Duration::from_secs(5), "ip", &["netns", "list"]).unwrap();
    assert!(!list.contains(&ns), "namespace {ns} left behind");
}
