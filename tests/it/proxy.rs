//! Behind a real reverse proxy: nginx on loopback, keeping upstream connections
//! alive and refusing `/mgmt` itself, as a deployment that trusts the proxy to
//! guard management would. Requests smuggled inside bodies must never reach
//! `/mgmt`, and no client may ever receive another client's answer.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support::{Daemon, TempDir, eventually, free_port, http, keepalive::Client};

/// nginx, from the distribution's package, running in the foreground.
struct Nginx {
    child: Child,
    port: u16,
    _dir: TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // The master and its workers: nginx's own process group (a killed master
        // leaves its workers running).
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The nginx binary, or `None` (a failure under CI=true, where .ci/run installs it).
fn nginx_binary() -> Option<PathBuf> {
    let found = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    if found.is_none() {
        assert!(
            std::env::var("CI").is_err(),
            "nginx is not installed, and CI=true: .ci/run must install it"
        );
        eprintln!("skipped: nginx is not installed (apt-get install nginx-light)");
    }
    found
}

fn start_nginx(upstream: u16) -> Option<Nginx> {
    let bin = nginx_binary()?;
    let dir = TempDir::new("nginx");
    let p = |f: &str| dir.path().join(f).display().to_string();
    for sub in ["body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
    }
    let port = free_port();
    let user = if crate::support::euid() == 0 {
        "user root;\n"
    } else {
        ""
    };
    let conf = format!(
        "{user}daemon off;\nworker_processes 1;\npid {pid};\nerror_log {err} warn;\n\
         events {{ worker_connections 256; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {body};\n  proxy_temp_path {proxy};\n\
           fastcgi_temp_path {fcgi};\n  uwsgi_temp_path {uwsgi};\n  scgi_temp_path {scgi};\n\
           client_max_body_size 10m;\n\
           upstream edgefaas {{ server 127.0.0.1:{upstream}; keepalive 4; }}\n\
           server {{\n    listen 127.0.0.1:{port};\n\
             location /mgmt {{ return 403; }}\n\
             location / {{\n      proxy_pass http://edgefaas;\n      proxy_http_version 1.1;\n\
               proxy_set_header Connection \"\";\n      proxy_buffering off;\n    }}\n  }}\n}}\n",
        pid = p("nginx.pid"),
        err = p("error.log"),
        body = p("body"),
        proxy = p("proxy"),
        fcgi = p("fastcgi"),
        uwsgi = p("uwsgi"),
        scgi = p("scgi"),
    );
    let conf_path = dir.path().join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    use std::os::unix::process::CommandExt;
    let child = Command::new(bin)
        .process_group(0)
        .arg("-e")
        .arg(p("error.log"))
        .arg("-p")
        .arg(dir.path())
        .arg("-c")
        .arg(&conf_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start nginx");
    let nginx = Nginx {
        child,
        port,
        _dir: dir,
    };
    let up = eventually(Duration::from_secs(10), || {
        http::try_request(port, "GET", "/_/health", &[], b"").is_ok_and(|r| r.status == 200)
    });
    assert!(up, "nginx did not come up: {}", error_log(&nginx));
    Some(nginx)
}

fn error_log(n: &Nginx) -> String {
    std::fs::read_to_string(n._dir.path().join("error.log")).unwrap_or_default()
}

/// A request that would install `pwned` if it were ever parsed as one.
fn smuggled() -> String {
    let src = "def handle(req):\n    return 'pwned'\n";
    format!(
        "PUT /mgmt/pwned HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{src}",
        src.len()
    )
}

/// The attacks, each as raw bytes sent to nginx.
fn attacks() -> Vec<(&'static str, Vec<u8>)> {
    let inner = smuggled();
    let pad = "p".repeat(70_000);
    let long = format!("{pad}{inner}");
    let chunked = |s: &str| format!("{:x}\r\n{s}\r\n0\r\n\r\n", s.len());
    let body =
        |head: &str, b: &str| format!("{head}Content-Length: {}\r\n\r\n{b}", b.len()).into_bytes();
    vec![
        ("early answer, body past 64 KiB", body("POST /_/health HTTP/1.1\r\nHost: p\r\n", &long)),
        ("404 with a large body", body("POST /nosuch HTTP/1.1\r\nHost: p\r\n", &long)),
        ("GET with a body", body("GET /echo HTTP/1.1\r\nHost: p\r\n", &inner)),
        ("over EDGEFAAS_MAX_BODY", body("POST /echo HTTP/1.1\r\nHost: p\r\n", &"q".repeat(200_000))),
        (
            "chunked on a 404",
            format!("POST /nosuch HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n{}", chunked(&inner)).into_bytes(),
        ),
        (
            "CL and TE",
            format!("POST /echo HTTP/1.1\r\nHost: p\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n{}", chunked(&inner)).into_bytes(),
        ),
        (
            "two Content-Lengths",
            format!("POST /echo HTTP/1.1\r\nHost: p\r\nContent-Length: 0\r\nContent-Length: {}\r\n\r\n{inner}", inner.len()).into_bytes(),
        ),
        (
            "TE gzip",
            format!("POST /echo HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: gzip, chunked\r\n\r\n{}", chunked(&inner)).into_bytes(),
        ),
        (
            "Expect: 100-continue, large",
            format!("POST /_/metrics HTTP/1.1\r\nHost: p\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n{long}", long.len()).into_bytes(),
        ),
        (
            "direct /mgmt",
            b"PUT /mgmt/pwned HTTP/1.1\r\nHost: p\r\nContent-Length: 2\r\n\r\nxx".to_vec(),
        ),
        (
            "scheme inside the path",
            format!("PUT /x://y/mgmt/pwned HTTP/1.1\r\nHost: p\r\nContent-Length: {}\r\n\r\n{inner}", inner.len()).into_bytes(),
        ),
        (
            "scheme inside the path, listing",
            b"GET /a://b/mgmt HTTP/1.1\r\nHost: p\r\n\r\n".to_vec(),
        ),
        (
            "dot segments",
            format!("PUT /x/../mgmt/pwned HTTP/1.1\r\nHost: p\r\nContent-Length: {}\r\n\r\n{inner}", inner.len()).into_bytes(),
        ),
        (
            "double slash",
            format!("PUT //mgmt/pwned HTTP/1.1\r\nHost: p\r\nContent-Length: {}\r\n\r\n{inner}", inner.len()).into_bytes(),
        ),
        (
            "encoded /mgmt",
            format!("PUT /%6dgmt/pwned HTTP/1.1\r\nHost: p\r\nContent-Length: {}\r\n\r\n{inner}", inner.len()).into_bytes(),
        ),
    ]
}

fn send_raw(port: u16, bytes: &[u8]) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(15)));
    let _ = s.write_all(bytes);
    let _ = s.shutdown(Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn smuggling_through_nginx_never_reaches_mgmt_and_answers_never_cross() {
    let d = Daemon::start(&[("EDGEFAAS_MAX_BODY", "100000")]);
    let Some(nginx) = start_nginx(d.port) else {
        return;
    };
    let port = nginx.port;
    // Honest clients, each with its own bodies, on keep-alive connections to nginx.
    let honest: Vec<_> = (0..6)
        .map(|c| {
            std::thread::spawn(move || {
                let mut client = Client::new(port);
                let mut crossed = Vec::new();
                for i in 0..150 {
                    let body = format!("client {c} request {i}");
                    let (status, answer) = client.send("POST", "/echo", body.as_bytes());
                    if status != 200 || answer != format!("{body}\n").into_bytes() {
                        crossed.push(format!("{status} {:?}", String::from_utf8_lossy(&answer)));
                    }
                }
                crossed
            })
        })
        .collect();
    // Attackers beside them, on the same upstream connections.
    let attackers: Vec<_> = (0..3)
        .map(|_| {
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                for _ in 0..5 {
                    for (what, bytes) in attacks() {
                        let answer = send_raw(port, &bytes);
                        seen.push((what, answer.lines().next().unwrap_or("").to_string()));
                    }
                }
                seen
            })
        })
        .collect();
    for a in attackers {
        for (what, status) in a.join().unwrap() {
            assert!(!status.contains(" 201 "), "{what}: {status}");
            if what.contains("listing") {
                assert!(!status.contains(" 200 "), "{what}: {status}");
            }
        }
    }
    // Nothing reached /mgmt: no install, and no /mgmt line in the daemon's access log.
    assert_eq!(d.names(), ["echo"], "log:\n{}", d.log());
    // The test's own listing above is the only GET; nothing else may have reached /mgmt.
    let log = d.log();
    let reached: Vec<String> = log
        .lines()
        .filter(|l| l.contains("access") && !l.contains(" GET /mgmt "))
        .filter(|l| {
            // The target's first segment is what routes; a 400 for a sneaky path did not reach it.
            let url = l.split_whitespace().nth(4).unwrap_or("");
            let path = ["http://", "https://"]
                .iter()
                .find_map(|s| url.strip_prefix(s))
                .map_or(url, |rest| rest.find('/').map_or("/", |i| &rest[i..]));
            path == "/mgmt" || path.starts_with("/mgmt/") || path.starts_with("/mgmt?")
        })
        .map(|l| {
            l.chars()
                .rev()
                .take(80)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect()
        })
        .collect();
    assert!(reached.is_empty(), "{reached:#?}");
    assert!(!Path::new(&d.dir.join("pwned")).exists());
    for h in honest {
        let crossed = h.join().unwrap();
        assert!(
            crossed.is_empty(),
            "{} answers crossed or failed, first: {:?}\nnginx: {}",
            crossed.len(),
            &crossed[..crossed.len().min(3)],
            error_log(&nginx)
        );
    }
}
