//! The README's curl session, run as written: the console block under "A curl
//! session" is split into commands (`$ ` lines) and the output each shows; the
//! commands run one by one in one bash, from the repository's root, and every
//! output line must match. The first command (`cargo run --release`) is the
//! daemon: here the harness's build of it. Ports 8080 and 8000 become free
//! ports; after a command sent to the background the test waits for its port.
//! Expected lines match exactly, except `...` (any lines) and the values of
//! `Date:` and `X-Duration-Seconds:`.
//!
//! With EDGEFAAS_SESSION_PORT set, the curl session runs against a daemon
//! already listening there (CI runs it against the container image this way).
//! The "Events" walk-through runs the same way, with a mosquitto it starts.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{Daemon, eventually, free_port};

const README: &str = include_str!("../../README.md");

/// One `$ ` command and the lines shown after it.
#[derive(Debug)]
struct Step {
    command: String,
    expected: Vec<String>,
}

/// The first ```console block after the heading `heading`.
fn session(heading: &str) -> Vec<Step> {
    let at = README
        .find(&format!("\n## {heading}\n"))
        .unwrap_or_else(|| panic!("README has no section {heading:?}"));
    let rest = &README[at..];
    let start = rest.find("```console\n").expect("a console block") + "```console\n".len();
    let block = &rest[start..start + rest[start..].find("```").expect("its end")];
    let mut steps: Vec<Step> = Vec::new();
    for line in block.lines() {
        match line.strip_prefix("$ ") {
            Some(cmd) => steps.push(Step {
                command: cmd.to_string(),
                expected: Vec::new(),
            }),
            None => steps
                .last_mut()
                .expect("output before any command")
                .expected
                .push(line.to_string()),
        }
    }
    steps
}

/// Whether `actual` is what `expected` shows (see the module's rules).
fn matches(expected: &[String], actual: &[String]) -> bool {
    match expected.split_first() {
        None => actual.is_empty(),
        Some((e, rest)) if e == "..." => {
            (0..=actual.len()).any(|skip| matches(rest, &actual[skip..]))
        }
        Some((e, rest)) => actual.split_first().is_some_and(|(a, arest)| {
            let same = match e.split_once(": ") {
                Some((name @ ("Date" | "X-Duration-Seconds"), _)) => {
                    a.starts_with(&format!("{name}: "))
                }
                _ => a == e,
            };
            same && matches(rest, arest)
        }),
    }
}

/// A bash that runs commands one at a time and says where each one's output ends.
struct Shell {
    child: std::process::Child,
    input: std::process::ChildStdin,
    output: BufReader<std::process::ChildStdout>,
    errors: std::thread::JoinHandle<String>,
}

