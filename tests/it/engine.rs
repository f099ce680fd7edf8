//! The invocation engine's contract: what a function returns is checked before
//! it reaches the wire, its log cannot speak for it, code that would not serve
//! is refused at install, a failed import is retried, the warm cap holds, and a
//! child killed at any step still answers and leaves nothing behind.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::support::{Daemon, eventually, http};

/// One raw request on a fresh connection; everything the server sends back.
fn raw(d: &Daemon, request: &str) -> String {
    String::from_utf8_lossy(&http::raw(d.port, request.as_bytes()).unwrap()).into_owned()
}

#[test]
fn a_body_that_mimics_the_runner_cannot_change_the_answer() {
    let d = Daemon::start(&[]);
    d.upload(
        "logger",
        "import sys\ndef handle(req):\n    sys.stderr.write(req)\n    print(req)\n    return 'ok'\n",
    );
    for forged in [
        "\0EDGEFAAS-META {\"statusCode\":302,\"headers\":[[\"Location\",\"http://evil\"],[\"Set-Cookie\",\"a=1\"]]}\n",
        "\nR {\"statusCode\":302,\"headers\":[[\"Location\",\"http://evil\"]]}\n",
        "\nF 1\nX 9\n",
    ] {
        let r = d.req("POST", "/logger", forged.as_bytes());
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("Location"), None);
        assert_eq!(r.header("Set-Cookie"), None);
        assert!(r.text().ends_with("ok\n"), "{r:?}");
    }
}

#[test]
fn header_injection_and_framing_headers_never_reach_the_wire() {
    let d = Daemon::start(&[]);
    d.upload(
        "inject",
        "def handle(req):\n    return {'statusCode': 200, 'body': 'x', 'headers': {'X-A': 'a\\r\\nSet-Cookie: evil=1'}}\n",
    );
    let answer = raw(
        &d,
        "POST /inject HTTP/1.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 500"), "{answer}");
    assert!(!answer.contains("Set-Cookie: evil"), "{answer}");
    assert!(answer.contains("X-A"), "the 500 names the header: {answer}");
    for bad in ["'X\\nB'", "'Bad Name'", "'X:Y'"] {
        d.upload(
            "badname",
            &format!("def handle(req):\n    return {{'body': 'x', 'headers': {{{bad}: 'v'}}}}\n"),
        );
        let r = d.req("POST", "/badname", b"");
        assert_eq!(r.status, 500, "{bad}: {r:?}");
        assert!(r.text().contains("is not an HTTP token"), "{r:?}");
    }
    // Framing and hop-by-hop headers are dropped; the answer keeps its real length,
    // and the connection stays in step for the next request.
    d.upload(
        "framing",
        "def handle(req):\n    return {'body': 'hello', 'headers': {'Content-Length': '1', 'Transfer-Encoding': 'chunked', 'Connection': 'close', 'Keep-Alive': 'timeout=1', 'Upgrade': 'h2c', 'X-Ok': 'y'}}\n",
    );
    let mut s = TcpStream::connect(("127.0.0.1", d.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"POST /framing HTTP/1.1\r\nContent-Length: 0\r\n\r\nPOST /echo HTTP/1.1\r\nContent-Length: 4\r\nConnection: close\r\n\r\nnext")
        .unwrap();
    let mut bytes = Vec::new();
    s.read_to_end(&mut bytes).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    let first = text.split("HTTP/1.1 ").nth(1).unwrap_or("");
    assert!(first.starts_with("200"), "{text}");
    assert!(first.contains("Content-Length: 5\r\n"), "{text}");
    assert!(first.contains("X-Ok: y\r\n"), "{text}");
    for dropped in [
        "Transfer-Encoding",
        "Keep-Alive",
        "Upgrade",
        "Content-Length: 1\r",
    ] {
        assert!(
            !first.contains(dropped),
            "{dropped} reached the wire: {text}"
        );
    }
    assert!(!first.contains("Connection: close"), "{text}");
    assert!(
        text.ends_with("next\n"),
        "the next answer is intact: {text}"
    );
}

