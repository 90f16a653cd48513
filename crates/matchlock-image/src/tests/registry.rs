//! Pull tests against a real registry: Debian's `docker-registry` on 127.0.0.1 (a free port, a
//! temp storage directory), filled with `skopeo copy` from OCI layouts built here with the same
//! tar builders as the import tests. Two registries are started once per test binary: a plain
//! HTTP one, and one with TLS (a CA made with rcgen) and htpasswd auth (bcrypt). All traffic
//! stays on 127.0.0.1.
//!
//! The registries are started from a thread that never ends, with `PR_SET_PDEATHSIG`, so they
//! die with the test process (PDEATHSIG follows the spawning *thread*). Storage directories of
//! earlier runs whose process is gone are removed at start.
//!
//! Without `docker-registry` or `skopeo` installed every test here prints a loud SKIPPED line
//! and passes; `.ci/run` installs both, so CI always runs them.

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::*;

const USER: &str = "tester";
const PASSWORD: &str = "pa55-Word!";

/// A running test registry.
struct Registry {
    /// `127.0.0.1:<port>`.
    addr: String,
    /// PEM of the CA that signed its certificate (TLS registry only).
    ca: Option<PathBuf>,
    /// Image digests by `repo:tag` pushed at start.
    pushed: HashMap<String, Pushed>,
    /// The registry's storage directory (tests corrupt blobs there).
    storage: PathBuf,
}

#[derive(Clone)]
struct Pushed {
    /// Config digest of the image the host platform should get.
    config: String,
    /// Manifest (or index) digest the tag points at.
    top: String,
    /// Layer blob digests of the host platform's image.
    layers: Vec<String>,
}

fn have_tool(name: &str) -> bool {
    crate::util::find_tool(name, name).is_ok()
}

/// False (after a loud message) when the registry tools are missing.
fn tools_present(test: &str) -> bool {
    let missing: Vec<&str> = ["docker-registry", "skopeo"]
        .into_iter()
        .filter(|t| !have_tool(t))
        .collect();
    if missing.is_empty() {
        return true;
    }
    eprintln!(
        "\n!!!!! SKIPPED {test}: {} not installed (apt-get install docker-registry skopeo); \
         registry pull tests did NOT run !!!!!\n",
        missing.join(", ")
    );
    false
}

/// A free port on 127.0.0.1 (bound and released; the registry binds it right after).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Start `cmd` from a thread that lives as long as the process, killed when the process dies.
fn spawn_daemon(mut cmd: Command) -> u32 {
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
        let _ = tx.send(cmd.spawn().map(|c| c.id()));
        // This thread is the child's parent for PDEATHSIG: keep it alive.
        loop {
            std::thread::park();
        }
    });
    rx.recv().unwrap().expect("start docker-registry")
}

/// Remove storage directories of earlier runs whose test process is gone.
fn sweep_old_dirs() {
    for entry in std::fs::read_dir(std::env::temp_dir()).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("mlreg-") else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !crate::util::pid_alive(pid) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

struct Secure {
    cert: String,
    key: String,
    ca: String,
    htpasswd: String,
}

fn make_secure() -> Secure {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "matchlock test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    leaf.subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let leaf_key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&leaf_key, &ca).unwrap();
    Secure {
        cert: cert.pem(),
        key: leaf_key.serialize_pem(),
        ca: ca.pem(),
        // Cost 4, the minimum: the registry checks it on every request.
        htpasswd: format!("{USER}:{}\n", bcrypt::hash(PASSWORD, 4).unwrap()),
    }
}

fn start(secure: bool) -> Registry {
    sweep_old_dirs();
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("mlreg-{}-{n}", std::process::id()));
    std::fs::create_dir_all(dir.join("storage")).unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut config = format!(
        "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n\
         storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
         http:\n  addr: {addr}\n",
        dir.join("storage").display()
    );
    let mut ca = None;
    if secure {
        let s = make_secure();
        for (name, body) in [
            ("cert.pem", &s.cert),
            ("key.pem", &s.key),
            ("ca.pem", &s.ca),
            ("htpasswd", &s.htpasswd),
        ] {
            std::fs::write(dir.join(name), body).unwrap();
        }
        config += &format!(
            "  tls:\n    certificate: {}\n    key: {}\nauth:\n  htpasswd:\n    realm: matchlock-test\n    path: {}\n",
            dir.join("cert.pem").display(),
            dir.join("key.pem").display(),
            dir.join("htpasswd").display()
        );
        ca = Some(dir.join("ca.pem"));
    }
    std::fs::write(dir.join("config.yml"), config).unwrap();
    let mut cmd =
        Command::new(crate::util::find_tool("docker-registry", "docker-registry").unwrap());
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
            "docker-registry did not listen on {addr}: {}",
            std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut reg = Registry {
        addr,
        ca,
        pushed: HashMap::new(),
        storage: dir.join("storage"),
    };
    fill(&mut reg, &dir, secure);
    reg
}

fn plain() -> Option<&'static Registry> {
    static R: OnceLock<Registry> = OnceLock::new();
    Some(R.get_or_init(|| start(false)))
}