impl Shell {
    fn start() -> Shell {
        use std::os::unix::process::CommandExt;
        let mut child = Command::new("bash")
            .args(["--norc", "--noprofile", "-s"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("bash");
        let input = child.stdin.take().unwrap();
        let output = BufReader::new(child.stdout.take().unwrap());
        let mut stderr = child.stderr.take().unwrap();
        let errors = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        Shell {
            child,
            input,
            output,
            errors,
        }
    }

    /// Runs `command`; its output lines (a last line without a newline included).
    fn run(&mut self, command: &str, n: usize) -> Vec<String> {
        let marker = format!("__end_of_step_{n}__");
        writeln!(self.input, "{command}\nprintf '\\n{marker}\\n'").unwrap();
        self.input.flush().unwrap();
        let mut text = String::new();
        loop {
            let mut line = String::new();
            assert!(
                self.output.read_line(&mut line).unwrap() > 0,
                "bash ended during `{command}`"
            );
            if line.trim_end() == marker {
                break;
            }
            text.push_str(&line);
        }
        // The newline printed before the marker is ours.
        text.pop();
        text.lines()
            .map(|l| l.trim_end_matches('\r').to_string())
            .collect()
    }

    /// Ends the shell and whatever it left in the background; its stderr.
    fn finish(mut self) -> String {
        let pgid = self.child.id();
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pgid}")])
            .status();
        let _ = self.child.wait();
        self.errors.join().unwrap()
    }
}

/// Runs the console block under `heading` as written (see the module's rules).
/// A `cargo run --release` step (with `VAR=value` words before it) is the
/// daemon, started here with those variables; ports 8080 (the daemon), 8000 and
/// 1883 (servers the block starts) become free ports.
fn run_session(heading: &str) {
    let steps = session(heading);
    assert!(
        steps
            .iter()
            .any(|s| s.command.ends_with("cargo run --release")),
        "the block starts the daemon"
    );
    let external = std::env::var("EDGEFAAS_SESSION_PORT").ok();
    let files = free_port().to_string();
    let broker = free_port().to_string();
    let map = |cmd: &str, daemon: &str| {
        cmd.replace("8080", daemon)
            .replace("8000", &files)
            .replace("1883", &broker)
    };
    let mut daemon: Option<Daemon> = None;
    let mut port = external.clone().unwrap_or_default();
    let mut shell = Shell::start();
    let mut failures = Vec::new();
    for (n, step) in steps.iter().enumerate() {
        if let Some(prefix) = step.command.strip_suffix("cargo run --release") {
            if external.is_none() {
                let env: Vec<(String, String)> = prefix
                    .split_whitespace()
                    .filter_map(|w| w.split_once('='))
                    .map(|(k, v)| (k.to_string(), map(v, "")))
                    .collect();
                let env: Vec<(&str, &str)> =
                    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                let d = Daemon::start(&env);
                port = d.port.to_string();
                daemon = Some(d);
            }
            continue;
        }
        let command = map(&step.command, &port);
        let actual = shell.run(&command, n);
        if command.trim_end().ends_with('&') {
            for p in [&files, &broker] {
                if command.contains(p.as_str()) {
                    let p: u16 = p.parse().unwrap();
                    assert!(
                        eventually(Duration::from_secs(15), || {
                            std::net::TcpStream::connect(("127.0.0.1", p)).is_ok()
                        }),
                        "`{command}` never listened"
                    );
                }
            }
        }
        if !matches(&step.expected, &actual) {
            failures.push(format!(
                "$ {}\n  expected: {:?}\n  got:      {:?}",
                step.command, step.expected, actual
            ));
        }
    }
    let errors = shell.finish();
    for line in errors.lines() {
        if line.contains("Warning:") || line.contains("curl: (") {
            failures.push(format!("stderr: {line}"));
        }
    }
    assert!(
        failures.is_empty(),
        "the README's {heading:?} block differs:\n{}\nstderr:\n{errors}\ndaemon log:\n{}",
        failures.join("\n"),
        daemon.as_ref().map(Daemon::log).unwrap_or_default()
    );
}

#[test]
fn the_readme_curl_session_works_as_pasted() {
    let steps = session("A curl session");
    assert_eq!(
        steps[0].command, "cargo run --release",
        "the session starts the daemon"
    );
    assert!(steps.len() > 10, "{steps:?}");
    run_session("A curl session");
}

#[test]
fn the_readme_events_walk_through_works_as_pasted() {
    if !std::path::Path::new("/usr/sbin/mosquitto").exists() {
        crate::support::skip(
            "mosquitto is not installed (apt-get install mosquitto mosquitto-clients)",
        );
        return;
    }
    run_session("Events");
}

#[test]
fn the_matcher_is_strict_where_it_should_be() {
    let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert!(matches(&v(&["a", "...", "d"]), &v(&["a", "b", "c", "d"])));
    assert!(matches(&v(&["Date: x"]), &v(&["Date: Mon, 1 Jan"])));
    assert!(!matches(&v(&["a"]), &v(&["a", "b"])));
    assert!(!matches(&v(&["a", "b"]), &v(&["a"])));
    assert!(!matches(
        &v(&["greet.py has been created"]),
        &v(&["greet.py has been updated"])
    ));
    let _ = Instant::now();
}
