//! Hostile input: traversal in every form, oversized and malformed requests,
//! bad tokens. Each gets a clear 4xx, the daemon keeps serving, and nothing
//! outside the functions dir is touched.

use std::path::Path;

use crate::support::{Daemon, http};

const V1: &str = "def handle(req):\n    return 'v1'\n";

/// Every file under `dir` with its size and mtime, to prove nothing changed.
fn snapshot(dir: &Path) -> Vec<(String, u64, std::time::SystemTime)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                stack.push(e.path());
            }
            out.push((
                e.path().display().to_string(),
                m.len(),
                m.modified().unwrap(),
            ));
        }
    }
    out.sort();
    out
}

#[test]
fn traversal_in_urls_names_and_put_paths_is_refused_and_touches_nothing() {
    let d = Daemon::start(&[]);
    d.upload("keep", V1);
    // A decoy beside the functions dir: a traversal that worked would reach it.
    let outside = d.dir.parent().unwrap().join("outside");
    std::fs::create_dir_all(outside.join("handler")).unwrap();
    std::fs::write(
        outside.join("handler.py"),
        "def handle(req):\n    return 'escaped'\n",
    )
    .unwrap();
    let before_outside = snapshot(&outside);
    let before_inside = snapshot(&d.dir);

    let invoke_paths = [
        "/..",
        "/../outside",
        "/%2e%2e",
        "/%2e%2e/outside",
        "/.%2e/outside",
        "/%2E%2E%2Foutside",
        "/%252e%252e/outside",
        "/..%2foutside",
        "/%2foutside",
        "/outside%00",
        "/echo%00",
        "/%00",
        "/ech%D0%BE",
        "/%EF%BC%8E%EF%BC%8E",
        "/..%c0%af..%c0%afoutside",
        "/%c0%ae%c0%ae",
        "/.runtime",
        "/.stage-x",
        "/keep%2f..%2f..%2foutside",
        "/%5c..%5coutside",
        "/..\\outside",
        "/~root",
        "/%7e",
        "/echo%20",
        "/%20echo",
        "/keep.py",
        "/keep%2epy",
    ];
    let mut tried = 0;
    for path in invoke_paths {
        let r = d.req("POST", path, b"x");
        assert_eq!(r.status, 400, "{path}: {r:?}");
        assert_eq!(r.text().lines().count(), 1, "{path}: {r:?}");
        tried += 1;
    }
    for path in ["//outside", "/"] {
        assert_eq!(d.req("POST", path, b"x").status, 404, "{path}");
        tried += 1;
    }
    let put_paths = [
        "/mgmt/..",
        "/mgmt/%2e%2e",
        "/mgmt/../outside",
        "/mgmt/%2e%2e%2foutside",
        "/mgmt/a%2fb",
        "/mgmt//outside",
        "/mgmt/x%00",
        "/mgmt/ech%D0%BE",
        "/mgmt/.runtime",
        "/mgmt/.stage-keep",
        "/mgmt/%252e%252e",
        "/mgmt/_x",
        "/mgmt/mgmt",
        "/mgmt/%ff",
        "/mgmt/keep/../../outside",
    ];
    for path in put_paths {
        let r = d.req("PUT", path, b"def handle(req):\n    return 'owned'\n");
        assert_eq!(r.status, 400, "PUT {path}: {r:?}");
        let r = d.req("DELETE", path, b"");
        assert_eq!(r.status, 400, "DELETE {path}: {r:?}");
        tried += 2;
    }
    let delete_bodies: [&[u8]; 9] = [
        b"../outside",
        b"/etc/passwd",
        b"..",
        b".runtime",
        b".stage-keep",
        b"echo\0",
        b"keep/..",
        b"\xff\xfe",
        b"keep\nouter",
    ];
    for body in delete_bodies {
        let r = d.req("DELETE", "/mgmt", body);
        assert_eq!(r.status, 400, "DELETE {body:?}: {r:?}");
        tried += 1;
    }
    let urls = [
        "http://127.0.0.1:1/..%2f..%2foutside%2fhandler.py",
        "http://127.0.0.1:1/%2e%2e.py",
        "http://127.0.0.1:1/a/%2e%2e%2f%2e%2e%2fx.py",
        "file:///etc/passwd.py",
        "FILE:///etc/x.py",
        "gopher://127.0.0.1/x.py",
        "http://127.0.0.1:1/x.py\r\nHost: evil",
        "http://127.0.0.1:1/%00.py",
        "\u{0}http://127.0.0.1:1/x.py",
        "http://127.0.0.1:1/x%ff.py",
    ];
    for url in urls {
        let r = d.req("POST", "/mgmt", url.as_bytes());
        assert_eq!(r.status, 400, "{url:?}: {r:?}");
        tried += 1;
    }
    assert_eq!(
        snapshot(&outside),
        before_outside,
        "outside the functions dir changed"
    );
    assert_eq!(snapshot(&d.dir), before_inside, "the functions dir changed");
    assert_eq!(d.names(), ["echo", "keep"]);
    assert_eq!(d.req("GET", "/keep", b"").text(), "v1\n");
    eprintln!("hostile paths, names and URLs tried: {tried}");
}

