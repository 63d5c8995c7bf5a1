//! Scale-out over real processes: Debian's `redis-server` and `nginx` (with
//! `deploy/nginx.conf`, its replica addresses filled in) in front of two `chatstream serve
//! --mock` replicas sharing sessions in Redis, all on loopback ports, started and stopped
//! here. A conversation survives the loss of the replica that served it; two clients racing
//! one session on different replicas get one stream and one 409; with Redis stopped session
//! endpoints answer 503 while /v1 goes on, and they recover when Redis is back; cookie-less
//! stateless requests spread over both replicas.

mod common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::client::{chat, completions, final_answer, open, request, Resp};
use common::process::{Served, TempPath};
use serde_json::json;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_listening(port: u16, what: &str) {
    let t = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{what} did not start on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn program(name: &str) -> PathBuf {
    let found = ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists());
    found.unwrap_or_else(|| panic!("{name} is missing: scripts/test.sh installs Debian's {name}"))
}

/// A killed-on-drop child process.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A throw-away Redis on a loopback port (no persistence).
struct Redis {
    port: u16,
    proc: Option<Proc>,
}

impl Redis {
    fn start() -> Redis {
        let mut r = Redis {
            port: free_port(),
            proc: None,
        };
        r.restart();
        r
    }

    fn restart(&mut self) {
        let child = Command::new(program("redis-server"))
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        self.proc = Some(Proc(child));
        wait_listening(self.port, "redis-server");
    }

