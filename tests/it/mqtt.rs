//! The MQTT trigger against a real mosquitto (Debian's package), started here
//! on a free loopback port with a password file (and a TLS instance with a
//! certificate made here); mosquitto_pub and mosquitto_sub are the clients.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::{Daemon, Marker, TempDir, eventually, free_port, skip};

const USER: &str = "edge";
const PASS: &str = "s3cret-mqtt";

/// A mosquitto of our own.
struct Broker {
    port: u16,
    dir: TempDir,
    child: Option<Child>,
    tls: bool,
}

impl Broker {
    fn start(tls: bool) -> Option<Broker> {
        if !Path::new("/usr/sbin/mosquitto").exists() {
            skip("mosquitto is not installed (apt-get install mosquitto mosquitto-clients)");
            return None;
        }
        let dir = TempDir::new("broker");
        let pw = dir.path().join("passwd");
        let ok = Command::new("mosquitto_passwd")
            .args(["-b", "-c"])
            .arg(&pw)
            .args([USER, PASS])
            .status()
            .unwrap();
        assert!(ok.success());
        let port = free_port();
        let mut conf = format!(
            "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\npersistence true\npersistence_location {}/\nmax_queued_messages 10000\n",
            pw.display(),
            dir.path().display()
        );
        if crate::support::euid() == 0 {
            // Run as root, mosquitto would drop to its own user and lose our files.
            conf.push_str("user root\n");
        }
        if tls {
            make_certs(dir.path());
            conf.push_str(&format!(
                "cafile {0}/ca.pem\ncertfile {0}/server.pem\nkeyfile {0}/server.key\n",
                dir.path().display()
            ));
        }
        std::fs::write(dir.path().join("mosquitto.conf"), conf).unwrap();
        let mut b = Broker {
            port,
            dir,
            child: None,
            tls,
        };
        b.launch();
        Some(b)
    }

    fn launch(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("mosquitto.log")).unwrap();
        self.child = Some(
            Command::new("/usr/sbin/mosquitto")
                .arg("-c")
                .arg(self.dir.path().join("mosquitto.conf"))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        assert!(
            eventually(Duration::from_secs(10), || std::net::TcpStream::connect((
                "127.0.0.1",
                self.port
            ))
            .is_ok()),
            "mosquitto did not start"
        );
    }

