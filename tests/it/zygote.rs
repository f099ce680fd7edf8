//! Fork mode's zygotes: warm reuse, a clean child per request, and the lifecycle
//! (replaced on update, stopped on delete and when idle, restarted after a crash).

use std::time::Duration;

use crate::support::{Daemon, alive, eventually};

const WHO: &str = "import os\ndef handle(req):\n    return '%d %d' % (os.getppid(), os.getpid())\n";

/// (parent, pid) as the handler saw them.
fn who(d: &Daemon, name: &str) -> (u32, u32) {
    let r = d.req("POST", &format!("/{name}"), b"");
    assert_eq!(r.status, 200, "{r:?}");
    let t = r.text();
    let mut it = t.split_whitespace().map(|n| n.parse::<u32>().unwrap());
    (it.next().unwrap(), it.next().unwrap())
}

#[test]
fn each_request_is_a_fresh_child_of_one_warm_zygote() {
    let d = Daemon::start(&[]);
    d.upload("who", WHO);
    let (parent1, pid1) = who(&d, "who");
    let (parent2, pid2) = who(&d, "who");
    assert_eq!(parent1, parent2, "the same zygote forks both");
    assert_ne!(pid1, pid2, "a fresh process per request");
    assert_eq!(d.zygotes().get("who"), Some(&parent1));
    assert!(eventually(Duration::from_secs(5), || !alive(pid1) && !alive(pid2)));
    assert!(d.strays().is_empty(), "{:?}", d.strays());
}

#[test]
fn module_state_does_not_leak_between_requests_and_random_is_reseeded() {
    let d = Daemon::start(&[]);
    d.upload("count", "import random\ncount = 0\ndef handle(req):\n    global count\n    count += 1\n    return '%d %r' % (count, random.random())\n");
    let a = d.req("POST", "/count", b"").text();
    let b = d.req("POST", "/count", b"").text();
    assert!(a.starts_with("1 ") && b.starts_with("1 "), "{a:?} {b:?}");
    assert_ne!(a, b, "each child draws its own random numbers");
}

#[test]
fn an_update_replaces_the_zygote_before_it_is_answered() {
    let d = Daemon::start(&[]);
    d.upload("ver", "def handle(req):\n    return 'v1'\n");
    assert_eq!(d.req("GET", "/ver", b"").text(), "v1\n");
    let old = d.zygotes()["ver"];
    for v in 2..6 {
        d.upload("ver", &format!("def handle(req):\n    return 'v{v}'\n"));
        assert_eq!(
            d.req("GET", "/ver", b"").text(),
            format!("v{v}\n"),
            "no old code after the update answered"
        );
    }
    assert!(
        eventually(Duration::from_secs(5), || !alive(old)),
        "old zygote {old} still runs"
    );
    assert!(
        eventually(Duration::from_secs(5), || d.zygotes().len() == 1),
        "{:?}",
        d.zygotes()
    );
}

#[test]
fn delete_stops_the_zygote() {
    let d = Daemon::start(&[]);
    d.upload("gone", WHO);
    let (zygote, _) = who(&d, "gone");
    assert_eq!(d.req("DELETE", "/mgmt", b"gone").status, 200);
    assert!(
        eventually(Duration::from_secs(5), || !alive(zygote)),
        "zygote {zygote} outlived its function"
    );
    assert_eq!(d.req("POST", "/gone", b"").status, 404);
}

#[test]
fn an_idle_zygote_is_stopped_and_the_next_request_starts_another() {
    let d = Daemon::start(&[("EDGEFAAS_IDLE_TIMEOUT", "0.5")]);
    d.upload("who", WHO);
    let (first, _) = who(&d, "who");
    assert!(
        eventually(Duration::from_secs(10), || !alive(first)),
        "idle zygote {first} kept"
    );
    assert!(d.zygotes().is_empty(), "{:?}", d.zygotes());
    let (second, _) = who(&d, "who");
    assert_ne!(first, second);
}

#[test]
fn a_crashed_zygote_is_restarted_and_the_request_succeeds() {
    let d = Daemon::start(&[]);
    d.upload("who", WHO);
    let (zygote, _) = who(&d, "who");
    std::process::Command::new("kill")
        .args(["-9", &zygote.to_string()])
        .status()
        .unwrap();
    // Once it is gone (a SIGKILL takes a moment), the very next request still finds
    // the daemon's handle on the dead one, and must be run in a new one.
    assert!(eventually(Duration::from_secs(5), || !alive(zygote)));
    let (again, _) = who(&d, "who");
    assert_ne!(again, zygote);
    assert_eq!(d.req("POST", "/echo", b"x").text(), "x\n");
    assert!(
        eventually(Duration::from_secs(5), || d.strays().is_empty()),
        "{:?}",
        d.strays()
    );
}

#[test]
fn a_handler_whose_import_hangs_times_out_and_its_zygote_is_replaced() {
    let d = Daemon::start(&[("EDGEFAAS_EXEC_TIMEOUT", "1")]);
    // Imports fine at install; hangs at import while the marker exists (a network
    // share gone away, say).
    // In the function's own folder: the only one (with the system) it may read.
    let marker = d.dir.join("stuck").join("hang");
    d.upload(
        "stuck",
        &format!(
            "import os, time\nwhile os.path.exists({:?}):\n    time.sleep(0.05)\ndef handle(req):\n    return 'fixed'\n",
            marker.to_str().unwrap()
        ),
    );
    // Not warm yet: an update retires the zygote the install check did not start.
    std::fs::write(&marker, "1").unwrap();
    let r = d.req("POST", "/stuck", b"");
    assert_eq!(r.status, 504, "{r:?}");
    std::fs::remove_file(&marker).unwrap();
    assert_eq!(d.req("POST", "/stuck", b"").text(), "fixed\n");
    assert!(
        eventually(Duration::from_secs(5), || d.strays().is_empty()),
        "{:?}",
        d.strays()
    );
}

#[test]
fn concurrent_requests_to_one_function_each_get_their_own_child() {
    let d = Daemon::start(&[("EDGEFAAS_MAX_INFLIGHT", "8")]);
    d.upload("who", "import os, time\ndef handle(req):\n    time.sleep(0.3)\n    return '%d %d %s' % (os.getppid(), os.getpid(), req)\n");
    let port = d.port;
    let threads: Vec<_> = (0..8)
        .map(|i| {
            std::thread::spawn(move || {
                crate::support::request(port, "POST", "/who", format!("r{i}").as_bytes())
            })
        })
        .collect();
    let mut pids = std::collections::BTreeSet::new();
    for (i, t) in threads.into_iter().enumerate() {
        let r = t.join().unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        let text = r.text();
        let parts: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(
            parts[2],
            format!("r{i}"),
            "each answer is its own request's"
        );
        pids.insert(parts[1].to_string());
    }
    assert_eq!(pids.len(), 8);
}
