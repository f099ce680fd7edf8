//! The broker connection: plain TCP, or TLS with rustls over a blocking
//! socket, read only when `poll` says the socket is readable.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;

/// Where the broker is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl Endpoint {
    /// `mqtt://host[:port]` (1883) or `mqtts://host[:port]` (8883).
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("mqtt://") {
            (false, r)
        } else if let Some(r) = url.strip_prefix("mqtts://") {
            (true, r)
        } else {
            return Err("mqtt://host[:port] or mqtts://host[:port]".into());
        };
        let rest = rest.trim_end_matches('/');
        if rest.is_empty() || rest.contains(['/', '@', '?', '#']) {
            return Err("mqtt://host[:port] or mqtts://host[:port] (credentials go in EDGEFAAS_MQTT_USERNAME and EDGEFAAS_MQTT_PASSWORD_FILE)".into());
        }
        let default = if tls { 8883 } else { 1883 };
        let (host, port) = match rest.rsplit_once(':') {
            // [v6]:port, host:port
            Some((h, p)) if !h.ends_with(':') && p.chars().all(|c| c.is_ascii_digit()) => (
                h.trim_start_matches('[').trim_end_matches(']').to_string(),
                p.parse()
                    .map_err(|_| "a port from 1 to 65535".to_string())?,
            ),
            _ => (
                rest.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string(),
                default,
            ),
        };
        Ok(Endpoint { host, port, tls })
    }
}

/// An open connection.
pub enum Transport {
    Plain(TcpStream),
    Tls(Box<rustls::ClientConnection>, TcpStream),
}

/// TLS settings: the roots to trust.
pub fn tls_config(ca: Option<&std::path::Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let files: Vec<std::path::PathBuf> = match ca {
        Some(p) => vec![p.to_path_buf()],
        None => [
            "/etc/ssl/certs/ca-certificates.crt",
            "/etc/ssl/cert.pem",
            "/etc/pki/tls/certs/ca-bundle.crt",
        ]
        .iter()
        .map(std::path::PathBuf::from)
        .filter(|p| p.exists())
        .take(1)
        .collect(),
    };
    for file in &files {
        let certs = CertificateDer::pem_file_iter(file)
            .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        for cert in certs.flatten() {
            let _ = roots.add(cert);
        }
    }
    if roots.is_empty() {
        if ca.is_some() {
            return Err("EDGEFAAS_MQTT_CA holds no certificate".into());
        }
        // No system bundle (a minimal image): the Mozilla roots built in.
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

impl Transport {
    /// Connects (and for TLS, shakes hands) within `timeout`.
    pub fn connect(
        ep: &Endpoint,
        tls: Option<&Arc<rustls::ClientConfig>>,
        timeout: Duration,
    ) -> io::Result<Transport> {
        use std::net::ToSocketAddrs;
        let mut last = io::Error::other("no address");
        let mut sock = None;
        for addr in (ep.host.as_str(), ep.port).to_socket_addrs()? {
            match TcpStream::connect_timeout(&addr, timeout) {
                Ok(s) => {
                    sock = Some(s);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let sock = sock.ok_or(last)?;
        sock.set_nodelay(true)?;
        sock.set_read_timeout(Some(timeout))?;
        sock.set_write_timeout(Some(timeout))?;
        match (ep.tls, tls) {
            (false, _) => Ok(Transport::Plain(sock)),
            (true, Some(config)) => {
                let name = rustls::pki_types::ServerName::try_from(ep.host.clone())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                let mut conn = rustls::ClientConnection::new(config.clone(), name)
                    .map_err(io::Error::other)?;
                let mut sock = sock;
                while conn.is_handshaking() {
                    conn.complete_io(&mut sock)?;
                }
                Ok(Transport::Tls(Box::new(conn), sock))
            }
            (true, None) => Err(io::Error::other("mqtts:// without a TLS configuration")),
        }
    }

    /// The socket, for poll.
    pub fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Transport::Plain(s) | Transport::Tls(_, s) => s.as_fd(),
        }
    }

    /// After the connect's bounded handshake: reads wait for poll, writes may block a while.
    pub fn set_io_timeouts(&self, write: Duration) -> io::Result<()> {
        let s = match self {
            Transport::Plain(s) | Transport::Tls(_, s) => s,
        };
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.set_write_timeout(Some(write))
    }

    /// Reads what arrived (call when poll says readable); `Ok(0)` is the end.
    pub fn read_into(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        match self {
            Transport::Plain(s) => {
                let n = s.read(&mut chunk)?;
                buf.extend_from_slice(&chunk[..n]);
                Ok(n)
            }
            Transport::Tls(conn, s) => {
                let n = conn.read_tls(s)?;
                if n == 0 {
                    return Ok(0);
                }
                conn.process_new_packets().map_err(io::Error::other)?;
                let mut total = 0;
                loop {
                    match conn.reader().read(&mut chunk) {
                        Ok(0) => return if total == 0 { Ok(0) } else { Ok(total) },
                        Ok(m) => {
                            buf.extend_from_slice(&chunk[..m]);
                            total += m;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            // TLS records that held no data for us (a ticket, say) are not the end.
                            return Ok(total.max(1));
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }

    /// Writes `data` whole.
    pub fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Transport::Plain(s) => s.write_all(data),
            Transport::Tls(conn, s) => {
                // rustls buffers at most 64 KiB of plaintext: write it out as it fills.
                let mut data = data;
                while !data.is_empty() {
                    let n = conn.writer().write(data)?;
                    data = &data[n..];
                    while conn.wants_write() {
                        conn.write_tls(s)?;
                    }
                    if n == 0 && !conn.wants_write() {
                        return Err(io::ErrorKind::WriteZero.into());
                    }
                }
                while conn.wants_write() {
                    conn.write_tls(s)?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let e = |u: &str| Endpoint::parse(u);
        assert_eq!(
            e("mqtt://broker").unwrap(),
            Endpoint {
                host: "broker".into(),
                port: 1883,
                tls: false
            }
        );
        assert_eq!(e("mqtts://b.local:8884").unwrap().port, 8884);
        assert!(e("mqtts://b.local").unwrap().tls);
        assert_eq!(e("mqtt://[::1]:1884").unwrap().host, "::1");
        for bad in [
            "http://b",
            "mqtt://",
            "mqtt://u:p@b",
            "mqtt://b/x",
            "mqtt://b:99999",
        ] {
            assert!(e(bad).is_err(), "{bad}");
        }
    }
}
