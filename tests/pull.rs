//! End-to-end test of registry pulls through the `matchlock` binary: a local `docker-registry`
//! on 127.0.0.1 holds the busybox test image (pushed with `skopeo`); `matchlock run` pulls it
//! automatically and boots it. The image store lives in a private `MATCHLOCK_CACHE_DIR`, so the
//! pull really downloads and builds; the guest kernel and the accelerator choice are borrowed
//! from the normal cache (the kernel must have been built first: `scripts/test` does it).
//!
//! Needs Debian's `docker-registry` and `skopeo` (`scripts/setup` installs them).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn in_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The normal cache directory (kernel, accelerator probe result).
fn default_cache() -> PathBuf {
    match std::env::var_os("MATCHLOCK_CACHE_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/matchlock"),
    }
}

/// Start `cmd` from a thread that lives as long as this process, with PR_SET_PDEATHSIG, so the
/// registry dies with the test binary (PDEATHSIG follows the spawning thread).
fn spawn_daemon(mut cmd: Command) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let _ = tx.send(cmd.spawn().map(|_| ()));
        loop {
            std::thread::park();
        }
    });
    rx.recv().unwrap().expect("start docker-registry");
}

/// A plain-HTTP registry on 127.0.0.1 with storage under `dir`; returns `127.0.0.1:<port>`.
fn start_registry(dir: &Path) -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    std::fs::create_dir_all(dir.join("storage")).unwrap();
    std::fs::write(
        dir.join("config.yml"),
        format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            dir.join("storage").display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new("docker-registry");
    cmd.arg("serve")
        .arg(dir.join("config.yml"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("registry.log")).unwrap());
    spawn_daemon(cmd);
    let start = Instant::now();
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "docker-registry did not start: {}",
            std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    addr
}

struct Env {
    cache: tempfile::TempDir,
    home: tempfile::TempDir,
}

impl Env {
    fn ml(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_matchlock"))
            .args(args)
            .env("MATCHLOCK_CACHE_DIR", self.cache.path())
            .env("MATCHLOCK_HOME", self.home.path())
            .env_remove("MATCHLOCK_INSECURE_REGISTRIES")
            .stdin(Stdio::null())
            .output()
            .expect("spawn matchlock")
    }
}

