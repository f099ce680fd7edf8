//! The management API: list, install by URL and upload, delete, pins, limits, auth.

use std::time::Duration;

use crate::support::{Daemon, FileServer, files::Route};

const AVERAGE: &str = include_str!("../../python/examples/average.py");
const V1: &str = "def handle(req):\n    return 'v1'\n";
const V2: &str = "def handle(req):\n    return 'v2'\n";

/// Asserts the functions dir holds exactly these entries (plus the runtime).
fn assert_dir(d: &Daemon, names: &[&str]) {
    let mut expected: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    expected.push(".runtime".into());
    expected.sort();
    assert_eq!(d.dir_entries(), expected, "functions dir");
}

#[test]
fn upload_creates_then_updates_and_the_new_code_serves() {
    let d = Daemon::start(&[]);
    let r = d.req("PUT", "/mgmt/ver", V1.as_bytes());
    assert_eq!(
        (r.status, r.text().as_str()),
        (201, "ver.py has been created\n")
    );
    assert_eq!(d.req("GET", "/ver", b"").text(), "v1\n");
    let r = d.req("PUT", "/mgmt/ver.py", V2.as_bytes());
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "ver.py has been updated\n")
    );
    assert_eq!(d.req("GET", "/ver", b"").text(), "v2\n");
    assert_eq!(
        std::fs::read_to_string(d.dir.join("ver/handler.py")).unwrap(),
        V2
    );
    assert_dir(&d, &["echo", "ver"]);
}

#[test]
fn url_install_replaces_an_existing_function() {
    let d = Daemon::start(&[]);
    let files = FileServer::start();
    let url = files.file("/f/ver.py", V1);
    assert_eq!(d.req("POST", "/mgmt", url.as_bytes()).status, 201);
    files.file("/f/ver.py", V2);
    let r = d.req("POST", "/mgmt", format!("{url}\n").as_bytes());
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "ver.py has been updated\n")
    );
    assert_eq!(d.req("GET", "/ver", b"").text(), "v2\n");
}

#[test]
fn listing_is_echo_first_then_sorted() {
    let d = Daemon::start(&[]);
    for n in ["zeta", "Alpha", "beta", "0x", "a_b", "a-b"] {
        d.upload(n, V1);
    }
    assert_eq!(
        d.names(),
        ["echo", "0x", "Alpha", "a-b", "a_b", "beta", "zeta"]
    );
}

#[test]
fn sha256_pin_installs_only_matching_bytes() {
    let d = Daemon::start(&[]);
    let files = FileServer::start();
    let url = files.file("/average.py", AVERAGE);
    let good = sha256(AVERAGE);
    let r = d.req(
        "POST",
        "/mgmt",
        format!("{url}#sha256={}", "0".repeat(64)).as_bytes(),
    );
    assert_eq!(r.status, 400, "{r:?}");
    assert!(
        r.text().starts_with("sha256 mismatch: expected 0000"),
        "{r:?}"
    );
    assert_eq!(d.names(), ["echo"]);
    assert_dir(&d, &["echo"]);
    let r = d.req("POST", "/mgmt", format!("{url}#sha256={good}").as_bytes());
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(d.req("POST", "/average", b"2,4").text(), "3.0\n");
}

