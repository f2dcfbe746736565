//! The binaries' command lines, without privileges: configuration errors name the file, line and
//! field; `--check` accepts a good file.

use std::process::Command;

fn write(name: &str, text: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("lb-cli-{}-{name}", std::process::id()));
    std::fs::write(&p, text).unwrap();
    p
}

const GOOD: &str = "[balancer]\ndevice = \"lb0\"\nsnat_addrs = [\"203.0.113.100\"]\n\n\
[[service]]\nvip = \"203.0.113.10:80\"\nproto = \"tcp\"\nmode = \"nat\"\n\
[[service.backend]]\naddr = \"198.51.100.11:80\"\n";

#[test]
fn check_accepts_a_good_config_and_names_the_line_of_a_bad_one() {
    let bin = env!("CARGO_BIN_EXE_tun-balancer");
    let good = write("good.toml", GOOD);
    let out = Command::new(bin)
        .arg("--config")
        .arg(&good)
        .arg("--check")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (1 services, 1 backends)"));

    let bad = write(
        "bad.toml",
        &GOOD.replace("198.51.100.11:80", "198.51.100.11:http"),
    );
    let out = Command::new(bin)
        .arg("--config")
        .arg(&bad)
        .arg("--check")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(":10:8: service[0].backend[0].addr:"), "{err}");

    // Without --check, a bad file is a start-up error too (before any device is touched).
    let out = Command::new(bin)
        .arg("--config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("service[0].backend[0].addr"));
    let _ = std::fs::remove_file(good);
    let _ = std::fs::remove_file(bad);
}

#[test]
fn shipped_example_configs_are_valid() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/configs");
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let cfg = e.unwrap().path();
        let out = Command::new(env!("CARGO_BIN_EXE_tun-balancer"))
            .args(["--config", cfg.to_str().unwrap(), "--check"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            cfg.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        n += 1;
    }
    assert!(
        n >= 3,
        "the shipped configurations: nat.toml, pair-node1.toml, pair-node2.toml"
    );
}

#[test]
fn decap_needs_a_device_argument() {
    let out = Command::new(env!("CARGO_BIN_EXE_lb-decap"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--device"));
}
