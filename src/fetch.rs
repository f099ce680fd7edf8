//! Bounded download of a function file: http/https only, limited in size,
//! time and redirects, optionally pinned by `#sha256=<hex>`.

use std::time::Duration;

use percent_encoding::percent_decode_str;

use crate::error::{Error, Result};
use crate::name::FunctionName;
use crate::store::sha256_hex;

/// Redirects followed before a download counts as a loop.
const MAX_REDIRECTS: u32 = 5;

/// A parsed install URL.
#[derive(Debug, PartialEq, Eq)]
pub struct Source {
    /// The URL to fetch, without its fragment.
    pub url: String,
    /// The function name, from the file name.
    pub name: FunctionName,
    /// The expected lowercase hex sha256, from `#sha256=`.
    pub sha256: Option<String>,
}

impl Source {
    /// Parses the body of `POST /mgmt`: `http(s)://host/path/name.py[#sha256=hex]`.
    pub fn parse(text: &str) -> Result<Source> {
        let text = text.trim();
        let bad = |why: &str| {
            Error::BadRequest(format!(
                "{why}: {:?}",
                text.chars().take(200).collect::<String>()
            ))
        };
        let (scheme, rest) = text.split_once("://").ok_or_else(|| bad("not a URL"))?;
        if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
            return Err(bad("only http and https URLs are supported"));
        }
        let (without_fragment, fragment) = match text.split_once('#') {
            Some((u, f)) => (u, Some(f)),
            None => (text, None),
        };
        let sha256 = match fragment.and_then(|f| f.strip_prefix("sha256=")) {
            Some(hex) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
                Some(hex.to_ascii_lowercase())
            }
            Some(_) => return Err(bad("#sha256= needs 64 hex digits")),
            None => None,
        };
        let path = rest.split(['?', '#']).next().unwrap_or_default();
        let Some((_authority, path)) = path.split_once('/') else {
            return Err(bad("URL has no file name ending in .py"));
        };
        let file = path.rsplit('/').next().unwrap_or_default();
        let file = percent_decode_str(file)
            .decode_utf8()
            .map_err(|_| bad("file name is not UTF-8"))?;
        let stem = file
            .strip_suffix(".py")
            .ok_or_else(|| bad("URL has no file name ending in .py"))?;
        let name = FunctionName::parse(stem)?;
        if without_fragment.parse::<ureq::http::Uri>().is_err()
            || text.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(bad("invalid URL"));
        }
        Ok(Source {
            url: without_fragment.to_string(),
            name,
            sha256,
        })
    }
}

impl Source {
    /// The URL without credentials (`user:pass@`) or fragment: what is stored,
    /// listed and logged. The credentials are used for the download only.
    pub fn public_url(&self) -> String {
        let Some((scheme, rest)) = self.url.split_once("://") else {
            return self.url.clone();
        };
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        match rest[..end].rfind('@') {
            Some(at) => format!("{scheme}://{}", &rest[at + 1..]),
            None => self.url.clone(),
        }
    }
}

/// Downloads function files with fixed bounds.
pub struct Fetcher {
    agent: ureq::Agent,
    max_size: u64,
}