fn secure() -> Option<&'static Registry> {
    static R: OnceLock<Registry> = OnceLock::new();
    Some(R.get_or_init(|| start(true)))
}

// ---------------------------------------------------------------------------------------------
// Fixtures: OCI layouts pushed with skopeo

/// One single-platform image: its blobs and manifest.
struct Img {
    config: Vec<u8>,
    layers: Vec<Vec<u8>>,
    manifest: Vec<u8>,
}

fn media(c: Comp) -> &'static str {
    match c {
        Comp::None => "application/vnd.oci.image.layer.v1.tar",
        Comp::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
        Comp::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
    }
}

fn img(layers: &[(Vec<u8>, Comp)], arch: &str, run: serde_json::Value) -> Img {
    let raw: Vec<Vec<u8>> = layers.iter().map(|(l, _)| l.clone()).collect();
    let mut config: serde_json::Value = serde_json::from_slice(&config_json(&raw, run)).unwrap();
    config["architecture"] = arch.into();
    let config = serde_json::to_vec(&config).unwrap();
    let blobs: Vec<Vec<u8>> = layers.iter().map(|(l, c)| compress(l, *c)).collect();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha(&config), "size": config.len()},
        "layers": blobs.iter().zip(layers).map(|(b, (_, c))| serde_json::json!({
            "mediaType": media(*c), "digest": sha(b), "size": b.len()})).collect::<Vec<_>>(),
    }))
    .unwrap();
    Img {
        config,
        layers: blobs,
        manifest,
    }
}

fn desc(media: &str, data: &[u8]) -> serde_json::Value {
    serde_json::json!({"mediaType": media, "digest": sha(data), "size": data.len()})
}

/// Write an OCI layout holding `imgs` (an index with platforms when more than one) tagged
/// `tag`, and copy it to `reg` as `repo:tag`.
fn push(
    reg: &mut Registry,
    dir: &Path,
    repo: &str,
    tag: &str,
    imgs: &[(&Img, &str)],
    secure: bool,
) {
    let layout = dir.join(format!("layout-{}-{tag}", repo.replace('/', "_")));
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| std::fs::write(blobs.join(&sha(data)[7..]), data).unwrap();
    const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    const INDEX: &str = "application/vnd.oci.image.index.v1+json";
    for (i, _) in imgs {
        put(&i.config);
        put(&i.manifest);
        for l in &i.layers {
            put(l);
        }
    }
    let (top_media, top) = if imgs.len() == 1 {
        (MANIFEST, imgs[0].0.manifest.clone())
    } else {
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": INDEX,
            "manifests": imgs.iter().map(|(i, arch)| {
                let mut d = desc(MANIFEST, &i.manifest);
                d["platform"] = serde_json::json!({"os": "linux", "architecture": arch});
                d
            }).collect::<Vec<_>>(),
        }))
        .unwrap();
        put(&index);
        (INDEX, index)
    };
    let mut top_desc = desc(top_media, &top);
    top_desc["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [top_desc]}))
            .unwrap(),
    )
    .unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let mut cmd = Command::new("skopeo");
    cmd.args([
        "--insecure-policy",
        "copy",
        "--all",
        "--preserve-digests",
        "--dest-tls-verify=false",
    ]);
    if secure {
        cmd.arg(format!("--dest-creds={USER}:{PASSWORD}"));
    }
    let out = cmd
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker://{}/{repo}:{tag}", reg.addr))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo copy to {repo}:{tag}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let host = imgs
        .iter()
        .find(|(_, a)| *a == crate::archive::host_arch())
        .map(|(i, _)| *i)
        .unwrap_or(imgs[0].0);
    reg.pushed.insert(
        format!("{repo}:{tag}"),
        Pushed {
            config: sha(&host.config),
            top: sha(&top),
            layers: host.layers.iter().map(|l| sha(l)).collect(),
        },
    );
}

/// The multi-layer image: one gzip, one uncompressed and one zstd layer, with whiteouts and
/// an opaque directory (the same layers the import test checks).
fn layered() -> Img {
    let l = whiteout_layers();
    img(
        &[
            (l[0].clone(), Comp::Gzip),
            (l[1].clone(), Comp::None),
            (l[2].clone(), Comp::Zstd),
        ],
        "amd64",
        serde_json::json!({"Env": ["PATH=/bin", "WHO=layered"], "Entrypoint": ["/bin/sh"],
                           "Cmd": ["-c", "true"], "WorkingDir": "/d", "User": "1000:1000"}),
    )
}

