//! The SDK against the real `matchlock` binary and real sandboxes, including the examples that
//! the crate documentation shows (compiled into this test as modules and run as written).
//!
//! Needs `target/debug/matchlock` (or `$MATCHLOCK_BIN`), the guest kernel and agent: `scripts/test`
//! builds them all before running the workspace's tests.

#[allow(dead_code)]
#[path = "../examples/quickstart.rs"]
mod quickstart;

#[allow(dead_code)]
#[path = "../examples/pipes_and_files.rs"]
mod pipes_and_files;

use matchlock_sdk::{Client, Error, ExecOptions, Sandbox};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

const IMAGE: &str = "mltest/sdk-busybox:1";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Points the SDK at the workspace's binary, gives the tests their own sandbox state directory
/// and imports the busybox test image once.
fn setup() {
    static HOME: OnceLock<tempfile::TempDir> = OnceLock::new();
    HOME.get_or_init(|| {
        let bin = std::env::var_os("MATCHLOCK_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo().join("target/debug/matchlock"));
        assert!(
            bin.is_file(),
            "{} is missing: build it first (scripts/test does, or 'cargo build -p matchlock-cli')",
            bin.display()
        );
        let home = tempfile::Builder::new()
            .prefix("mlsdk")
            .tempdir_in("/tmp")
            .unwrap();
        // SAFETY: set once, before any test thread reads the environment through the SDK.
        unsafe {
            std::env::set_var("MATCHLOCK_BIN", &bin);
            std::env::set_var("MATCHLOCK_HOME", home.path());
        }
        let work = tempfile::tempdir().unwrap();
        let tar = work.path().join("busybox.tar");
        let st = Command::new(repo().join("scripts/make-busybox-image"))
            .arg(&tar)
            .status()
            .unwrap();
        assert!(st.success());
        let out = Command::new(&bin)
            .args(["image", "import", IMAGE])
            .stdin(std::fs::File::open(&tar).unwrap())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        home
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn documented_quickstart_runs() {
    setup();
    let out = quickstart::quickstart(IMAGE).await.unwrap();
    assert!(out.starts_with("hello from vm-"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn documented_pipes_and_files_example_runs() {
    setup();
    pipes_and_files::pipes_and_files(IMAGE).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn terminal_launch_log_forwards_and_errors() {
    setup();
    let client = Client::start().await.unwrap();
    // Nothing to talk to yet.
    let e = client.exec("true").await.unwrap_err();
    assert!(e.is_vm_error(), "{e}");
    assert!(matches!(
        client.create(&Sandbox::new("")).await,
        Err(Error::Invalid(_))
    ));
    // A registry on a closed loopback port: the pull fails without leaving the machine.
    let e = client
        .create(&Sandbox::new("127.0.0.1:9/no/such:image"))
        .await
        .unwrap_err();
    assert!(
        e.is_vm_error() && e.to_string().contains("127.0.0.1:9"),
        "{e}"
    );

    let sandbox = Sandbox::new(IMAGE)
        .with_entrypoint(["sh", "-c", "echo launched; exec nc -ll -p 7000 -e cat"])
        .with_port_forward(0, 7000);
    let id = client.launch(&sandbox).await.unwrap();
    assert_eq!(client.vm_id().as_deref(), Some(id.as_str()));
    for _ in 0..100 {
        if client.log().await.unwrap().contains("launched") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(client.log().await.unwrap().contains("launched"));

    // The port forward that `with_port_forward` asked for, re-applied to learn its port.
    let bindings = client.port_forward(&[(0, 7000)]).await.unwrap();
    assert_eq!(bindings.len(), 1);
    let port = bindings[0].local_port;
    let echoed = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        for _ in 0..100 {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                let _ = s.write_all(b"through the forward");
                let _ = s.shutdown(std::net::Shutdown::Write);
                let mut got = Vec::new();
                if s.read_to_end(&mut got).is_ok() && !got.is_empty() {
                    return got;
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Vec::new()
    })
    .await
    .unwrap();
    assert_eq!(echoed, b"through the forward");

    // Paused, nothing runs; resumed, the listener (a guest process) still serves the forward.
    client.pause().await.unwrap();
    let e = client.exec("true").await.unwrap_err();
    assert!(e.to_string().contains("paused"), "{e}");
    client.resume().await.unwrap();
    let again = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(b"after the pause").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        got
    })
    .await
    .unwrap();
    assert_eq!(again, b"after the pause");

    // A terminal, with a resize while the command runs.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut screen = Vec::new();
    let stdin = std::io::Cursor::new(b"go\n".to_vec());
    tx.send((40, 120)).await.unwrap();
    let info = client
        .exec_interactive(
            "stty size; read x; sleep 1; stty size",
            &ExecOptions::default(),
            stdin,
            &mut screen,
            24,
            80,
            Some(rx),
        )
        .await
        .unwrap();
    assert_eq!(info.exit_code, 0);
    let text = String::from_utf8_lossy(&screen);
    assert!(text.contains("24 80") || text.contains("40 120"), "{text}");
    assert!(text.contains("40 120"), "{text}");

    let e = client.read_file("/no/such").await.unwrap_err();
    assert!(e.is_file_error(), "{e}");
    client.close(Duration::from_secs(2)).await.unwrap();
    client.remove().await.unwrap();
    // After close the server is gone.
    assert!(matches!(client.exec("true").await, Err(Error::Closed)));
}

#[tokio::test(flavor = "multi_thread")]
async fn dropping_the_client_stops_the_sandbox_and_volumes_work() {
    setup();
    let client = Client::start().await.unwrap();
    let vol = format!("sdkvol{}", std::process::id());
    let v = client.volume_create(&vol, 32).await.unwrap();
    assert!(v.path.is_file());
    assert!(client
        .volume_list()
        .await
        .unwrap()
        .iter()
        .any(|x| x.name == vol));
    // A workspace mount rides along: the guest's write lands in the host directory, shown as
    // owned by the chosen ids, and is reported as an event.
    let host_dir = tempfile::tempdir().unwrap();
    let mut events = client.file_events();
    let id = client
        .create(
            &Sandbox::new(IMAGE)
                .with_disk(format!("@{vol}"), "/vol", false)
                .with_workspace("/workspace")
                .mount_host_dir_owned("/workspace", host_dir.path().to_str().unwrap(), 1000, 1000)
                .with_vfs_events(),
        )
        .await
        .unwrap();
    client.exec("echo on-volume > /vol/f").await.unwrap();
    let r = client
        .exec("echo via-sdk > /workspace/w.txt; stat -c %u:%g /workspace/w.txt")
        .await
        .unwrap();
    assert_eq!(
        r.stdout,
        b"1000:1000\n",
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(host_dir.path().join("w.txt")).unwrap(),
        "via-sdk\n"
    );
    let write = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        while let Some(e) = events.recv().await {
            if e.op == "write" {
                return Some(e);
            }
        }
        None
    })
    .await
    .expect("no write event within 20 s")
    .expect("the event stream ended");
    assert_eq!((write.path.as_str(), write.size), ("/workspace/w.txt", 8));
    drop(client);
    let bin = std::env::var_os("MATCHLOCK_BIN").unwrap();
    let mut stopped = false;
    for _ in 0..150 {
        let out = Command::new(&bin).arg("list").output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("stopped"))
        {
            stopped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        stopped,
        "sandbox {id} still running after its client was dropped"
    );
    let client = Client::start().await.unwrap();
    client
        .create(&Sandbox::new(IMAGE).with_disk(format!("@{vol}"), "/vol", true))
        .await
        .unwrap();
    assert_eq!(
        client.exec("cat /vol/f").await.unwrap().stdout,
        b"on-volume\n"
    );
    client.close(Duration::from_secs(2)).await.unwrap();
    client.remove().await.unwrap();
    client.volume_remove(&vol).await.unwrap();
}

/// One HTTP/1.1 request through a gateway on loopback: the status line and the whole answer.
async fn http_get(port: u16, path: &str) -> String {
    let path = path.to_string();
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nhost: app.test\r\nconnection: close\r\n\r\n"
        )
        .unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        String::from_utf8_lossy(&got).into_owned()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn ingress_routes_hooks_and_a_closed_port() {
    use matchlock_sdk::{IngressHookAnswer, IngressOptions, IngressRoute};
    setup();
    let client = Client::start().await.unwrap();
    // busybox httpd serves /www on the guest's port 8000; nothing listens on 8001.
    let sandbox = Sandbox::new(IMAGE).with_entrypoint([
        "sh",
        "-c",
        "mkdir -p /www/api && echo hello > /www/index.html && echo '{\"a\":1}' > /www/api/data.json \
         && exec httpd -f -p 127.0.0.1:8000 -h /www",
    ]);
    client.launch(&sandbox).await.unwrap();
    let opts = IngressOptions::new()
        .route("/", 8000, false)
        .route("/closed", 8001, false)
        .on_allow(|c| {
            if c.path.starts_with("/admin") {
                IngressHookAnswer::deny(451, format!("no admin for {}\n", c.client_ip))
                    .with_header("x-why", "admin")
            } else {
                IngressHookAnswer::pass()
            }
        })
        .on_request(|c| {
            let a = IngressHookAnswer::pass().with_header("x-from-hook", "1");
            if c.path.ends_with(".json") {
                a.buffer_response(1 << 20)
            } else {
                a
            }
        })
        .on_response(|c| match c.body() {
            Some(b) => IngressHookAnswer::pass()
                .with_body(String::from_utf8_lossy(&b).to_uppercase())
                .with_header("x-rewritten", "1"),
            None => IngressHookAnswer::pass(),
        });
    let ingress = client.enable_ingress(&opts).await.unwrap();
    assert!(ingress.url.starts_with("http://127.0.0.1:"), "{ingress:?}");
    let port = ingress.port;

    // The server may still be starting.
    let mut page = String::new();
    for _ in 0..100 {
        page = http_get(port, "/index.html").await;
        if page.starts_with("HTTP/1.1 200") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        page.starts_with("HTTP/1.1 200") && page.ends_with("\r\n\r\nhello\n"),
        "{page}"
    );

    let refused = http_get(port, "/admin/x").await;
    assert!(refused.starts_with("HTTP/1.1 451"), "{refused}");
    assert!(refused.contains("x-why: admin"), "{refused}");
    assert!(refused.ends_with("no admin for 127.0.0.1\n"), "{refused}");

    let json = http_get(port, "/api/data.json").await;
    assert!(json.ends_with("{\"A\":1}\n"), "{json}");
    assert!(json.contains("x-rewritten: 1"), "{json}");

    let closed = http_get(port, "/closed/x").await;
    assert!(closed.starts_with("HTTP/1.1 502"), "{closed}");
    assert!(
        closed.contains("127.0.0.1:8001") && closed.contains("refused"),
        "{closed}"
    );

    // The routes live in the guest: readable there, and a program there may write its own.
    let routes = client.ingress_routes().await.unwrap();
    assert_eq!(routes.len(), 2);
    let file = client
        .read_file("/etc/matchlock/ingress-routes")
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&file).contains("/closed :8001"));
    client
        .exec("echo '/site :8000 strip' > /etc/matchlock/ingress-routes")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let page = http_get(port, "/site/index.html").await;
    assert!(page.ends_with("hello\n"), "{page}");
    assert_eq!(
        client.ingress_routes().await.unwrap(),
        vec![IngressRoute {
            prefix: "/site".into(),
            port: 8000,
            strip_prefix: true
        }]
    );
    let gone = http_get(port, "/index.html").await;
    assert!(gone.starts_with("HTTP/1.1 404"), "{gone}");

    // A hostile routes file (1 MB) is not read: the gateway keeps the routes it had.
    client
        .exec("head -c 1000000 /dev/zero > /etc/matchlock/ingress-routes")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let page = http_get(port, "/site/index.html").await;
    assert!(page.ends_with("hello\n"), "{page}");
    let e = client.ingress_routes().await.unwrap_err();
    assert!(e.to_string().contains("at most 65536"), "{e}");

    client.disable_ingress().await.unwrap();
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    client.close(Duration::from_secs(2)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn ssh_access_from_the_sdk() {
    setup();
    let client = Client::start().await.unwrap();
    client
        .launch(&Sandbox::new(IMAGE).with_entrypoint(["sleep", "100000"]))
        .await
        .unwrap();
    let access = client.enable_ssh("nobody").await.unwrap();
    assert!(access.command.starts_with("ssh -i "), "{access:?}");
    assert_eq!(access.args.last().unwrap(), "nobody@127.0.0.1");
    let out = tokio::process::Command::new("ssh")
        .args(&access.args)
        .args(["-o", "BatchMode=yes", "id -u; exit 4"])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "65534\n");
    client.disable_ssh().await.unwrap();
    assert!(std::net::TcpStream::connect(("127.0.0.1", access.port)).is_err());
    assert!(client.enable_ssh("bad user").await.is_err());
    client.close(Duration::from_secs(2)).await.unwrap();
}