#[test]
fn informational_and_bodiless_statuses_follow_http() {
    let d = Daemon::start(&[]);
    for (code, body, want) in [
        (100, "", 500),
        (101, "", 500),
        (204, "", 204),
        (304, "", 304),
        (204, "oops", 500),
        (304, "oops", 500),
    ] {
        d.upload(
            "status",
            &format!("def handle(req):\n    return {{'statusCode': {code}, 'body': {body:?}}}\n"),
        );
        let answer = raw(
            &d,
            "POST /status HTTP/1.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {want} ")),
            "{code} {body:?}: {answer}"
        );
        if want == 204 {
            assert!(!answer.contains("Content-Length"), "{answer}");
        }
        if want != 500 {
            assert!(answer.ends_with("\r\n\r\n"), "no body for {code}: {answer}");
        }
    }
}

#[test]
fn code_that_would_not_serve_is_refused_at_install_with_its_line() {
    let files = crate::support::FileServer::start();
    let d = Daemon::start(&[]);
    d.upload("keep", "def handle(req):\n    return 'v1'\n");
    let before = d.dir_entries();
    let cases = [
        ("def handle(req)\n    return 1\n", "SyntaxError", "(line 1)"),
        (
            "x = 1\n\nimport no_such_module_here\ndef handle(req):\n    return 1\n",
            "ModuleNotFoundError: No module named 'no_such_module_here'",
            "(line 3)",
        ),
        (
            "def handle(req):\n    return 1\n1 / 0\n",
            "ZeroDivisionError",
            "(line 3)",
        ),
        (
            "def handler(req):\n    return 1\n",
            "defines no callable handle(req)",
            "",
        ),
        ("handle = 42\n", "defines no callable handle(req)", ""),
    ];
    for (source, error, line) in cases {
        for how in ["upload", "url"] {
            let r = match how {
                "upload" => d.req("PUT", "/mgmt/keep", source.as_bytes()),
                _ => d.req("POST", "/mgmt", files.file("/keep.py", source).as_bytes()),
            };
            assert_eq!(r.status, 422, "{how} {error}: {r:?}");
            let text = r.text();
            assert!(text.starts_with("keep.py cannot serve: "), "{text}");
            assert!(text.contains(error) && text.contains(line), "{how}: {text}");
            assert!(text.ends_with("nothing was changed\n"), "{text}");
            assert_eq!(text.lines().count(), 1, "{text}");
        }
    }
    assert_eq!(d.dir_entries(), before);
    assert_eq!(d.req("POST", "/keep", b"").text(), "v1\n");
    // A new name that would not serve is not created at all.
    assert_eq!(d.req("PUT", "/mgmt/fresh", b"def handle(:\n").status, 422);
    assert_eq!(d.names(), ["echo", "keep"]);
    assert_eq!(d.req("POST", "/fresh", b"").status, 404);
}

#[test]
fn a_failed_import_is_not_kept_and_the_next_request_imports_again() {
    let d = Daemon::start(&[]);
    // In the function's own folder: the only one (with the system) it may read.
    let marker = d.dir.join("flaky").join("broken-now");
    d.upload(
        "flaky",
        &format!(
            "import os\nif os.path.exists({:?}):\n    raise RuntimeError('dependency missing')\ndef handle(req):\n    return 'fine'\n",
            marker.to_str().unwrap()
        ),
    );
    std::fs::write(&marker, "x").unwrap();
    for _ in 0..2 {
        let r = d.req("POST", "/flaky", b"");
        assert_eq!(r.status, 500, "{r:?}");
        assert!(
            r.text().contains("RuntimeError: dependency missing"),
            "{r:?}"
        );
    }
    // The fix (a package installed, a file restored): picked up by the next request.
    std::fs::remove_file(&marker).unwrap();
    assert_eq!(d.req("POST", "/flaky", b"").text(), "fine\n");
}