fn fill(reg: &mut Registry, dir: &Path, secure: bool) {
    if secure {
        let i = img(&[(special_layer(), Comp::Gzip)], "amd64", sh_run());
        push(reg, dir, "private/special", "1", &[(&i, "amd64")], true);
        return;
    }
    push(
        reg,
        dir,
        "test/layered",
        "1",
        &[(&layered(), "amd64")],
        false,
    );
    // Multi-arch: the same layer, configs that differ by their ARCH variable.
    let base = special_layer();
    let amd = img(
        &[(base.clone(), Comp::Gzip)],
        "amd64",
        serde_json::json!({"Env": ["PATH=/bin", "ARCH=amd64"], "Cmd": ["sh"]}),
    );
    let arm = img(
        &[(base.clone(), Comp::Gzip)],
        "arm64",
        serde_json::json!({"Env": ["PATH=/bin", "ARCH=arm64"], "Cmd": ["sh"]}),
    );
    push(
        reg,
        dir,
        "test/multi",
        "1",
        &[(&arm, "arm64"), (&amd, "amd64")],
        false,
    );
    let arm_only = img(&[(base, Comp::Gzip)], "arm64", sh_run());
    push(
        reg,
        dir,
        "test/armonly",
        "1",
        &[(&arm_only, "arm64"), (&arm_only, "s390x")],
        false,
    );
    let special = img(&[(special_layer(), Comp::Zstd)], "amd64", sh_run());
    push(reg, dir, "test/special", "1", &[(&special, "amd64")], false);
    let evil = img(
        &[(
            layer(&[Ent::File("../escape", 0o644, 0, 0, b"x")]),
            Comp::Gzip,
        )],
        "amd64",
        sh_run(),
    );
    push(reg, dir, "test/evil", "1", &[(&evil, "amd64")], false);
    // A symlink to / in one layer, a write through it in the next.
    let through = img(
        &[
            (layer(&[Ent::Sym("escape", "/", 0, 0)]), Comp::Gzip),
            (
                layer(&[Ent::File("escape/tmp/pwned-by-layer", 0o644, 0, 0, b"x")]),
                Comp::Gzip,
            ),
        ],
        "amd64",
        sh_run(),
    );
    push(reg, dir, "test/through", "1", &[(&through, "amd64")], false);
    // An image whose layer the test corrupts inside the registry's storage.
    let victim = img(
        &[(
            layer(&[Ent::File("victim", 0o644, 0, 0, &[3u8; 100_000])]),
            Comp::Gzip,
        )],
        "amd64",
        sh_run(),
    );
    push(reg, dir, "test/victim", "1", &[(&victim, "amd64")], false);
    // A second, independent image for gc and resume tests.
    let other = img(
        &[(
            layer(&[Ent::File("other", 0o644, 0, 0, &[7u8; 300_000])]),
            Comp::Gzip,
        )],
        "amd64",
        sh_run(),
    );
    push(reg, dir, "test/other", "1", &[(&other, "amd64")], false);
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// Records pull events as short strings.
#[derive(Default)]
struct Events(Mutex<Vec<String>>);

impl PullProgress for Events {
    fn event(&self, e: PullEvent<'_>) {
        let s = match e {
            PullEvent::LayerStart { resumed_at, .. } => format!("start@{resumed_at}"),
            PullEvent::LayerDone { cached, .. } => format!("done cached={cached}"),
            PullEvent::CorruptCacheEntry { .. } => "corrupt".into(),
            PullEvent::UpToDate => "uptodate".into(),
            PullEvent::Building => "building".into(),
            PullEvent::Resolved { .. } => "resolved".into(),
            PullEvent::Contacting { .. } => "contacting".into(),
            PullEvent::LayerProgress { .. } => return,
        };
        self.0.lock().unwrap().push(s);
    }
}

impl Events {
    fn has(&self, s: &str) -> bool {
        self.0.lock().unwrap().iter().any(|e| e == s)
    }
    fn count_prefix(&self, p: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.starts_with(p))
            .count()
    }
}

/// Options for the plain registry: no credentials, no Docker config.
fn opts() -> PullOptions {
    PullOptions::default()
}

fn pull(s: &ImageStore, reg: &Registry, name: &str) -> Result<ImageInfo, ImageError> {
    s.pull(&format!("{}/{name}", reg.addr), &opts(), &NoProgress)
}