#[test]
fn oversized_and_malformed_requests_get_a_4xx_and_the_daemon_serves_on() {
    let d = Daemon::start(&[("EDGEFAAS_MAX_BODY", "10000")]);
    let send = |bytes: &[u8]| {
        let raw = http::raw(d.port, bytes).unwrap_or_default();
        http::parse(&raw).map(|r| r.status).unwrap_or(0)
    };
    let big_header = format!(
        "POST /echo HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let many_headers = format!(
        "POST /echo HTTP/1.1\r\n{}\r\n",
        (0..150)
            .map(|i| format!("X-{i}: v\r\n"))
            .collect::<String>()
    );
    let long_url = format!("GET /echo?{} HTTP/1.1\r\n\r\n", "q".repeat(20_000));
    let endless_line = vec![b'G'; 200_000];
    let cases: Vec<(&str, Vec<u8>, &[u16])> = vec![
        ("20 KB header", big_header.into_bytes(), &[431]),
        ("150 headers", many_headers.into_bytes(), &[431]),
        ("20 KB URL", long_url.into_bytes(), &[431]),
        ("200 KB without a newline", endless_line, &[431]),
        (
            "huge Content-Length",
            b"POST /echo HTTP/1.1\r\nContent-Length: 100000000000\r\nConnection: close\r\n\r\nabc"
                .to_vec(),
            // 413 where it fits usize; 400 on 32-bit ARM, where it is no length at all.
            &[413, 400],
        ),
        (
            "negative Content-Length",
            b"POST /echo HTTP/1.1\r\nContent-Length: -1\r\nConnection: close\r\n\r\n".to_vec(),
            &[400],
        ),
        ("garbage request line", b"GARBAGE\r\n\r\n".to_vec(), &[400]),
        (
            "HTTP/9.9",
            b"GET /echo HTTP/9.9\r\n\r\n".to_vec(),
            &[400, 505],
        ),
        (
            "NUL in the path",
            b"GET /ec\0ho HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(),
            &[400],
        ),
        (
            "non-ASCII header",
            b"GET /echo HTTP/1.1\r\nX-A: \xff\xfe\r\nConnection: close\r\n\r\n".to_vec(),
            &[400],
        ),
        (
            "bad Expect",
            b"POST /echo HTTP/1.1\r\nExpect: nonsense\r\nContent-Length: 1\r\n\r\nx".to_vec(),
            &[417],
        ),
    ];
    for (what, bytes, ok) in &cases {
        let status = send(bytes);
        assert!(ok.contains(&status), "{what}: got {status}");
        assert_eq!(
            d.req("POST", "/echo", b"alive").text(),
            "alive\n",
            "after {what}"
        );
    }
    // A chunked body that never ends is cut at the limit.
    let mut endless =
        b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for _ in 0..100 {
        endless.extend_from_slice(format!("{:x}\r\n{}\r\n", 1000, "z".repeat(1000)).as_bytes());
    }
    assert_eq!(send(&endless), 413);
    // Non-UTF-8 bodies: binary reaches a function intact, a URL install refuses it.
    assert_eq!(d.req("POST", "/mgmt", b"\xff\xfehttp://x/y.py").status, 400);
    eprintln!(
        "oversized and malformed requests tried: {}",
        cases.len() + 2
    );
}

#[test]
fn wrong_malformed_or_missing_tokens_are_401() {
    let d = Daemon::start(&[("EDGEFAAS_MGMT_TOKEN", "t0ken-With-Length-32-xxxxxxxxxx")]);
    let bad: Vec<Vec<(&str, &str)>> = vec![
        vec![],
        vec![("Authorization", "")],
        vec![("Authorization", "Bearer")],
        vec![("Authorization", "Bearer ")],
        vec![("Authorization", "bearer t0ken-With-Length-32-xxxxxxxxxx")],
        vec![("Authorization", "Bearer  t0ken-With-Length-32-xxxxxxxxxx")],
        vec![("Authorization", "Bearer t0ken-With-Length-32-xxxxxxxxxX")],
        vec![("Authorization", "Bearer t0ken-With-Length-32-xxxxxxxxxxx")],
        vec![("Authorization", "Basic dDBrZW4=")],
        vec![("X-Token", "t0ken-With-Length-32-xxxxxxxxxx")],
    ];
    for h in &bad {
        for (method, path, body) in [
            ("GET", "/mgmt", ""),
            ("PUT", "/mgmt/x", V1),
            ("POST", "/mgmt", "http://127.0.0.1:1/x.py"),
            ("DELETE", "/mgmt", "echo"),
        ] {
            let r = d.req_h(method, path, h, body.as_bytes());
            assert_eq!(r.status, 401, "{method} {path} {h:?}: {r:?}");
        }
    }
    assert_eq!(d.dir_entries(), [".runtime", "echo"]);
    eprintln!("bad tokens tried: {}", bad.len() * 4);
}