impl Fetcher {
    /// A fetcher that gives up after `timeout` or past `max_size` bytes.
    pub fn new(timeout: Duration, max_size: u64) -> Fetcher {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .max_redirects(MAX_REDIRECTS)
            .http_status_as_error(true)
            .user_agent(concat!("edgefaas/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Fetcher { agent, max_size }
    }

    /// Fetches `src` and checks its pin; the bytes are returned only if all is well.
    pub fn fetch(&self, src: &Source) -> Result<Vec<u8>> {
        let too_large = || {
            Error::TooLarge(format!(
                "{}.py is larger than EDGEFAAS_MAX_FUNCTION_SIZE ({} bytes)",
                src.name, self.max_size
            ))
        };
        let mut response = self
            .agent
            .get(&src.url)
            .call()
            .map_err(|e| self.error(src, e))?;
        if response
            .body()
            .content_length()
            .is_some_and(|n| n > self.max_size)
        {
            return Err(too_large());
        }
        let bytes = response
            .body_mut()
            .with_config()
            .limit(self.max_size)
            .read_to_vec()
            .map_err(|e| match e {
                ureq::Error::BodyExceedsLimit(_) => too_large(),
                e => self.error(src, e),
            })?;
        if let Some(expected) = &src.sha256 {
            let actual = sha256_hex(&bytes);
            if &actual != expected {
                return Err(Error::HashMismatch {
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        Ok(bytes)
    }

    /// Turns a ureq failure into what the client is told (and the log, with the URL).
    fn error(&self, src: &Source, e: ureq::Error) -> Error {
        let url = src.public_url();
        let fetch = |why: String| Error::Fetch {
            url: url.clone(),
            why,
        };
        match e {
            ureq::Error::Timeout(_) => Error::FetchTimeout { url },
            ureq::Error::StatusCode(code) => fetch(format!("server answered HTTP {code}")),
            ureq::Error::TooManyRedirects => fetch(format!("more than {MAX_REDIRECTS} redirects")),
            ureq::Error::HostNotFound => fetch("host not found".into()),
            ureq::Error::ConnectionFailed => fetch("cannot connect to host".into()),
            ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => {
                Error::FetchTimeout { url }
            }
            ureq::Error::Io(io) => fetch(io.to_string()),
            ureq::Error::BadUri(why) => fetch(format!("bad URL or redirect target: {why}")),
            other => fetch(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_leave_the_download() {
        let s = Source::parse("http://ops:hunter2@files.local:8000/fns/avg.py?x=1#sha256=0000000000000000000000000000000000000000000000000000000000000000").unwrap();
        assert_eq!(s.public_url(), "http://files.local:8000/fns/avg.py?x=1");
        let s = Source::parse("https://h/a@b/f.py").unwrap();
        assert_eq!(s.public_url(), "https://h/a@b/f.py");
    }

    const HEX: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    proptest::proptest! {
        /// Parsing any text never panics; an accepted URL is http(s), carries no
        /// fragment, and names a valid function.
        #[test]
        fn accepted_urls_are_http_with_a_valid_name(
            s in "(https?|HTTP|file|ftp)://[a-z0-9.:%/#?=_-]{0,60}(\\.py)?(#sha256=[0-9a-f]{0,70})?|\\PC{0,80}"
        ) {
            if let Ok(src) = Source::parse(&s) {
                let lower = src.url.to_ascii_lowercase();
                proptest::prop_assert!(lower.starts_with("http://") || lower.starts_with("https://"));
                proptest::prop_assert!(!src.url.contains('#'));
                proptest::prop_assert!(FunctionName::parse(src.name.as_str()).is_ok());
                if let Some(h) = &src.sha256 {
                    proptest::prop_assert!(h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
                }
            }
        }
    }

    #[test]
    fn name_comes_from_the_file_name() {
        let s = Source::parse("http://host:8000/sample_functions/average.py\n").unwrap();
        assert_eq!(s.name.as_str(), "average");
        assert_eq!(s.url, "http://host:8000/sample_functions/average.py");
        assert_eq!(s.sha256, None);
        let s = Source::parse("HTTPS://h/a/b%2Dc.py?raw=1").unwrap();
        assert_eq!(s.name.as_str(), "b-c");
    }

    #[test]
    fn sha256_fragment_is_the_pin() {
        let s = Source::parse(&format!("http://h/f.py#sha256={}", HEX.to_uppercase())).unwrap();
        assert_eq!(s.sha256.as_deref(), Some(HEX));
        assert_eq!(s.url, "http://h/f.py");
        assert!(Source::parse("http://h/f.py#sha256=abc").is_err());
    }

    #[test]
    fn other_schemes_and_missing_names_are_refused() {
        for bad in [
            "file:///etc/passwd.py",
            "ftp://h/f.py",
            "h/f.py",
            "http://h",
            "http://h/",
            "http://h/f.txt",
            "http://h/.py",
            "http://h/_x.py",
            "http://h/mgmt.py",
            "http://h/%2e%2e.py",
            "http://h/a%2Fb.py",
            "http://h/f .py",
        ] {
            let e = Source::parse(bad).unwrap_err();
            assert_eq!(e.status(), 400, "{bad}");
        }
    }
}