fn tags(s: &ImageStore) -> Vec<String> {
    s.list().unwrap().into_iter().map(|i| i.name).collect()
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn pull_multi_layer_image_with_whiteouts_and_three_compressions() {
    if !tools_present("pull_multi_layer_image_with_whiteouts_and_three_compressions") {
        return;
    }
    let reg = plain().unwrap();
    let (_d, s) = store();
    let ev = Events::default();
    let name = format!("{}/test/layered:1", reg.addr);
    let info = s.pull(&name, &opts(), &ev).unwrap();
    let pushed = &reg.pushed["test/layered:1"];
    assert_eq!(info.digest, pushed.config);
    assert_eq!(info.name, name);
    assert_eq!(
        info.config,
        ImageConfig {
            env: vec!["PATH=/bin".into(), "WHO=layered".into()],
            entrypoint: Some(vec!["/bin/sh".into()]),
            cmd: Some(vec!["-c".into(), "true".into()]),
            working_dir: Some("/d".into()),
            user: Some("1000:1000".into()),
        }
    );
    assert_eq!(info.created.as_deref(), Some("2024-05-01T10:00:00Z"));
    assert_eq!(ev.count_prefix("start@0"), 3, "{:?}", ev.0.lock().unwrap());
    let img = &info.rootfs;
    assert!(stat(img, "/a/x").is_none());
    assert_eq!(cat(img, "/a/y"), "y");
    assert_eq!(cat(img, "/b/new"), "new");
    assert!(stat(img, "/b/1").is_none() && stat(img, "/b/sub").is_none());
    assert_eq!(cat(img, "/c"), "again");
    assert_eq!(cat(img, "/e"), "new");
    fsck_clean(img);
    // Every blob is in the store under its digest; the tag resolves.
    for l in &pushed.layers {
        assert!(s.root().join("blobs/sha256").join(&l[7..]).exists());
    }
    assert_eq!(s.resolve(&name).unwrap().digest, info.digest);
    assert!(tmp_is_empty(&s));

    // A second pull asks the registry but downloads nothing.
    let ev = Events::default();
    s.pull(&name, &opts(), &ev).unwrap();
    assert!(ev.has("uptodate") && ev.count_prefix("start") == 0);

    // By digest: `repo@sha256:<manifest>`, tagged under that name.
    let by_digest = format!("{}/test/layered@{}", reg.addr, pushed.top);
    let info2 = s.pull(&by_digest, &opts(), &NoProgress).unwrap();
    assert_eq!(
        (info2.digest.as_str(), info2.name.as_str()),
        (info.digest.as_str(), by_digest.as_str())
    );
    // ensure(): local hit without the registry, Never without a tag fails cleanly.
    let hit = s
        .ensure(&name, PullPolicy::Missing, &opts(), &NoProgress)
        .unwrap();
    assert_eq!(hit.digest, info.digest);
    let err = s
        .ensure(
            &format!("{}/test/other:1", reg.addr),
            PullPolicy::Never,
            &opts(),
            &NoProgress,
        )
        .unwrap_err();
    assert!(matches!(err, ImageError::NotFound { .. }), "{err}");
}

#[test]
fn pull_multi_arch_index_picks_linux_amd64() {
    if !tools_present("pull_multi_arch_index_picks_linux_amd64") {
        return;
    }
    let reg = plain().unwrap();
    let (_d, s) = store();
    let info = pull(&s, reg, "test/multi:1").unwrap();
    assert_eq!(info.digest, reg.pushed["test/multi:1"].config);
    assert!(
        info.config.env.contains(&"ARCH=amd64".to_string()),
        "{:?}",
        info.config.env
    );
    // An index without our platform: a clear error naming what it has.
    let err = pull(&s, reg, "test/armonly:1").unwrap_err().to_string();
    assert!(
        err.contains("no linux/amd64 image") && err.contains("linux/arm64"),
        "{err}"
    );
    assert_eq!(tags(&s).len(), 1);
}

#[test]
fn pull_keeps_owners_modes_links_devices_xattrs_without_root() {
    if !tools_present("pull_keeps_owners_modes_links_devices_xattrs_without_root") {
        return;
    }
    let reg = plain().unwrap();
    // Unprivileged: no lchown/mknod; the debugfs fix-ups must restore everything.
    let (_d, s) = store();
    let s = unprivileged(s);
    let info = pull(&s, reg, "test/special:1").unwrap();
    check_special(&info.rootfs);
    // And the privileged path gives the same result.
    let (_d2, s2) = store();
    let info2 = pull(&s2, reg, "test/special:1").unwrap();
    check_special(&info2.rootfs);
}

#[test]
fn pull_rejects_layer_entries_escaping_the_root() {
    if !tools_present("pull_rejects_layer_entries_escaping_the_root") {
        return;
    }
    let reg = plain().unwrap();
    let (_d, s) = store();
    let err = pull(&s, reg, "test/evil:1").unwrap_err();
    assert!(
        matches!(&err, ImageError::UnsafeEntry { reason, .. } if reason.contains("..")),
        "{err}"
    );
    assert!(tags(&s).is_empty());
    assert!(std::fs::read_dir(s.root().join("rootfs"))
        .unwrap()
        .next()
        .is_none());
    assert!(tmp_is_empty(&s));
}

#[test]
fn pull_rejects_writes_through_symlinks() {
    if !tools_present("pull_rejects_writes_through_symlinks") {
        return;
    }
    let reg = plain().unwrap();
    let (_d, s) = store();
    // A symlink to / in one layer, a write through it in the next.
    let err = pull(&s, reg, "test/through:1").unwrap_err();
    assert!(
        matches!(&err, ImageError::UnsafeEntry { reason, .. } if reason.contains("symlink")),
        "{err}"
    );
    assert!(!Path::new("/tmp/pwned-by-layer").exists());
    assert!(tags(&s).is_empty());
    assert!(tmp_is_empty(&s));
}

#[test]
fn blob_corrupted_in_the_registry_is_refused() {
    if !tools_present("blob_corrupted_in_the_registry_is_refused") {
        return;
    }
    let reg = plain().unwrap();
    let digest = &reg.pushed["test/victim:1"].layers[0];
    let hex = &digest[7..];
    let data = reg
        .storage
        .join("docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data");
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&data, &bytes).unwrap();
    let (_d, s) = store();
    let err = pull(&s, reg, "test/victim:1").unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(digest.as_str()) && msg.contains("retry the pull"),
        "{msg}"
    );
    // Nothing unverified was kept: no blob, no partial download, no tag.
    assert!(!s.root().join("blobs/sha256").join(hex).exists());
    assert!(tmp_is_empty(&s));
    assert!(tags(&s).is_empty());
}