    fn stop(&mut self) {
        self.proc = None;
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

/// nginx with `deploy/nginx.conf`, pointed at two replicas.
struct Nginx {
    addr: SocketAddr,
    _proc: Proc,
    prefix: PathBuf,
}

impl Nginx {
    fn start(a: SocketAddr, b: SocketAddr) -> Nginx {
        let conf = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/nginx.conf"),
        )
        .unwrap();
        let port = free_port();
        let conf = conf
            .replace("127.0.0.1:8001", &a.to_string())
            .replace("127.0.0.1:8002", &b.to_string())
            .replace("listen 8080;", &format!("listen 127.0.0.1:{port};"))
            .replace("worker_processes auto;", "worker_processes 1;");
        assert!(conf.contains(&a.to_string()) && conf.contains(&format!("127.0.0.1:{port}")));
        let prefix =
            std::env::temp_dir().join(format!("chatstream-nginx-{}-{port}", std::process::id()));
        std::fs::create_dir_all(prefix.join("tmp")).unwrap();
        std::fs::create_dir_all(prefix.join("logs")).unwrap();
        std::fs::write(prefix.join("nginx.conf"), conf).unwrap();
        let child = Command::new(program("nginx"))
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(prefix.join("nginx.conf"))
            .args(["-g", "daemon off;"])
            .spawn()
            .unwrap();
        let proc = Proc(child);
        wait_listening(port, "nginx");
        Nginx {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            _proc: proc,
            prefix,
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM to the master stops its workers too (a SIGKILL would orphan them).
        let pid = self._proc.0.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let t = Instant::now();
        while matches!(self._proc.0.try_wait(), Ok(None)) && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_dir_all(&self.prefix);
    }
}

/// Redis, two replicas and nginx.
struct Cluster {
    redis: Redis,
    replicas: Vec<Option<Served>>,
    nginx: Nginx,
    _roles: TempPath,
}

impl Cluster {
    fn start() -> Cluster {
        let redis = Redis::start();
        // Browsers may call every API (get_prompt and clear_context included).
        let roles = TempPath::write(
            "scale-roles.json",
            &json!({"user": {"apis": {"allow": "all", "auth_method": "nothing", "use_session": true}}}).to_string(),
        );
        let url = redis.url();
        let replicas: Vec<Served> = ["replica-a", "replica-b"]
            .iter()
            .map(|name| {
                Served::start(&[
                    "--mock",
                    "echo",
                    "--mock-token-delay-ms",
                    "5",
                    "--name",
                    name,
                    "--session-store",
                    &url,
                    "--roles",
                    roles.as_str(),
                ])
            })
            .collect();
        let nginx = Nginx::start(replicas[0].addr, replicas[1].addr);
        Cluster {
            redis,
            replicas: replicas.into_iter().map(Some).collect(),
            nginx,
            _roles: roles,
        }
    }

    fn addr_of(&self, name: &str) -> SocketAddr {
        let i = if name == "replica-a" { 0 } else { 1 };
        self.replicas[i].as_ref().expect("running").addr
    }

    fn kill(&mut self, name: &str) {
        let i = if name == "replica-a" { 0 } else { 1 };
        self.replicas[i] = None;
    }
}

fn node(r: &Resp) -> String {
    r.header("X-ChatStream-Node").unwrap_or("?").to_string()
}

fn prompt_at(addr: SocketAddr, cookie: &str) -> String {
    let r = request(addr, "GET", "/get_prompt", &[("Cookie", cookie)], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["prompt"].as_str().unwrap().to_string()
}

#[test]
fn a_conversation_survives_the_loss_of_its_replica() {
    let mut c = Cluster::start();
    let via = c.nginx.addr;
    let first = chat(via, None, &json!({"user_input": "alpha"}));
    assert_eq!(
        (first.status, final_answer(&first.text())),
        (200, "alpha".to_string())
    );
    let cookie = first.cookie().unwrap();
    let served_first = node(&first);
    c.kill(&served_first);

    let second = chat(via, Some(&cookie), &json!({"user_input": "bravo"}));
    assert_eq!(
        (second.status, final_answer(&second.text())),
        (200, "bravo".to_string()),
        "{}",
        second.text()
    );
    assert_ne!(node(&second), served_first);
    let p = prompt_at(via, &cookie);
    assert!(p.contains("alpha") && p.contains("bravo"), "{p}");

    let third = chat(via, Some(&cookie), &json!({"user_input": "charlie"}));
    assert_eq!(final_answer(&third.text()), "charlie");
    let again = chat(via, Some(&cookie), &json!({"regenerate": true}));
    assert_eq!(
        (again.status, final_answer(&again.text())),
        (200, "charlie".to_string())
    );
    let p = prompt_at(via, &cookie);
    assert!(
        p.contains("alpha") && p.contains("bravo") && p.matches("charlie").count() == 2,
        "{p}"
    );

    let cleared = request(via, "POST", "/clear_context", &[("Cookie", &cookie)], b"{}");
    assert_eq!(cleared.status, 200);
    assert!(!prompt_at(via, &cookie).contains("alpha"));
}

#[test]
fn two_clients_racing_one_session_on_two_replicas_get_one_stream_and_one_409() {
    let c = Cluster::start();
    let (a, b) = (c.addr_of("replica-a"), c.addr_of("replica-b"));
    let first = chat(a, None, &json!({"user_input": "hello"}));
    let cookie = first.cookie().unwrap();
    // A long answer on replica A (200 words, 5 ms each) ...
    let long = json!({"user_input": "word ".repeat(200)}).to_string();
    let mut streaming = open(
        a,
        "POST",
        "/chat_stream",
        &[("Cookie", &cookie)],
        long.as_bytes(),
    );
    assert_eq!(streaming.status, 200);
    assert!(streaming.next_chunk().is_some());
    // ... while the same session's next turn reaches replica B.
    let racing = chat(b, Some(&cookie), &json!({"user_input": "me too"}));
    assert_eq!(racing.status, 409, "{}", racing.text());
    assert!(streaming.finish().text().ends_with("<::EOS::>"));
    // The lock is released with the turn: B may go on now.
    let after = chat(b, Some(&cookie), &json!({"user_input": "now"}));
    assert_eq!(
        (after.status, final_answer(&after.text())),
        (200, "now".to_string())
    );
}

#[test]
fn with_redis_down_sessions_get_503_v1_goes_on_and_all_recovers_when_it_is_back() {
    let mut c = Cluster::start();
    let a = c.addr_of("replica-a");
    let before = chat(a, None, &json!({"user_input": "before"}));
    assert_eq!(before.status, 200);
    c.redis.stop();

    let down = chat(a, None, &json!({"user_input": "during"}));
    assert_eq!(down.status, 503, "{}", down.text());
    assert_eq!(down.json()["error"], "session_store_unavailable");
    assert!(down.header("Retry-After").is_some());
    let ready = request(a, "GET", "/ready", &[], b"");
    assert_eq!(
        (ready.status, ready.json()["status"].clone()),
        (503, json!("session_store_unavailable"))
    );
    assert_eq!(request(a, "GET", "/health", &[], b"").status, 200);
    let v1 = json!({"messages": [{"role": "user", "content": "stateless"}]});
    let r = completions(c.nginx.addr, &[], &v1);
    assert_eq!(r.json()["choices"][0]["message"]["content"], "stateless");

    c.redis.restart();
    let t = Instant::now();
    loop {
        let r = chat(a, None, &json!({"user_input": "after"}));
        if r.status == 200 {
            assert_eq!(final_answer(&r.text()), "after");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no recovery: {}",
            r.text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(request(a, "GET", "/ready", &[], b"").status, 200);
}

#[test]
fn cookie_less_stateless_requests_spread_over_both_replicas() {
    let c = Cluster::start();
    let v1 = json!({"messages": [{"role": "user", "content": "spread"}]});
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..10 {
        let r = completions(c.nginx.addr, &[], &v1);
        assert_eq!(r.status, 200);
        *seen.entry(node(&r)).or_default() += 1;
    }
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["replica-a", "replica-b"],
        "{seen:?}"
    );
}