    /// Stops it (SIGTERM: it saves its sessions and queued messages).
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        if self.tls {
            format!("mqtts://localhost:{}", self.port)
        } else {
            format!("mqtt://127.0.0.1:{}", self.port)
        }
    }

    /// The daemon's settings for this broker (the password in a file).
    fn env(&self, client: &str) -> Vec<(String, String)> {
        let pw = self.dir.path().join(format!("pw-{client}"));
        std::fs::write(&pw, format!("{PASS}\n")).unwrap();
        let mut env = vec![
            ("EDGEFAAS_MQTT_URL".into(), self.url()),
            ("EDGEFAAS_MQTT_USERNAME".into(), USER.into()),
            (
                "EDGEFAAS_MQTT_PASSWORD_FILE".into(),
                pw.display().to_string(),
            ),
            ("EDGEFAAS_MQTT_CLIENT_ID".into(), client.into()),
        ];
        if self.tls {
            env.push((
                "EDGEFAAS_MQTT_CA".into(),
                self.dir.path().join("ca.pem").display().to_string(),
            ));
        }
        env
    }

    fn client_args(&self) -> Vec<String> {
        let mut a = vec![
            "-h".into(),
            "localhost".into(),
            "-p".into(),
            self.port.to_string(),
            "-u".into(),
            USER.into(),
            "-P".into(),
            PASS.into(),
            "-V".into(),
            "5".into(),
        ];
        if self.tls {
            a.push("--cafile".into());
            a.push(self.dir.path().join("ca.pem").display().to_string());
        }
        a
    }

    /// Publishes one message (QoS 1 unless `extra` says otherwise).
    fn publish(&self, topic: &str, payload: &str, extra: &[&str]) {
        let ok = Command::new("mosquitto_pub")
            .args(self.client_args())
            .args(["-t", topic, "-m", payload, "-q", "1"])
            .args(extra)
            .status()
            .unwrap();
        assert!(ok.success(), "mosquitto_pub {topic}");
    }

    /// Subscribes (QoS 1, a persistent session `id`), collecting `topic|payload|correlation` lines.
    fn subscribe(&self, id: &str, topic: &str) -> Sub {
        let mut child = Command::new("mosquitto_sub")
            .args(self.client_args())
            .args(["-t", topic, "-q", "1", "-c", "-i", id, "-F", "%t|%p|%D"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let theirs = lines.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                theirs.lock().unwrap().push(l);
            }
        });
        // Subscribed once a probe on its own topic comes through.
        let sub = Sub { child, lines };
        std::thread::sleep(Duration::from_millis(300));
        sub
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct Sub {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Sub {
    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits until `n` lines arrived (at most `bound`); the lines.
    fn wait(&self, n: usize, bound: Duration) -> Vec<String> {
        eventually(bound, || self.lines().len() >= n);
        self.lines()
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CA and a server certificate for localhost, made with openssl.
fn make_certs(dir: &Path) {
    let run = |args: &[&str]| {
        let ok = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(ok.success(), "openssl {args:?}");
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=edgefaas test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
    ]);
}

fn daemon(broker: &Broker, client: &str, more: &[(&str, &str)]) -> Daemon {
    let env = broker.env(client);
    let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    all.extend_from_slice(more);
    let d = Daemon::start(&all);
    assert!(
        eventually(Duration::from_secs(10), || d
            .log()
            .contains("MQTT: connected")),
        "{}",
        d.log()
    );
    d
}

/// Waits until the daemon subscribed `filter`.
fn subscribed(d: &Daemon, filter: &str) {
    assert!(
        eventually(Duration::from_secs(10), || d
            .log()
            .contains(&format!("MQTT: subscribing {filter}"))),
        "{}",
        d.log()
    );
    std::thread::sleep(Duration::from_millis(200));
}

const TEMP: &str = "# edgefaas: topic=sensors/+/temp reply=out/temp\nimport os\ndef handle(req):\n    \
return {'body': 'got %s on %s qos %s' % (req, os.environ['Mqtt_Topic'], os.environ['Mqtt_Qos'])}\n";

#[test]
fn a_message_invokes_its_function_and_the_output_is_published_back() {
    let Some(broker) = Broker::start(false) else {
        return;
    };
    let d = daemon(&broker, "node-a", &[]);
    d.upload("temp", TEMP);
    subscribed(&d, "sensors/+/temp");
    let replies = broker.subscribe("t1", "out/#");
    broker.publish("sensors/kitchen/temp", "21.5", &[]);
    // MQTT 5: a response topic (and correlation data) wins over the function's reply topic.
    broker.publish(
        "sensors/hall/temp",
        "19",
        &[
            "-D",
            "publish",
            "response-topic",
            "out/asked",
            "-D",
            "publish",
            "correlation-data",
            "req-42",
        ],
    );
    let got = replies.wait(2, Duration::from_secs(10));
    assert!(
        got.contains(&"out/temp|got 21.5 on sensors/kitchen/temp qos 1|".to_string()),
        "{got:?}"
    );
    assert!(
        got.contains(&"out/asked|got 19 on sensors/hall/temp qos 1|req-42".to_string()),
        "{got:?}"
    );
    let metrics = d.req("GET", "/_/metrics", b"").text();
    assert!(
        metrics.contains("edgefaas_mqtt_messages_acked_total{function=\"temp\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("edgefaas_mqtt_connected 1"), "{metrics}");
}

#[test]
fn subscriptions_follow_installs_updates_and_deletes() {
    let Some(broker) = Broker::start(false) else {
        return;
    };
    let d = daemon(&broker, "node-b", &[]);
    let replies = broker.subscribe("t2", "out/#");
    let f = |topic: &str| {
        format!(
            "# edgefaas: topic={topic} reply=out/f\ndef handle(req):\n    return {{'body': '{topic} ' + req}}\n"
        )
    };
    d.upload("f", &f("a/1"));
    subscribed(&d, "a/1");
    broker.publish("a/1", "one", &[]);
    assert_eq!(replies.wait(1, Duration::from_secs(10)), ["out/f|a/1 one|"]);
    d.upload("f", &f("a/2"));
    assert!(eventually(Duration::from_secs(10), || d
        .log()
        .contains("MQTT: unsubscribing a/1")));
    subscribed(&d, "a/2");
    broker.publish("a/1", "ignored", &[]);
    broker.publish("a/2", "two", &[]);
    let got = replies.wait(2, Duration::from_secs(10));
    assert_eq!(got, ["out/f|a/1 one|", "out/f|a/2 two|"]);
    assert_eq!(d.req("DELETE", "/mgmt/f", b"").status, 200);
    assert!(eventually(Duration::from_secs(10), || d
        .log()
        .contains("MQTT: unsubscribing a/2")));
    std::thread::sleep(Duration::from_millis(300));
    broker.publish("a/2", "gone", &[]);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(replies.lines().len(), 2, "{:?}", replies.lines());
}

#[test]
fn a_failing_function_ends_in_the_dead_letter_topic_after_its_retries() {
    let Some(broker) = Broker::start(false) else {
        return;
    };
    let d = daemon(&broker, "node-c", &[("EDGEFAAS_MQTT_RETRIES", "2")]);
    let marker = Marker::new();
    d.upload(
        "fragile",
        &format!("# edgefaas: topic=jobs/fragile\ndef handle(req):\n    {}\n    raise ValueError('cannot parse ' + req)\n", marker.send("'try'")),
    );
    subscribed(&d, "jobs/fragile");
    let dead = broker.subscribe("t3", "edgefaas/node-c/dead/#");
    broker.publish("jobs/fragile", "x=1", &[]);
    let got = dead.wait(1, Duration::from_secs(20));
    assert_eq!(got.len(), 1, "{got:?}");
    let (topic, rest) = got[0].split_once('|').unwrap();
    assert_eq!(topic, "edgefaas/node-c/dead/fragile");
    let json: serde_json::Value = serde_json::from_str(rest.trim_end_matches('|')).unwrap();
    assert_eq!(json["function"], "fragile");
    assert_eq!(json["topic"], "jobs/fragile");
    assert_eq!(json["payload"], "x=1");
    assert_eq!(json["attempts"], 3);
    assert!(
        json["error"]
            .as_str()
            .unwrap()
            .contains("ValueError: cannot parse x=1"),
        "{json}"
    );
    assert_eq!(marker.received().len(), 3, "one run and two retries");
    let metrics = d.req("GET", "/_/metrics", b"").text();
    assert!(
        metrics.contains("edgefaas_mqtt_messages_retried_total{function=\"fragile\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("edgefaas_mqtt_messages_dead_lettered_total{function=\"fragile\"} 1"),
        "{metrics}"
    );
    // Acknowledged once dead-lettered: a restart does not bring it back.
    drop(dead);
    let log = d.req("GET", "/mgmt/fragile/logs", b"").text();
    assert!(log.contains("ValueError: cannot parse x=1"), "{log}");
}

#[test]
fn qos1_survives_a_broker_restart_with_replies_spooled_and_flushed_in_order() {
    let Some(mut broker) = Broker::start(false) else {
        return;
    };
    let d = daemon(&broker, "node-d", &[]);
    d.upload(
        "slow",
        "# edgefaas: topic=work/+ reply=out/slow concurrency=1\nimport os, time\ndef handle(req):\n    time.sleep(0.15)\n    return {'body': req}\n",
    );
    subscribed(&d, "work/+");
    let replies = broker.subscribe("t4", "out/slow");
    for i in 0..10 {
        broker.publish("work/a", &format!("m{i:02}"), &[]);
    }
    // Down while the function still works through them: its replies go to the spool.
    std::thread::sleep(Duration::from_millis(400));
    broker.stop();
    assert!(eventually(Duration::from_secs(10), || d
        .req("GET", "/_/metrics", b"")
        .text()
        .contains("edgefaas_mqtt_connected 0")));
    assert!(
        eventually(Duration::from_secs(10), || {
            let m = d.req("GET", "/_/metrics", b"").text();
            m.lines()
                .any(|l| l.starts_with("edgefaas_mqtt_spool_depth ") && !l.ends_with(" 0"))
        }),
        "nothing was spooled"
    );
    let before = replies.lines();
    drop(replies);
    broker.launch();
    // The subscriber's session was kept by the broker: it gets what was published while away.
    let after = broker.subscribe("t4", "out/slow");
    let replies = || [before.clone(), after.lines()].concat();
    for i in 10..20 {
        broker.publish("work/b", &format!("m{i:02}"), &[]);
    }
    let want: Vec<String> = (0..20).map(|i| format!("out/slow|m{i:02}|")).collect();
    assert!(
        eventually(Duration::from_secs(40), || {
            let got = replies();
            want.iter().all(|w| got.contains(w))
        }),
        "missing: {:?}\nlog:\n{}",
        want.iter()
            .filter(|w| !replies().contains(w))
            .collect::<Vec<_>>(),
        d.log()
    );
    // In order, first occurrences (at least once may repeat some).
    let mut firsts = Vec::new();
    for l in replies() {
        if !firsts.contains(&l) {
            firsts.push(l);
        }
    }
    let mut sorted = firsts.clone();
    sorted.sort();
    assert_eq!(firsts, sorted, "out of order");
    assert!(eventually(Duration::from_secs(10), || d
        .req("GET", "/_/metrics", b"")
        .text()
        .contains("edgefaas_mqtt_spool_depth 0")));
}

#[test]
fn a_message_cut_off_by_a_sigkill_is_redelivered_after_the_restart() {
    let Some(broker) = Broker::start(false) else {
        return;
    };
    let mut d = daemon(&broker, "node-e", &[]);
    let marker = Marker::new();
    d.upload(
        "long",
        &format!("# edgefaas: topic=long/job reply=out/long\nimport time\ndef handle(req):\n    {}\n    time.sleep(1.5)\n    return {{'body': 'done ' + req}}\n", marker.send("'started'")),
    );
    subscribed(&d, "long/job");
    let replies = broker.subscribe("t5", "out/long");
    broker.publish("long/job", "j1", &[]);
    marker.wait();
    d.kill();
    d.restart();
    let got = replies.wait(1, Duration::from_secs(20));
    assert_eq!(got, ["out/long|done j1|"], "{}", d.log());
    assert!(marker.received().len() >= 2, "ran again after the restart");
}

#[test]
fn two_nodes_with_a_shared_subscription_split_the_messages() {
    let Some(broker) = Broker::start(false) else {
        return;
    };
    let nodes: Vec<Daemon> = ["node-f1", "node-f2"]
        .iter()
        .map(|n| {
            let d = daemon(&broker, n, &[]);
            let r = d.req(
                "PUT",
                &format!("/mgmt/split?env=NODE%3D{n}"),
                b"# edgefaas: topic=$share/fleet/split/# reply=out/split\nimport os\ndef handle(req):\n    return {'body': os.environ['NODE'] + ' ' + req}\n",
            );
            assert_eq!(r.status, 201, "{r:?}");
            subscribed(&d, "$share/fleet/split/#");
            d
        })
        .collect();
    let replies = broker.subscribe("t6", "out/split");
    let payloads: Vec<String> = (0..200).map(|i| format!("p{i:03}")).collect();
    // One mosquitto_pub for all 200 (one line each).
    let mut pubber = Command::new("mosquitto_pub")
        .args(broker.client_args())
        .args(["-t", "split/jobs", "-q", "1", "-l"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = pubber.stdin.take().unwrap();
        for p in &payloads {
            writeln!(stdin, "{p}").unwrap();
        }
    }
    assert!(pubber.wait().unwrap().success());
    let got = replies.wait(200, Duration::from_secs(60));
    let mut seen: std::collections::HashMap<String, Vec<String>> = Default::default();
    for l in &got {
        let body = l.split('|').nth(1).unwrap();
        let (node, p) = body.split_once(' ').unwrap();
        seen.entry(p.to_string())
            .or_default()
            .push(node.to_string());
    }
    for p in &payloads {
        let by = seen.get(p).cloned().unwrap_or_default();
        assert_eq!(by.len(), 1, "{p} processed {by:?}");
    }
    let per_node = |n: &str| seen.values().filter(|v| v[0] == n).count();
    assert!(
        per_node("node-f1") > 0 && per_node("node-f2") > 0,
        "not split: {} / {}",
        per_node("node-f1"),
        per_node("node-f2")
    );
    drop(nodes);
}

#[test]
fn tls_with_a_ca_of_our_own() {
    let Some(broker) = Broker::start(true) else {
        return;
    };
    let d = daemon(&broker, "node-g", &[]);
    d.upload("temp", TEMP);
    subscribed(&d, "sensors/+/temp");
    let replies = broker.subscribe("t7", "out/temp");
    broker.publish("sensors/attic/temp", "30", &[]);
    assert_eq!(
        replies.wait(1, Duration::from_secs(10)),
        ["out/temp|got 30 on sensors/attic/temp qos 1|"]
    );
    // A reply larger than what rustls buffers at once (64 KiB) goes through whole.
    d.upload(
        "big",
        "# edgefaas: topic=big/in reply=out/big\ndef handle(req):\n    return {'body': 'x' * 200000}\n",
    );
    subscribed(&d, "big/in");
    let big = broker.subscribe("t7b", "out/big");
    broker.publish("big/in", "go", &[]);
    let got = big.wait(1, Duration::from_secs(10));
    assert_eq!(got.len(), 1, "{}", d.log());
    assert_eq!(got[0], format!("out/big|{}|", "x".repeat(200_000)));
    assert!(!d.log().contains("connection lost"), "{}", d.log());
    // Without the CA the daemon does not trust the broker, and says why.
    let mut env = broker.env("node-h");
    env.retain(|(k, _)| k != "EDGEFAAS_MQTT_CA");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let untrusting = Daemon::start(&env);
    assert!(
        eventually(Duration::from_secs(10), || untrusting
            .log()
            .contains("MQTT: cannot reach")),
        "{}",
        untrusting.log()
    );
    assert!(!untrusting.log().contains("MQTT: connected"));
}

#[test]
fn a_bad_mqtt_setting_stops_start_up() {
    for (var, value) in [
        ("EDGEFAAS_MQTT_URL", "http://broker"),
        ("EDGEFAAS_MQTT_PASSWORD_FILE", "/nonexistent/pw"),
    ] {
        let mut cmd = crate::support::command();
        if var != "EDGEFAAS_MQTT_URL" {
            cmd.env("EDGEFAAS_MQTT_URL", "mqtt://127.0.0.1:1");
        }
        cmd.env(var, value);
        let err = crate::support::start_up_error(cmd, var);
        assert!(err.contains(var), "{err}");
    }
}

#[test]
fn overlapping_filters_and_dollar_topics_run_each_function_once() {
    let Some(broker) = Broker::start(false) else {
        return;
    };
    let d = daemon(&broker, "node-i", &[]);
    let fun = |topics: &str, tag: &str| {
        format!(
            "# edgefaas: {topics} reply=out/{tag}\ndef handle(req):\n    return {{'body': '{tag} ' + req}}\n"
        )
    };
    // One function on two overlapping filters, one on a shared subscription next
    // to a plain one on the same node, and one on a `$` topic.
    d.upload("both", &fun("topic=a/+ topic=a/#", "both"));
    d.upload("shared", &fun("topic=$share/g/a/b", "shared"));
    d.upload("plain", &fun("topic=a/b", "plain"));
    d.upload("dollar", &fun("topic=$app/in", "dollar"));
    for f in ["a/+", "a/#", "$share/g/a/b", "a/b", "$app/in"] {
        subscribed(&d, f);
    }
    let replies = broker.subscribe("t8", "out/#");
    broker.publish("a/b", "one", &[]);
    broker.publish("$app/in", "two", &[]);
    replies.wait(4, Duration::from_secs(10));
    // Any extra copies would come right behind.
    std::thread::sleep(Duration::from_secs(1));
    let mut got = replies.lines();
    got.sort();
    assert_eq!(
        got,
        [
            "out/both|both one|",
            "out/dollar|dollar two|",
            "out/plain|plain one|",
            "out/shared|shared one|"
        ],
        "{}",
        d.log()
    );
    // A filter the broker would refuse is refused at install, naming the setting.
    let r = d.req(
        "PUT",
        "/mgmt/bad?topic=a%2F%23%2Fb",
        b"def handle(req):\n    return req\n",
    );
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.text().contains("topic"), "{r:?}");
    // So is a noncharacter (U+FFFF), which mosquitto drops the connection over.
    for q in ["topic=w%2F%EF%BF%BF", "reply=w%2F%EF%BF%BF"] {
        let r = d.req(
            "PUT",
            &format!("/mgmt/bad?{q}"),
            b"def handle(req):\n    return req\n",
        );
        assert_eq!(r.status, 400, "{q}: {r:?}");
    }
}

#[test]
fn a_poison_reply_and_a_busy_node_do_not_lose_messages_or_the_session() {
    let Some(broker) = Broker::start(false) else {
        return;
    };
    let d = daemon(
        &broker,
        "node-j",
        &[
            ("EDGEFAAS_QUEUE_TIMEOUT", "1"),
            ("EDGEFAAS_MQTT_RETRIES", "1"),
        ],
    );
    d.upload(
        "slow",
        "# edgefaas: topic=busy/in reply=out/busy concurrency=1\nimport time\ndef handle(req):\n    time.sleep(0.4)\n    return {'body': req}\n",
    );
    subscribed(&d, "busy/in");
    let replies = broker.subscribe("t9", "out/#");
    let dead = broker.subscribe("t9d", "edgefaas/node-j/dead/#");
    // A response topic the broker would refuse (a wildcard): not published, no reconnect loop.
    broker.publish("busy/in", "p0", &["-D", "publish", "response-topic", "x/#"]);
    // Ten messages for a function that takes one at a time, with a 1 s queue
    // timeout: the node is busy, the function never fails, so none is dead-lettered.
    for i in 1..=10 {
        broker.publish("busy/in", &format!("p{i}"), &[]);
    }
    let got = replies.wait(10, Duration::from_secs(30));
    let mut got: Vec<String> = got.into_iter().collect();
    got.sort();
    got.dedup();
    assert_eq!(got.len(), 10, "{got:?}\n{}", d.log());
    assert!(dead.lines().is_empty(), "dead-lettered: {:?}", dead.lines());
    let metrics = d.req("GET", "/_/metrics", b"").text();
    assert!(
        metrics.contains("edgefaas_mqtt_connects_total 1"),
        "{metrics}\n{}",
        d.log()
    );
    assert!(d.log().contains("not a valid topic name"), "{}", d.log());
}

#[test]
fn a_list_from_an_older_release_is_cleaned_up_not_sent() {
    let Some(broker) = Broker::start(false) else {
        return;
    };
    let mut d = daemon(&broker, "node-k", &[]);
    d.upload(
        "leg",
        "# edgefaas: topic=leg/in reply=out/leg\ndef handle(req):\n    return {'body': 'leg ' + req}\n",
    );
    subscribed(&d, "leg/in");
    d.kill();
    // An older list (no identifiers; one build wrote a header line into it) naming
    // a filter no function wants any more.
    let spool = d.dir.join(".spool");
    std::fs::remove_file(spool.join("subscriptions.v2")).unwrap();
    std::fs::write(
        spool.join("subscriptions"),
        "# edgefaas MQTT subscriptions, with identifiers\nleg/in\nstale/#\n",
    )
    .unwrap();
    d.restart();
    assert!(
        eventually(Duration::from_secs(10), || {
            let log = d.log();
            log.contains("MQTT: unsubscribing stale/#")
                && log.matches("MQTT: subscribing leg/in").count() >= 2
        }),
        "{}",
        d.log()
    );
    let replies = broker.subscribe("t10", "out/leg");
    broker.publish("leg/in", "again", &[]);
    assert_eq!(
        replies.wait(1, Duration::from_secs(10)),
        ["out/leg|leg again|"]
    );
    assert!(!d.log().contains("unsubscribing #"), "{}", d.log());
    let metrics = d.req("GET", "/_/metrics", b"").text();
    assert!(
        metrics.contains("edgefaas_mqtt_connects_total 1"),
        "{metrics}\n{}",
        d.log()
    );
}