/// A registry front that demands Docker Hub-style bearer tokens: `/v2/...` without
/// `Authorization: Bearer <token>` gets 401 with a `Bearer realm=...` challenge; the realm hands
/// anyone a token (anonymous pulls); authorised requests are passed to the plain registry.
/// Returns its address and a log of the requests it saw.
fn bearer_front(upstream: &str) -> (String, std::sync::Arc<Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
    let (me, log, upstream) = (addr.clone(), seen.clone(), upstream.to_string());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let (me, log, upstream) = (me.clone(), log.clone(), upstream.clone());
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut conn = conn;
                loop {
                    let mut head = Vec::new();
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        head.push(line.trim_end().to_string());
                    }
                    let target = head[0].split(' ').nth(1).unwrap_or("").to_string();
                    let authed = head.iter().any(|h| {
                        h.to_ascii_lowercase()
                            .starts_with("authorization: bearer tok-123")
                    });
                    log.lock()
                        .unwrap()
                        .push(format!("{target} authed={authed}"));
                    if target.starts_with("/token") {
                        let body = r#"{"token":"tok-123","expires_in":300}"#;
                        let _ = write!(
                            conn,
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                             Content-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        continue;
                    }
                    if !authed {
                        let body =
                            r#"{"errors":[{"code":"UNAUTHORIZED","message":"token required"}]}"#;
                        let _ = write!(
                            conn,
                            "HTTP/1.1 401 Unauthorized\r\n\
                             WWW-Authenticate: Bearer realm=\"http://{me}/token\",service=\"test-registry\"\r\n\
                             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        continue;
                    }
                    // Forward this request; the upstream's close delimits its response.
                    let mut up = std::net::TcpStream::connect(&upstream).unwrap();
                    let mut req = format!("{}\r\n", head[0]);
                    for h in &head[1..] {
                        let l = h.to_ascii_lowercase();
                        if !(l.starts_with("authorization:") || l.starts_with("connection:")) {
                            req += &format!("{h}\r\n");
                        }
                    }
                    req += "Connection: close\r\n\r\n";
                    up.write_all(req.as_bytes()).unwrap();
                    let _ = std::io::copy(&mut up, &mut conn);
                    return;
                }
            });
        }
    });
    (addr, seen)
}

#[test]
fn anonymous_bearer_token_flow() {
    if !tools_present("anonymous_bearer_token_flow") {
        return;
    }
    let reg = plain().unwrap();
    let (front, seen) = bearer_front(&reg.addr);
    let (_d, s) = store();
    let info = s
        .pull(&format!("{front}/test/layered:1"), &opts(), &NoProgress)
        .unwrap();
    assert_eq!(info.digest, reg.pushed["test/layered:1"].config);
    let seen = seen.lock().unwrap();
    assert!(
        seen.iter()
            .any(|l| l.starts_with("/token?") && l.contains("repository%3Atest%2Flayered%3Apull")),
        "{seen:?}"
    );
    // Manifests and blobs were fetched with the token.
    for kind in ["/manifests/", "/blobs/"] {
        assert!(
            seen.iter()
                .any(|l| l.contains(kind) && l.ends_with("authed=true")),
            "{kind}: {seen:?}"
        );
    }
}

#[test]
fn pull_errors_are_one_line_and_actionable() {
    if !tools_present("pull_errors_are_one_line_and_actionable") {
        return;
    }
    let reg = plain().unwrap();
    let (_d, s) = store();
    let check = |name: String, needles: &[&str]| {
        let err = s.pull(&name, &opts(), &NoProgress).unwrap_err().to_string();
        assert!(!err.contains('\n'), "one line: {err}");
        for n in needles {
            assert!(err.contains(n), "{name}: expected {n:?} in: {err}");
        }
    };
    check(
        format!("{}/test/nosuchrepo:1", reg.addr),
        &["was not found in registry", "check the name and tag"],
    );
    check(
        format!("{}/test/layered:nosuchtag", reg.addr),
        &["was not found in registry"],
    );
    let unknown_digest = format!("sha256:{}", "0".repeat(64));
    check(
        format!("{}/test/layered@{unknown_digest}", reg.addr),
        &["was not found in registry"],
    );
    // Registry down: a port nothing listens on.
    let down = format!("127.0.0.1:{}", free_port());
    check(
        format!("{down}/test/layered:1"),
        &["cannot reach registry", &down, "is running"],
    );
    // A non-loopback registry is never spoken to over plain HTTP: HTTPS is tried (and, on this
    // loopback-only machine, fails without sending anything anywhere but 127.0.0.1).
    let cfg = RegistryConfig::default();
    assert!(!cfg.allows_plain_http("registry.example.com"));
    assert!(tags(&s).is_empty());
    assert!(tmp_is_empty(&s));
}

