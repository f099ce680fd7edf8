//! A keep-alive HTTP/1.1 client for load: one connection reused for many
//! requests, reconnecting if the server closed it. Shared by the soak test and
//! `make bench`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// One keep-alive connection to 127.0.0.1:`port`.
pub struct Client {
    port: u16,
    conn: Option<BufReader<TcpStream>>,
}

impl Client {
    pub fn new(port: u16) -> Client {
        Client { port, conn: None }
    }

    /// Sends one request and returns the status and body; panics after three failed tries.
    pub fn send(&mut self, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        for _ in 0..3 {
            if self.conn.is_none() {
                let s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                s.set_nodelay(true).unwrap();
                self.conn = Some(BufReader::new(s));
            }
            match self.try_send(method, path, body) {
                Ok(answer) => return answer,
                Err(_) => self.conn = None,
            }
        }
        panic!("{method} {path}: connection kept failing");
    }

    /// One attempt: connects if needed; an error drops the connection (the next call reconnects).
    pub fn send_once(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> std::io::Result<(u16, Vec<u8>)> {
        if self.conn.is_none() {
            let s = TcpStream::connect(("127.0.0.1", self.port))?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            s.set_nodelay(true)?;
            self.conn = Some(BufReader::new(s));
        }
        let r = self.try_send(method, path, body);
        if r.is_err() {
            self.conn = None;
        }
        r
    }

    fn try_send(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> std::io::Result<(u16, Vec<u8>)> {
        let r = self.conn.as_mut().expect("connected above");
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        r.get_mut().write_all(head.as_bytes())?;
        r.get_mut().write_all(body)?;
        let mut line = String::new();
        r.read_line(&mut line)?;
        let status = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or(std::io::ErrorKind::InvalidData)?;
        let mut len = 0usize;
        loop {
            line.clear();
            r.read_line(&mut line)?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut answer = vec![0; len];
        r.read_exact(&mut answer)?;
        Ok((status, answer))
    }
}
