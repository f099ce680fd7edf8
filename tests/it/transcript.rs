//! The original EdgeFaaS curl session (the seed's contract), step by step
//! through the harness; `readme.rs` runs the README's own session as written.

use crate::support::{Daemon, FileServer};

const AVERAGE: &str = include_str!("../../python/examples/average.py");

#[test]
fn seed_transcript_works_as_written() {
    let d = Daemon::start(&[]);
    let files = FileServer::start();
    let url = files.file("/sample_functions/average.py", AVERAGE);

    let r = d.req("POST", "/echo", b"Welcome to EdgeFaaS!");
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "Welcome to EdgeFaaS!\n")
    );

    let r = d.req("GET", "/mgmt", b"");
    assert_eq!((r.status, r.text().as_str()), (200, "echo\n"));
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));

    let r = d.req("POST", "/mgmt", url.as_bytes());
    assert_eq!(
        (r.status, r.text().as_str()),
        (201, "average.py has been created\n")
    );

    let r = d.req("POST", "/average", b"0,1,1");
    assert_eq!((r.status, r.text().as_str()), (200, "0.6666666666666666\n"));

    let r = d.req("DELETE", "/mgmt", b"average");
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "average has been deleted\n")
    );

    let r = d.req("DELETE", "/mgmt", b"echo");
    assert_eq!(
        (r.status, r.text().as_str()),
        (403, "echo is the default function and cannot be changed\n")
    );
    assert_eq!(d.names(), ["echo"]);
    assert_eq!(d.req("POST", "/average", b"1").status, 404);
}