#[test]
fn pull_from_tls_registry_with_htpasswd_auth() {
    if !tools_present("pull_from_tls_registry_with_htpasswd_auth") {
        return;
    }
    let reg = secure().unwrap();
    let ca = reg.ca.clone().unwrap();
    let name = format!("{}/private/special:1", reg.addr);
    let (_d, s) = store();
    let with = |cfg: RegistryConfig| {
        s.pull(
            &name,
            &PullOptions {
                registry: cfg,
                ..Default::default()
            },
            &NoProgress,
        )
    };
    let creds = |user: &str, pass: &str| RegistryConfig {
        username: Some(user.into()),
        password: Some(pass.into()),
        extra_ca: Some(ca.clone()),
        ..Default::default()
    };

    // No CA: the certificate does not verify, and we never fall back to plain HTTP.
    let err = with(RegistryConfig {
        username: Some(USER.into()),
        password: Some(PASSWORD.into()),
        ..Default::default()
    })
    .unwrap_err();
    assert!(matches!(err, ImageError::Tls { .. }), "{err}");
    assert!(err.to_string().contains("MATCHLOCK_REGISTRY_CA"), "{err}");

    // CA but no credentials.
    let err = with(RegistryConfig {
        extra_ca: Some(ca.clone()),
        ..Default::default()
    })
    .unwrap_err();
    assert!(matches!(err, ImageError::Unauthorized { .. }), "{err}");
    assert!(
        err.to_string().contains("MATCHLOCK_REGISTRY_USERNAME"),
        "{err}"
    );

    // Wrong password: rejected, and the message never shows the secret.
    let err = with(creds(USER, "wrong-secret-value"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("were rejected"), "{err}");
    assert!(
        !err.contains("wrong-secret-value") && !err.contains(PASSWORD),
        "{err}"
    );

    // Right credentials from the environment-style settings.
    let info = with(creds(USER, PASSWORD)).unwrap();
    check_special(&info.rootfs);

    // Right credentials from a Docker config file.
    let (_d2, s2) = store();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    std::fs::write(
        &config,
        serde_json::json!({"auths": {reg.addr.clone(): {"auth": auth}}}).to_string(),
    )
    .unwrap();
    let cfg = RegistryConfig {
        docker_config: Some(config),
        extra_ca: Some(ca.clone()),
        ..Default::default()
    };
    let info2 = s2
        .pull(
            &name,
            &PullOptions {
                registry: cfg,
                ..Default::default()
            },
            &NoProgress,
        )
        .unwrap();
    assert_eq!(info2.digest, info.digest);
}

#[test]
fn corrupt_cached_blob_is_detected_and_fetched_again() {
    if !tools_present("corrupt_cached_blob_is_detected_and_fetched_again") {
        return;
    }
    let reg = plain().unwrap();
    let (_d, s) = store();
    let info = pull(&s, reg, "test/layered:1").unwrap();
    let layer = &reg.pushed["test/layered:1"].layers[0];
    let blob = s.root().join("blobs/sha256").join(&layer[7..]);
    let good = std::fs::read(&blob).unwrap();
    let mut bad = good.clone();
    bad[good.len() / 2] ^= 0xff;
    std::fs::write(&blob, &bad).unwrap();
    // Lose the rootfs so the layers are needed again (as after an interrupted pull).
    std::fs::remove_file(&info.rootfs).unwrap();
    let ev = Events::default();
    let info2 = s
        .pull(&format!("{}/test/layered:1", reg.addr), &opts(), &ev)
        .unwrap();
    assert!(ev.has("corrupt"), "{:?}", ev.0.lock().unwrap());
    assert_eq!(ev.count_prefix("done cached=true"), 2);
    assert_eq!(
        std::fs::read(&blob).unwrap(),
        good,
        "the blob was fetched again"
    );
    assert!(info2.rootfs.exists());
    // `force` ignores the cache altogether.
    let ev = Events::default();
    let forced = PullOptions {
        force: true,
        ..opts()
    };
    s.pull(&format!("{}/test/layered:1", reg.addr), &forced, &ev)
        .unwrap();
    assert_eq!(ev.count_prefix("start@0"), 3);
}

#[test]
fn interrupted_download_resumes_and_bad_partials_are_discarded() {
    if !tools_present("interrupted_download_resumes_and_bad_partials_are_discarded") {
        return;
    }
    let reg = plain().unwrap();
    let pushed = &reg.pushed["test/other:1"];
    let digest = &pushed.layers[0];
    // The blob as the registry has it, to fake what an interrupted pull leaves in tmp/.
    let (_d0, s0) = store();
    pull(&s0, reg, "test/other:1").unwrap();
    let full = std::fs::read(s0.root().join("blobs/sha256").join(&digest[7..])).unwrap();
    let half = full.len() / 2;

    // Half of the right bytes: the pull continues at that offset.
    let (_d, s) = store();
    let partial = s.root().join(format!("tmp/blob-{}.partial", &digest[7..]));
    std::fs::write(&partial, &full[..half]).unwrap();
    let ev = Events::default();
    s.pull(&format!("{}/test/other:1", reg.addr), &opts(), &ev)
        .unwrap();
    assert!(
        ev.has(&format!("start@{half}")),
        "{:?}",
        ev.0.lock().unwrap()
    );
    assert!(!partial.exists());
    assert_eq!(
        std::fs::read(s.root().join("blobs/sha256").join(&digest[7..])).unwrap(),
        full
    );

    // Garbage in the partial file: never used unverified; discarded and downloaded again.
    let (_d2, s2) = store();
    let partial = s2.root().join(format!("tmp/blob-{}.partial", &digest[7..]));
    std::fs::write(&partial, vec![0u8; half]).unwrap();
    let ev = Events::default();
    let info = s2
        .pull(&format!("{}/test/other:1", reg.addr), &opts(), &ev)
        .unwrap();
    assert!(
        ev.has(&format!("start@{half}")) && ev.has("start@0"),
        "{:?}",
        ev.0.lock().unwrap()
    );
    assert_eq!(cat(&info.rootfs, "/other").len(), 300_000);

    // A partial file that is already complete (died before the rename): verified and used
    // without asking the registry for an empty range.
    let (_d3, s3) = store();
    let partial = s3.root().join(format!("tmp/blob-{}.partial", &digest[7..]));
    std::fs::write(&partial, &full).unwrap();
    let ev = Events::default();
    s3.pull(&format!("{}/test/other:1", reg.addr), &opts(), &ev)
        .unwrap();
    assert!(
        ev.has(&format!("start@{}", full.len())),
        "{:?}",
        ev.0.lock().unwrap()
    );
    assert!(!partial.exists());
}

#[test]
fn gc_removes_unreferenced_blobs_rootfs_and_stale_tmp() {
    if !tools_present("gc_removes_unreferenced_blobs_rootfs_and_stale_tmp") {
        return;
    }
    let reg = plain().unwrap();
    let (_d, s) = store();
    let keep = pull(&s, reg, "test/layered:1").unwrap();
    let gone = pull(&s, reg, "test/other:1").unwrap();
    // An interrupted pull's leftovers: a verified but untagged blob, a partial download, the
    // work directory of a dead process, and an orphaned rootfs.
    std::fs::write(s.root().join("blobs/sha256").join("a".repeat(64)), b"x").unwrap();
    std::fs::write(s.root().join("tmp/blob-feed.partial"), b"partial").unwrap();
    std::fs::create_dir(s.root().join("tmp/pull-999999999-1-1")).unwrap();
    std::fs::write(
        s.root()
            .join("rootfs")
            .join(format!("{}.ext4", "b".repeat(64))),
        b"x",
    )
    .unwrap();
    // Removing a tag already collects what only it used.
    s.remove(&gone.name).unwrap();
    assert!(!gone.rootfs.exists());
    let report = s.gc().unwrap();
    assert_eq!(
        (
            report.blobs,
            report.rootfs,
            report.tmp,
            report.pull_in_progress
        ),
        (1, 1, 2, false),
        "{report:?}"
    );
    // What the remaining tag uses is untouched and still verifies.
    assert!(keep.rootfs.exists());
    for l in &reg.pushed["test/layered:1"].layers {
        let (d, _) =
            crate::util::sha256_file(&s.root().join("blobs/sha256").join(&l[7..])).unwrap();
        assert_eq!(&d, l);
    }
    assert_eq!(s.gc().unwrap(), GcReport::default());
    // While a pull holds pulls.lock, blobs are left alone.
    let _pulling = crate::util::FileLock::shared(&s.root().join("pulls.lock")).unwrap();
    std::fs::write(s.root().join("blobs/sha256").join("c".repeat(64)), b"x").unwrap();
    let report = s.gc().unwrap();
    assert!(report.pull_in_progress && report.blobs == 0, "{report:?}");
}

#[test]
fn disk_full_errors_say_what_to_do() {
    // ENOSPC anywhere in the store turns into the one actionable message.
    let err = ImageError::io(
        "writing layer sha256:abc",
        std::io::Error::from_raw_os_error(libc::ENOSPC),
    );
    assert!(matches!(err, ImageError::DiskFull { .. }));
    assert_eq!(
        err.to_string(),
        "writing layer sha256:abc: no space left on device; free disk space (for example with 'matchlock image gc') and retry"
    );
}

/// The whole pull run by a real unprivileged user, not just `force_unprivileged`: when the tests
/// run as root, this test re-executes its own binary as uid/gid 65534 (std drops the
/// supplementary groups), which pulls into a store it owns and checks owners, setuid/setgid bits,
/// device nodes and xattrs in the ext4 with debugfs.
#[test]
fn pull_as_a_real_unprivileged_user_keeps_owners_and_setuid_bits() {
    const NAME: &str =
        "tests::registry::pull_as_a_real_unprivileged_user_keeps_owners_and_setuid_bits";
    if let (Ok(dir), Ok(addr)) = (
        std::env::var("MLTEST_UNPRIV_STORE"),
        std::env::var("MLTEST_UNPRIV_REGISTRY"),
    ) {
        // The re-executed child.
        assert_ne!(crate::util::euid(), 0, "the child must not be root");
        let s = ImageStore::open(dir).unwrap();
        let info = s
            .pull(&format!("{addr}/test/special:1"), &opts(), &NoProgress)
            .unwrap();
        check_special(&info.rootfs);
        return;
    }
    if !tools_present("pull_as_a_real_unprivileged_user_keeps_owners_and_setuid_bits") {
        return;
    }
    if crate::util::euid() != 0 {
        // Already unprivileged: pull_keeps_owners_modes_links_devices_xattrs_without_root is
        // the real thing.
        return;
    }
    let reg = plain().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("images");
    std::fs::create_dir(&store).unwrap();
    std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap();
    std::os::unix::fs::chown(&store, Some(65534), Some(65534)).unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
        .env("MLTEST_UNPRIV_STORE", &store)
        .env("MLTEST_UNPRIV_REGISTRY", &reg.addr)
        .env("HOME", dir.path())
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("1 passed"),
        "unprivileged child failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The rootfs belongs to the unprivileged user, proving who built it.
    let rootfs = std::fs::read_dir(store.join("rootfs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(rootfs.metadata().unwrap().uid(), 65534);
}

#[test]
fn concurrent_pulls_of_one_image_share_blobs_and_rootfs() {
    if !tools_present("concurrent_pulls_of_one_image_share_blobs_and_rootfs") {
        return;
    }
    let reg = plain().unwrap();
    let (_d, s) = store();
    let name = format!("{}/test/layered:1", reg.addr);
    let infos: Vec<ImageInfo> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..3)
            .map(|_| scope.spawn(|| s.pull(&name, &opts(), &NoProgress).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(infos.iter().all(|i| i.rootfs == infos[0].rootfs));
    assert_eq!(
        std::fs::read_dir(s.root().join("rootfs")).unwrap().count(),
        1
    );
    for l in &reg.pushed["test/layered:1"].layers {
        let (d, _) =
            crate::util::sha256_file(&s.root().join("blobs/sha256").join(&l[7..])).unwrap();
        assert_eq!(&d, l);
    }
    fsck_clean(&infos[0].rootfs);
    assert!(tmp_is_empty(&s));
}

/// A pass-through front for `upstream` that, the first time blob `digest` is requested, sends
/// the response headers and only the first half of the body, then hangs up: a real interrupted
/// download. Later requests pass through untouched.
fn cutting_front(upstream: &str, digest: &str) -> String {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::atomic::{AtomicBool, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (upstream, digest) = (upstream.to_string(), digest.to_string());
    let cut_done = std::sync::Arc::new(AtomicBool::new(false));
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let (upstream, cut_done, digest) = (upstream.clone(), cut_done.clone(), digest.clone());
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut head = Vec::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if line == "\r\n" {
                        break;
                    }
                    head.push(line.trim_end().to_string());
                }
                let mut req = format!("{}\r\n", head[0]);
                for h in &head[1..] {
                    if !h.to_ascii_lowercase().starts_with("connection:") {
                        req += &format!("{h}\r\n");
                    }
                }
                req += "Connection: close\r\n\r\n";
                let mut up = std::net::TcpStream::connect(&upstream).unwrap();
                up.write_all(req.as_bytes()).unwrap();
                let mut response = Vec::new();
                up.read_to_end(&mut response).unwrap();
                let is_blob =
                    head[0].starts_with("GET ") && head[0].contains(&format!("/blobs/{digest}"));
                if is_blob && !cut_done.swap(true, Ordering::SeqCst) {
                    let body_at = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    let half = body_at + (response.len() - body_at) / 2;
                    let _ = conn.write_all(&response[..half]);
                    return; // hang up mid-body
                }
                let _ = conn.write_all(&response);
            });
        }
    });
    addr
}

#[test]
fn download_cut_off_mid_blob_resumes_on_the_next_pull() {
    if !tools_present("download_cut_off_mid_blob_resumes_on_the_next_pull") {
        return;
    }
    let reg = plain().unwrap();
    let digest = &reg.pushed["test/other:1"].layers[0];
    let front = cutting_front(&reg.addr, digest);
    let name = format!("{front}/test/other:1");
    let (_d, s) = store();
    let err = s.pull(&name, &opts(), &NoProgress).unwrap_err().to_string();
    assert!(
        err.contains("broke off") && err.contains("run the pull again to resume it"),
        "{err}"
    );
    assert!(tags(&s).is_empty());
    let partial = s.root().join(format!("tmp/blob-{}.partial", &digest[7..]));
    let kept = std::fs::metadata(&partial).unwrap().len();
    assert!(kept > 0, "the received half is kept for the next pull");

    let ev = Events::default();
    let info = s.pull(&name, &opts(), &ev).unwrap();
    assert!(
        ev.has(&format!("start@{kept}")),
        "{:?}",
        ev.0.lock().unwrap()
    );
    assert_eq!(info.digest, reg.pushed["test/other:1"].config);
    assert!(!partial.exists());
    assert!(tmp_is_empty(&s));
}