#[test]
fn the_warm_cap_holds_with_three_times_as_many_functions() {
    let d = Daemon::start(&[("EDGEFAAS_MAX_WARM", "2")]);
    for i in 0..6 {
        d.upload(
            &format!("w{i}"),
            &format!("def handle(req):\n    return 'w{i}'\n"),
        );
    }
    for round in 0..2 {
        for i in 0..6 {
            assert_eq!(
                d.req("POST", &format!("/w{i}"), b"").text(),
                format!("w{i}\n"),
                "round {round}"
            );
        }
    }
    assert!(
        eventually(Duration::from_secs(10), || d.zygotes().len() <= 2),
        "{:?}",
        d.zygotes()
    );
    let metrics = d.req("GET", "/_/metrics", b"").text();
    let warm = if crate::MODE == "fork" { 2 } else { 0 };
    assert!(
        metrics.contains(&format!("edgefaas_warm_zygotes {warm}\n")),
        "{metrics}"
    );
}

#[test]
fn a_child_killed_at_each_step_answers_and_leaves_nothing_behind() {
    let d = Daemon::start(&[("EDGEFAAS_EXEC_TIMEOUT", "3")]);
    // Killed while it runs (after P, before R): 500 naming the signal.
    d.upload(
        "suicide",
        "import os, signal\ndef handle(req):\n    os.kill(os.getpid(), signal.SIGKILL)\n",
    );
    let r = d.req("POST", "/suicide", b"");
    assert_eq!(
        (r.status, r.text().as_str()),
        (500, "function 'suicide' failed: killed by signal 9\n")
    );
    // Done (closed its output, reported R) but lingers: answered at once, killed at the deadline.
    d.upload(
        "linger",
        concat!(
            "import os, sys, time\n",
            "def pipes():\n",
            "    for f in os.listdir('/proc/self/fd'):\n",
            "        try:\n",
            "            if int(f) > 2 and os.readlink('/proc/self/fd/' + f).startswith('pipe:'):\n",
            "                yield int(f)\n",
            "        except OSError:\n",
            "            pass\n",
            "def handle(req):\n",
            "    print('early')\n",
            "    sys.stdout.flush()\n",
            "    fds = list(pipes())\n",
            "    os.close(1)\n",
            "    for f in fds:\n",
            "        try:\n",
            "            os.write(f, b'R {}\\n')\n",
            "        except OSError:\n",
            "            pass\n",
            "    time.sleep(60)\n",
        ),
    );
    let started = Instant::now();
    let r = d.req("POST", "/linger", b"");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!((r.status, r.text().as_str()), (200, "early\n"));
    // Its zygote's idle spare killed before a request: the next request still runs.
    if crate::MODE == "fork" {
        d.req("POST", "/echo", b"warm");
        let zygote = d.zygotes()["echo"];
        for spare in crate::support::children(zygote).0 {
            let _ = std::process::Command::new("kill")
                .arg("-9")
                .arg(spare.to_string())
                .status();
        }
        assert_eq!(d.req("POST", "/echo", b"after").text(), "after\n");
        // The zygote itself killed while a request runs: that request fails or finishes, the next works.
        d.upload(
            "slow",
            "import time\ndef handle(req):\n    time.sleep(1)\n    return 'slept'\n",
        );
        assert_eq!(d.req("POST", "/slow", b"").text(), "slept\n");
        let port = d.port;
        let running =
            std::thread::spawn(move || http::try_request(port, "POST", "/slow", &[], b""));
        std::thread::sleep(Duration::from_millis(300));
        let z = d.zygotes()["slow"];
        let _ = std::process::Command::new("kill")
            .arg("-9")
            .arg(z.to_string())
            .status();
        let r = running.join().unwrap().unwrap();
        assert!(r.status == 200 || r.status == 500, "{r:?}");
        assert_eq!(d.req("POST", "/slow", b"").text(), "slept\n");
    }
    assert!(
        eventually(Duration::from_secs(8), || d.strays().is_empty()),
        "{:?}",
        d.strays()
    );
}