#[track_caller]
fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "matchlock failed ({:?})\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn run_pulls_a_missing_image_from_a_local_registry_and_boots_it() {
    let missing: Vec<&str> = ["docker-registry", "skopeo"]
        .into_iter()
        .filter(|t| !in_path(t))
        .collect();
    assert!(
        missing.is_empty(),
        "{} not installed: run scripts/setup (or apt-get install docker-registry skopeo)",
        missing.join(", ")
    );
    let work = tempfile::tempdir().unwrap();
    let addr = start_registry(&work.path().join("registry"));

    // The busybox test image, pushed as an OCI image.
    let tar = work.path().join("busybox.tar");
    let st = Command::new(repo_root().join("scripts/make-busybox-image"))
        .arg(&tar)
        .status()
        .unwrap();
    assert!(st.success(), "scripts/make-busybox-image failed");
    let image = format!("{addr}/mltest/pulled:1");
    let out = Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--dest-tls-verify=false"])
        .arg(format!("oci-archive:{}", tar.display()))
        .arg(format!("docker://{image}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A private image store; the kernel and the accelerator probe come from the normal cache.
    let env = Env {
        cache: tempfile::tempdir().unwrap(),
        home: tempfile::Builder::new()
            .prefix("mlp")
            .tempdir_in("/tmp")
            .unwrap(),
    };
    let shared = default_cache();
    for entry in ["kernel", "initramfs", "accel.json"] {
        if shared.join(entry).exists() {
            std::os::unix::fs::symlink(shared.join(entry), env.cache.path().join(entry)).unwrap();
        }
    }

    // Not in the store: `run` pulls it (progress on stderr) and boots it.
    let o = env.ml(&[
        "run",
        "--image",
        &image,
        "--",
        "sh",
        "-c",
        "echo pulled-ok; id -u",
    ]);
    assert_eq!(ok(&o), "pulled-ok\n0\n");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("pulling") && err.contains("layer"), "{err}");

    let ls = ok(&env.ml(&["image", "ls"]));
    assert!(ls.contains(&image), "{ls}");

    // --pull asks the registry again; nothing changed, so nothing is downloaded.
    let o = env.ml(&["run", "--pull", "--image", &image, "--", "true"]);
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("already in the store"), "{err}");

    // Bad input: one line that says what to do, exit status 1, nothing tagged.
    let o = env.ml(&["pull", &format!("{addr}/mltest/absent:1")]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    // Progress lines, then the error: one line that says what to do.
    let errors: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("matchlock: "))
        .collect();
    assert!(
        errors.len() == 1
            && errors[0].contains("was not found in registry")
            && err.trim().lines().last() == Some(errors[0]),
        "{err}"
    );

    // Disk full: the store on a 256 KiB tmpfs (in a private mount namespace) cannot hold the
    // layer; the pull fails with the one actionable line and leaves no tag.
    if Command::new("unshare")
        .args(["-rm", "true"])
        .status()
        .is_ok_and(|s| s.success())
    {
        let small = tempfile::tempdir().unwrap();
        let o = Command::new("unshare")
            .args(["-rm", "sh", "-c"])
            .arg(r#"mount -t tmpfs -o size=256k none "$0" && exec "$1" pull "$2""#)
            .arg(small.path())
            .arg(env!("CARGO_BIN_EXE_matchlock"))
            .arg(&image)
            .env("MATCHLOCK_CACHE_DIR", small.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        let last = err.trim().lines().last().unwrap_or("");
        assert!(
            last.starts_with("matchlock: ")
                && last.contains("no space left on device")
                && last.contains("matchlock image gc"),
            "{err}"
        );
    } else {
        panic!("the disk-full check needs 'unshare -rm' (unprivileged user namespaces)");
    }

    // `pull` prints the result; rm + gc leave an empty store.
    let out = ok(&env.ml(&["pull", &image]));
    assert!(
        out.starts_with(&format!("Pulling {image}...\n")) && out.contains("\nDigest: sha256:"),
        "{out}"
    );
    // -t also stores it under a local name, sharing its root file system.
    let out = ok(&env.ml(&["pull", "-t", "mltest/alias:2", &image]));
    assert!(out.contains("Tagged: docker.io/mltest/alias:2\n"), "{out}");
    let ls = ok(&env.ml(&["image", "ls"]));
    let alias = ls
        .lines()
        .find(|l| l.starts_with("docker.io/mltest/alias:2 "))
        .unwrap_or_else(|| panic!("{ls}"));
    assert_eq!(alias.split_whitespace().nth(1), Some("tag"), "{ls}");
    ok(&env.ml(&["image", "rm", "mltest/alias:2"]));
    ok(&env.ml(&["image", "rm", &image]));
    let gc = ok(&env.ml(&["image", "gc"]));
    assert!(gc.starts_with("Removed "), "{gc}");
    let left: Vec<_> = std::fs::read_dir(env.cache.path().join("images/blobs/sha256"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "blobs left after rm + gc: {left:?}");
}

/// A registry that accepts connections and then never answers: the pull says what it is
/// waiting for, then gives up with a message naming the registry, well within two minutes.
#[test]
fn a_registry_that_stops_answering_fails_with_a_clear_message() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming().flatten() {
            held.push(s); // accepted, read from never, answered never
        }
    });
    let cache = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let o = Command::new(env!("CARGO_BIN_EXE_matchlock"))
        .args(["pull", &format!("{addr}/mltest/stuck:1")])
        .env("MATCHLOCK_CACHE_DIR", cache.path())
        .env("MATCHLOCK_HOME", home.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("asking {addr}")),
        "no progress shown: {err}"
    );
    let last = err.trim().lines().last().unwrap_or("");
    assert!(
        last.starts_with("matchlock: ") && last.contains(&addr.to_string()),
        "{err}"
    );
    assert!(
        took < Duration::from_secs(100),
        "gave up only after {took:?}: {err}"
    );
}
