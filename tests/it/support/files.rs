//! A small HTTP server on 127.0.0.1 that serves function files for URL
//! installs, plus the misbehaving servers the failure tests need.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the server answers for a path.
#[derive(Clone)]
pub enum Route {
    /// 200 with this body (Content-Length set).
    File(Vec<u8>),
    /// This status with an empty body.
    Status(u16),
    /// A 302 to this location.
    Redirect(String),
    /// Sends headers, then the body one byte every `Duration`.
    Slow(Vec<u8>, Duration),
    /// Chunked body that never ends (bounded by the client).
    Endless,
}

/// A file server running on a background thread for the life of the test process.
pub struct FileServer {
    pub port: u16,
    routes: Arc<Mutex<HashMap<String, Route>>>,
    hits: Arc<Mutex<Vec<String>>>,
}

impl FileServer {
    pub fn start() -> FileServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let routes: Arc<Mutex<HashMap<String, Route>>> = Arc::default();
        let hits: Arc<Mutex<Vec<String>>> = Arc::default();
        let (r, h) = (routes.clone(), hits.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (r, h) = (r.clone(), h.clone());
                std::thread::spawn(move || serve(stream, &r, &h));
            }
        });
        FileServer { port, routes, hits }
    }

    /// Serves `route` at `path`; returns the full URL.
    pub fn route(&self, path: &str, route: Route) -> String {
        self.routes.lock().unwrap().insert(path.to_string(), route);
        self.url(path)
    }

    /// Serves `text` at `path`; returns the full URL.
    pub fn file(&self, path: &str, text: &str) -> String {
        self.route(path, Route::File(text.as_bytes().to_vec()))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Paths requested so far.
    pub fn hits(&self) -> Vec<String> {
        self.hits.lock().unwrap().clone()
    }
}

fn serve(
    mut s: std::net::TcpStream,
    routes: &Mutex<HashMap<String, Route>>,
    hits: &Mutex<Vec<String>>,
) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head);
    let path = head.split(' ').nth(1).unwrap_or("/").to_string();
    hits.lock().unwrap().push(path.clone());
    let route = routes
        .lock()
        .unwrap()
        .get(&path)
        .cloned()
        .unwrap_or(Route::Status(404));
    let _ = match route {
        Route::File(body) => {
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            s.write_all(&body)
        }
        Route::Status(code) => write!(
            s,
            "HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
        Route::Redirect(to) => write!(
            s,
            "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
        Route::Slow(body, every) => {
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            for b in body {
                std::thread::sleep(every);
                if s.write_all(&[b]).is_err() {
                    break;
                }
            }
            Ok(())
        }
        Route::Endless => {
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            );
            let chunk = format!("{:x}\r\n{}\r\n", 4096, "#".repeat(4096));
            // Bounded: at most 1 GiB, and the client hangs up long before.
            for _ in 0..(1 << 18) {
                if s.write_all(chunk.as_bytes()).is_err() {
                    break;
                }
            }
            Ok(())
        }
    };
}