/// sha256 of a string, by Python (independent of the daemon's implementation).
fn sha256(text: &str) -> String {
    let out = std::process::Command::new(crate::support::python())
        .args([
            "-c",
            "import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(text.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn bad_urls_are_400_and_change_nothing() {
    let d = Daemon::start(&[]);
    d.upload("keep", V1);
    for (url, why) in [
        ("file:///etc/passwd.py", "only http and https"),
        ("ftp://127.0.0.1/x.py", "only http and https"),
        ("http://127.0.0.1/notes.txt", "no file name ending in .py"),
        ("http://127.0.0.1/", "no file name ending in .py"),
        ("just words", "not a URL"),
        ("http://127.0.0.1/_x.py", "invalid function name"),
        (
            "http://127.0.0.1/keep.py#sha256=xyz",
            "#sha256= needs 64 hex digits",
        ),
    ] {
        let r = d.req("POST", "/mgmt", url.as_bytes());
        assert_eq!(r.status, 400, "{url}: {r:?}");
        assert!(r.text().contains(why), "{url}: {r:?}");
    }
    assert_eq!(d.names(), ["echo", "keep"]);
    assert_dir(&d, &["echo", "keep"]);
}

#[test]
fn failed_downloads_name_the_cause_and_change_nothing() {
    let d = Daemon::start(&[
        ("EDGEFAAS_FETCH_TIMEOUT", "1"),
        ("EDGEFAAS_MAX_FUNCTION_SIZE", "1000"),
    ]);
    let files = FileServer::start();
    d.upload("keep", V1);
    // Each installs `keep` if it went wrong, so a leak would show as a changed function.
    let missing = files.url("/keep.py");
    let gone = files.route("/gone/keep.py", Route::Status(500));
    let loop_a = files.route(
        "/loop/keep.py",
        Route::Redirect(files.url("/loop2/keep.py")),
    );
    files.route("/loop2/keep.py", Route::Redirect(loop_a.clone()));
    let to_file = files.route(
        "/tofile/keep.py",
        Route::Redirect("file:///etc/passwd".into()),
    );
    let slow = files.route(
        "/slow/keep.py",
        Route::Slow(V2.as_bytes().to_vec(), Duration::from_millis(200)),
    );
    let big = files.route("/big/keep.py", Route::File(vec![b'#'; 1001]));
    let endless = files.route("/endless/keep.py", Route::Endless);
    let closed = format!("http://127.0.0.1:{}/keep.py", crate::support::free_port());
    for (url, status, why) in [
        (
            missing.as_str(),
            502,
            "download failed: server answered HTTP 404",
        ),
        (
            gone.as_str(),
            502,
            "download failed: server answered HTTP 500",
        ),
        (
            loop_a.as_str(),
            502,
            "download failed: more than 5 redirects",
        ),
        (to_file.as_str(), 502, "download failed"),
        (closed.as_str(), 502, "download failed"),
        (slow.as_str(), 504, "download timed out"),
        (
            big.as_str(),
            413,
            "keep.py is larger than EDGEFAAS_MAX_FUNCTION_SIZE (1000 bytes)",
        ),
        (
            endless.as_str(),
            413,
            "keep.py is larger than EDGEFAAS_MAX_FUNCTION_SIZE (1000 bytes)",
        ),
    ] {
        let r = d.req("POST", "/mgmt", url.as_bytes());
        assert_eq!(r.status, status, "{url}: {r:?}");
        assert!(r.text().starts_with(why), "{url}: {r:?}");
        assert_eq!(r.text().lines().count(), 1, "one line: {r:?}");
        assert_eq!(d.req("GET", "/keep", b"").text(), "v1\n", "after {url}");
        assert_dir(&d, &["echo", "keep"]);
    }
}

#[test]
fn upload_over_the_size_limit_is_413_and_changes_nothing() {
    let d = Daemon::start(&[("EDGEFAAS_MAX_FUNCTION_SIZE", "100")]);
    let big = format!("{V1}#{}\n", "x".repeat(100));
    let r = d.req("PUT", "/mgmt/big", big.as_bytes());
    assert_eq!(
        (r.status, r.text().as_str()),
        (
            413,
            "request body is larger than EDGEFAAS_MAX_FUNCTION_SIZE (100 bytes)\n"
        )
    );
    assert_dir(&d, &["echo"]);
}

#[test]
fn echo_cannot_be_written_or_deleted() {
    let d = Daemon::start(&[]);
    let files = FileServer::start();
    let url = files.file("/echo.py", V1);
    let protected = "echo is the default function and cannot be changed\n";
    for (method, path, body) in [
        ("PUT", "/mgmt/echo", V1.as_bytes()),
        ("POST", "/mgmt", url.as_bytes()),
        ("DELETE", "/mgmt", b"echo".as_slice()),
        ("DELETE", "/mgmt/echo", b"".as_slice()),
    ] {
        let r = d.req(method, path, body);
        assert_eq!(
            (r.status, r.text().as_str()),
            (403, protected),
            "{method} {path}"
        );
    }
    assert!(files.hits().is_empty(), "no download for a refused install");
    assert_eq!(d.req("POST", "/echo", b"same").text(), "same\n");
}

#[test]
fn delete_removes_and_unknown_is_404() {
    let d = Daemon::start(&[]);
    d.upload("gone", V1);
    let r = d.req("DELETE", "/mgmt", b"gone\n");
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "gone has been deleted\n")
    );
    assert_dir(&d, &["echo"]);
    let r = d.req("DELETE", "/mgmt", b"gone");
    assert_eq!(
        (r.status, r.text().as_str()),
        (404, "function 'gone' not found\n")
    );
    assert_eq!(d.req("DELETE", "/mgmt", b"../etc").status, 400);
    d.upload("gone2", V1);
    assert_eq!(d.req("DELETE", "/mgmt/gone2", b"").status, 200);
}

#[test]
fn reserved_and_invalid_names_are_refused_on_upload() {
    let d = Daemon::start(&[]);
    for path in [
        "/mgmt/_x",
        "/mgmt/mgmt",
        "/mgmt/a.b",
        "/mgmt/..",
        "/mgmt/%2e%2e",
        "/mgmt/a/b",
    ] {
        let r = d.req("PUT", path, V1.as_bytes());
        assert_eq!(r.status, 400, "{path}: {r:?}");
        assert!(
            r.text().starts_with("invalid function name"),
            "{path}: {r:?}"
        );
    }
    assert_dir(&d, &["echo"]);
}

#[test]
fn unsupported_methods_are_405_with_allow() {
    let d = Daemon::start(&[]);
    let r = d.req("PATCH", "/mgmt", b"");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, POST, DELETE"));
}

#[test]
fn token_guards_mgmt_but_not_invocations() {
    let d = Daemon::start(&[("EDGEFAAS_MGMT_TOKEN", "s3cret")]);
    let wrong = [
        vec![],
        vec![("Authorization", "Bearer nope")],
        vec![("Authorization", "Bearer s3cre")],
        vec![("Authorization", "Bearer s3cret2")],
        vec![("Authorization", "s3cret")],
        vec![("Authorization", "Basic s3cret")],
    ];
    for headers in &wrong {
        for (method, path) in [("GET", "/mgmt"), ("PUT", "/mgmt/x"), ("DELETE", "/mgmt")] {
            let r = d.req_h(method, path, headers, V1.as_bytes());
            assert_eq!(
                (r.status, r.text().as_str()),
                (401, "missing or wrong bearer token for /mgmt\n"),
                "{headers:?}"
            );
        }
    }
    let ok = [("Authorization", "Bearer s3cret")];
    assert_eq!(d.req_h("PUT", "/mgmt/x", &ok, V1.as_bytes()).status, 201);
    assert_eq!(d.req_h("GET", "/mgmt", &ok, b"").text(), "echo\nx\n");
    assert_eq!(d.req("GET", "/x", b"").text(), "v1\n");
    assert_eq!(d.req("GET", "/_/health", b"").status, 200);
    assert!(!d.log().contains("EDGEFAAS_MGMT_TOKEN is not set"));
}

#[test]
fn open_mgmt_warns_at_start_up() {
    let d = Daemon::start(&[]);
    assert!(d.log().contains("EDGEFAAS_MGMT_TOKEN is not set"));
}
