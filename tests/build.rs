//! `matchlock build` end to end: a Dockerfile whose RUN steps run in real sandboxes, the image
//! it stores run with `matchlock run`, the step cache, and a failing step.

mod common;

use common::*;

/// The tests look at the sandboxes left running, so they run one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn context(dockerfile: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("Dockerfile"), dockerfile).unwrap();
    dir
}

fn build(args: &[&str], ctx: &tempfile::TempDir) -> std::process::Output {
    let mut a = vec!["build"];
    a.extend_from_slice(args);
    let path = ctx.path().to_str().unwrap().to_string();
    a.push(&path);
    run(&a)
}

/// Builds `ctx` as `tag` (with `flags`), writing it out with `--output` as a docker-archive and
/// with `image export --format oci`; the two files.
fn build_and_export(
    ctx: &tempfile::TempDir,
    tag: &str,
    flags: &[&str],
) -> (std::path::PathBuf, std::path::PathBuf) {
    let archive = ctx.path().join("docker.tar");
    let mut args = flags.to_vec();
    args.extend_from_slice(&["-t", tag, "--output", archive.to_str().unwrap()]);
    let o = build(&args, ctx);
    assert!(o.status.success(), "{}", stderr(&o));
    let oci = ctx.path().join("oci.tar");
    let o = run(&[
        "image",
        "export",
        tag,
        "--format",
        "oci",
        "-o",
        oci.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    (archive, oci)
}

const STEPS: &str = "\
# syntax=docker/dockerfile:1
ARG BASE=mltest/busybox:1
FROM ${BASE} AS base
ARG GREETING=hello
ENV APP=/app
WORKDIR $APP
RUN echo \"$GREETING from RUN\" > greeting && \\
    mkdir -p /data && echo data > /data/x && rm -f /bin/vi
RUN <<EOF
#!/bin/sh
echo \"heredoc ran as $(id -u) in $(pwd)\" > /app/heredoc
EOF
USER nobody
RUN id -u > /tmp/not-kept; echo visible in the output
LABEL org.example.name=\"My app\"
EXPOSE 8080
CMD [\"cat\", \"/app/greeting\"]
";

#[test]
fn run_steps_make_layers_and_an_unchanged_rebuild_runs_nothing() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let ctx = context(STEPS);
    // The step cache is in the image store, which every test run shares: start cold.
    let o = build(
        &[
            "--no-cache",
            "-t",
            "mltest/built:steps",
            "--build-arg",
            "GREETING=hi",
        ],
        &ctx,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // Upstream's result lines, which its users' scripts look for, then the digest.
    let out = stdout(&o);
    assert!(
        out.starts_with("Successfully built and tagged mltest/built:steps\nLayers: "),
        "{out}"
    );
    assert!(
        out.contains("\nSize: ") && out.contains("\nDigest: sha256:"),
        "{out}"
    );
    let log = stderr(&o);
    assert!(log.contains("[base 1/11] FROM ${BASE} AS base"), "{log}");
    assert!(log.contains("visible in the output"), "{log}");
    assert!(!log.contains("CACHED"), "{log}");

    // The image: CMD, the files RUN wrote, the whiteout, ENV, WORKDIR and USER.
    let o = run(&["run", "--image", "mltest/built:steps"]);
    assert_eq!(stdout(&o), "hi from RUN\n", "{}", stderr(&o));
    let o = run(&[
        "run",
        "--image",
        "mltest/built:steps",
        "--",
        "sh",
        "-c",
        "cat /app/heredoc /data/x; test -e /bin/vi || echo no-vi; echo $APP $(pwd) $(id -u); \
         test -e /tmp/not-kept || echo tmp-not-kept",
    ]);
    assert_eq!(
        stdout(&o),
        "heredoc ran as 0 in /app\ndata\nno-vi\n/app /app 65534\ntmp-not-kept\n",
        "{}",
        stderr(&o)
    );
    let ls = stdout(&run(&["image", "ls"]));
    assert!(ls.contains("mltest/built:steps"), "{ls}");
    assert!(
        !ls.contains("build.matchlock.invalid"),
        "step images are hidden: {ls}"
    );

    // Unchanged: every step (the WORKDIR it made and the three RUNs) is found in the cache. A
    // changed build arg runs from its use on.
    let o = build(
        &["-t", "mltest/built:steps", "--build-arg", "GREETING=hi"],
        &ctx,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stderr(&o).matches("CACHED").count(), 4, "{}", stderr(&o));
    // (A value no earlier run of these tests used, since the cache outlives them.)
    let fresh = format!(
        "yo-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let arg = format!("GREETING={fresh}");
    let o = build(&["-t", "mltest/built:steps2", "--build-arg", &arg], &ctx);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stderr(&o).matches("CACHED").count(),
        1,
        "only the WORKDIR before it: {}",
        stderr(&o)
    );
    let o = run(&["run", "--image", "mltest/built:steps2"]);
    assert_eq!(stdout(&o), format!("{fresh} from RUN\n"));
    // --no-cache runs everything again.
    let o = build(
        &[
            "--no-cache",
            "-t",
            "mltest/built:steps",
            "--build-arg",
            "GREETING=hi",
        ],
        &ctx,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("CACHED"), "{}", stderr(&o));
}

#[test]
fn a_failing_step_says_so_and_leaves_nothing_behind() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let ctx = context("FROM mltest/busybox:1\nRUN echo about to fail && exit 3\nRUN echo never\n");
    let before = stdout(&run(&["list"]));
    let o = build(&["-t", "mltest/built:fails"], &ctx);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let log = stderr(&o);
    assert!(log.contains("about to fail"), "{log}");
    assert!(
        log.contains("line 2: `RUN echo about to fail && exit 3` failed with exit code 3"),
        "{log}"
    );
    assert!(!log.contains("never"), "{log}");
    assert!(!stdout(&run(&["image", "ls"])).contains("built:fails"));
    assert_eq!(stdout(&run(&["list"])), before, "no sandbox is left");

    // Dockerfile mistakes name their line before anything runs.
    let ctx = context("FROM mltest/busybox:1\nRUN true\nFROBNICATE x\n");
    let o = build(&[], &ctx);
    assert!(
        stderr(&o).contains("line 3: unknown instruction FROBNICATE"),
        "{}",
        stderr(&o)
    );
    let ctx = context("FROM mltest/busybox:1\nEXPOSE http\n");
    let o = build(&[], &ctx);
    assert!(stderr(&o).contains("line 2: EXPOSE http"), "{}", stderr(&o));
}

#[test]
fn copy_and_add_from_the_context_with_dockerignore_and_the_cache() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let ctx = context(
        "FROM mltest/busybox:1\n\
         WORKDIR /srv\n\
         COPY app/ ./\n\
         COPY --chown=nobody --chmod=750 run.sh /usr/local/bin/run\n\
         ADD pkg.tar.gz /opt/\n\
         COPY <<EOF /etc/motd\nbuilt for $HOSTNAME_ARG\nEOF\n\
         RUN cat /srv/main.py /opt/pkg/file > /srv/combined\n\
         CMD [\"/usr/local/bin/run\"]\n",
    );
    let p = ctx.path();
    std::fs::create_dir_all(p.join("app/lib")).unwrap();
    std::fs::write(p.join("app/main.py"), "print('main')\n").unwrap();
    std::fs::write(p.join("app/lib/util.py"), "util\n").unwrap();
    std::fs::write(p.join("app/.env"), "SECRET=1\n").unwrap();
    std::fs::write(p.join("run.sh"), "#!/bin/sh\necho ran as $(id -u)\n").unwrap();
    std::fs::write(p.join(".dockerignore"), "**/.env\n").unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(8);
    b.append_data(&mut h, "pkg/file", &b"from-tar"[..]).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &b.into_inner().unwrap()).unwrap();
    std::fs::write(p.join("pkg.tar.gz"), gz.finish().unwrap()).unwrap();

    let o = build(&["--no-cache", "-t", "mltest/built:copy"], &ctx);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&["run", "--image", "mltest/built:copy"]);
    assert_eq!(stdout(&o), "ran as 0\n", "{}", stderr(&o));
    let o = run(&[
        "run",
        "--image",
        "mltest/built:copy",
        "--",
        "sh",
        "-c",
        "cat /srv/combined /srv/lib/util.py /etc/motd; test -e /srv/.env || echo no-env; \
         stat -c '%U %a' /usr/local/bin/run /srv/main.py",
    ]);
    assert_eq!(
        stdout(&o),
        "print('main')\nfrom-tarutil\nbuilt for \nno-env\nnobody 750\nroot 644\n",
        "{}",
        stderr(&o)
    );
    // Unchanged: all cached. One copied file changed: its step and every later one run again.
    let o = build(&["-t", "mltest/built:copy"], &ctx);
    assert_eq!(stderr(&o).matches("CACHED").count(), 6, "{}", stderr(&o));
    let marker = format!("{:?}", std::time::SystemTime::now());
    std::fs::write(p.join("app/lib/util.py"), format!("util {marker}\n")).unwrap();
    let o = build(&["-t", "mltest/built:copy"], &ctx);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stderr(&o).matches("CACHED").count(),
        1,
        "only the WORKDIR before it: {}",
        stderr(&o)
    );
    let o = run(&[
        "run",
        "--image",
        "mltest/built:copy",
        "--",
        "cat",
        "/srv/lib/util.py",
    ]);
    assert_eq!(stdout(&o), format!("util {marker}\n"));
    // A source the ignore file leaves out is an error that says so.
    std::fs::write(
        p.join("Dockerfile"),
        "FROM mltest/busybox:1\nCOPY app/.env /\n",
    )
    .unwrap();
    let o = build(&[], &ctx);
    assert!(
        stderr(&o).contains(
            "line 2: app/.env: not found in the build context (.dockerignore leaves it out)"
        ),
        "{}",
        stderr(&o)
    );
}

#[test]
fn multi_stage_copies_from_a_stage_and_an_image_and_target_picks_a_stage() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let ctx = context(
        "FROM mltest/busybox:1 AS build\n\
         RUN mkdir -p /out/bin && echo compiled > /out/bin/app && chmod 755 /out/bin/app && \\\n\
             ln -s app /out/bin/app-link && echo skip > /out/skip.o\n\
         FROM mltest/busybox:1 AS unused\n\
         RUN exit 9\n\
         FROM mltest/busybox:1\n\
         COPY --from=build /out/bin/ /app/\n\
         COPY --from=build /out/*.o /objs/\n\
         COPY --from=mltest/busybox:1 /bin/busybox /copied/busybox\n\
         COPY --from=build /out/bin/app-link /named\n\
         CMD [\"cat\", \"/app/app\"]\n",
    );
    let o = build(&["--no-cache", "-t", "mltest/built:multi"], &ctx);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        !stderr(&o).contains("exit 9"),
        "the unused stage is skipped: {}",
        stderr(&o)
    );
    let o = run(&["run", "--image", "mltest/built:multi"]);
    assert_eq!(stdout(&o), "compiled\n", "{}", stderr(&o));
    let o = run(&[
        "run",
        "--image",
        "mltest/built:multi",
        "--",
        "sh",
        "-c",
        "readlink /app/app-link; cat /objs/skip.o; /copied/busybox true && echo runs; \
         stat -c '%a %u' /app/app; cat /named",
    ]);
    // A named source that is a link is followed in its stage (BuildKit's rule).
    assert_eq!(
        stdout(&o),
        "app\nskip\nruns\n755 0\ncompiled\n",
        "{}",
        stderr(&o)
    );
    // --target builds that stage only.
    let o = build(&["--target", "build", "-t", "mltest/built:stage"], &ctx);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&[
        "run",
        "--image",
        "mltest/built:stage",
        "--",
        "cat",
        "/out/bin/app",
    ]);
    assert_eq!(stdout(&o), "compiled\n");
    let o = build(&["--target", "nope"], &ctx);
    assert!(
        stderr(&o).contains("no stage named \"nope\""),
        "{}",
        stderr(&o)
    );

    // --output writes a docker-archive that skopeo reads and an import brings back;
    // `image export --format oci` an OCI layout.
    let (out, oci) = build_and_export(&ctx, "mltest/built:multi", &[]);
    for (transport, file) in [("docker-archive", &out), ("oci-archive", &oci)] {
        let o = std::process::Command::new("skopeo")
            .args([
                "inspect",
                "--config",
                &format!("{transport}:{}", file.display()),
            ])
            .output()
            .expect("skopeo (apt-get install skopeo)");
        assert!(o.status.success(), "{transport}: {}", stderr(&o));
        assert!(
            stdout(&o).contains("\"/app/app\""),
            "{transport}: {}",
            stdout(&o)
        );
        // History as `docker history` shows it: CMD made no layer; the image is dated by the
        // last step that did.
        let cfg: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        let h = cfg["history"].as_array().unwrap();
        let (last, layer) = (&h[h.len() - 1], &h[h.len() - 2]);
        assert!(
            last["created_by"].as_str().unwrap().starts_with("CMD"),
            "{last}"
        );
        assert_eq!(last["empty_layer"], true, "{last}");
        assert!(layer["created_by"]
            .as_str()
            .unwrap()
            .starts_with("COPY --from=build /out/bin/app-link"));
        assert!(layer.get("empty_layer").is_none(), "{layer}");
        assert_eq!(cfg["created"], layer["created"], "{cfg}");
        assert!(cfg["created"].as_str().unwrap().ends_with('Z'), "{cfg}");
    }
    let o = run_stdin(
        &["image", "import", "mltest/built:reimported"],
        &std::fs::read(&out).unwrap(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&["run", "--image", "mltest/built:reimported"]);
    assert_eq!(stdout(&o), "compiled\n", "{}", stderr(&o));
}

#[test]
fn an_intercepting_build_leaves_no_sandbox_ca_in_the_image() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let bundle = "-----BEGIN CERTIFICATE-----\nMIIBimage\n-----END CERTIFICATE-----\n";
    let ctx = context(
        "FROM mltest/busybox:1\n\
         RUN grep -c 'BEGIN CERTIFICATE' /etc/ssl/certs/ca-certificates.crt\n\
         COPY bundle.crt /etc/ssl/certs/ca-certificates.crt\n\
         RUN grep -c 'BEGIN CERTIFICATE' /etc/ssl/certs/ca-certificates.crt\n",
    );
    std::fs::write(ctx.path().join("bundle.crt"), bundle).unwrap();
    let o = build(
        &[
            "--no-cache",
            "--allow-host",
            "example.invalid",
            "-t",
            "mltest/built:ca",
        ],
        &ctx,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // The steps saw the sandbox CA in the trust store (1 alone, then 2 with the image's)...
    let log = stderr(&o);
    assert!(log.contains("\n1\n") && log.contains("\n2\n"), "{log}");
    // ...and the image keeps only its own.
    let o = run(&[
        "run",
        "--image",
        "mltest/built:ca",
        "--no-network",
        "--",
        "sh",
        "-c",
        "test -e /etc/ssl/certs/matchlock-ca.pem || echo no-ca-file; cat /etc/ssl/certs/ca-certificates.crt",
    ]);
    assert_eq!(
        stdout(&o),
        format!("no-ca-file\n{bundle}"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn workdir_is_made_even_with_no_step_after_it() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let ctx = context("FROM mltest/busybox:1\nWORKDIR /srv/data\nWORKDIR /etc\nWORKDIR /srv/data\nCMD [\"pwd\"]\n");
    let o = build(&["--no-cache", "-t", "mltest/built:workdir"], &ctx);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&["run", "--image", "mltest/built:workdir"]);
    assert_eq!(stdout(&o), "/srv/data\n", "{}", stderr(&o));
    let o = run(&[
        "run",
        "--image",
        "mltest/built:workdir",
        "--",
        "stat",
        "-c",
        "%a %U",
        "/srv/data",
        "/etc",
    ]);
    assert_eq!(stdout(&o), "755 root\n755 root\n", "{}", stderr(&o));
}

#[test]
fn run_steps_reach_allowed_hosts_only_and_secrets_stay_out_of_the_image() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    const SECRET: &str = "sk-build-secret-never-in-image";
    // An upstream on the host's loopback: /pkg is a package, /auth says what key arrived.
    let port = http_server(|head| {
        http_ok(if head.starts_with("GET /auth") {
            if head.contains(&format!("Bearer {SECRET}")) {
                "real-secret-arrived"
            } else {
                "no-secret"
            }
        } else {
            "package-bytes"
        })
    });
    let ctx = context(
        "FROM mltest/busybox:1\nARG PORT\n\
         RUN wget -q -O /pkg http://api.test:$PORT/pkg\n\
         RUN wget -q -O /auth --header \"Authorization: Bearer $API_KEY\" http://api.test:$PORT/auth && \\\n\
             echo \"key seen by RUN: $API_KEY\" > /seen-key\n\
         RUN wget -q -T 5 -O /other http://other.test:$PORT/pkg || echo blocked > /blocked\n",
    );
    let out = ctx.path().join("image.tar");
    let o = build(
        &[
            "--no-cache",
            "-t",
            "mltest/built:net",
            "--build-arg",
            &format!("PORT={port}"),
            "--add-host",
            "api.test:127.0.0.1",
            "--add-host",
            "other.test:127.0.0.1",
            "--allow-private-host",
            "127.0.0.1",
            "--allow-host",
            "api.test",
            "--secret",
            &format!("API_KEY={SECRET}@api.test"),
            "--secret-over-http",
            "API_KEY",
            "--output",
            out.to_str().unwrap(),
        ],
        &ctx,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        !stderr(&o).contains(SECRET),
        "the build log shows the secret"
    );
    let o = run(&[
        "run",
        "--image",
        "mltest/built:net",
        "--",
        "sh",
        "-c",
        "cat /pkg; echo; cat /auth; echo; cat /blocked; test -s /other || echo no-other",
    ]);
    assert_eq!(
        stdout(&o),
        "package-bytes\nreal-secret-arrived\nblocked\nno-other\n",
        "{}",
        stderr(&o)
    );
    let seen = stdout(&run(&[
        "run",
        "--image",
        "mltest/built:net",
        "--",
        "cat",
        "/seen-key",
    ]));
    assert!(
        seen.starts_with("key seen by RUN: ") && !seen.contains(SECRET),
        "{seen}"
    );
    let bytes = std::fs::read(&out).unwrap();
    assert!(
        !bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
        "the secret is in the exported image"
    );
}

#[test]
fn copy_and_workdir_follow_the_images_links() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // As a merged-/usr image's /bin: a directory that is a link.
    let ctx = context(
        "FROM mltest/busybox:1 AS base\nRUN mkdir -p /usr/lib/app && ln -s usr/lib/app /applink\n\
         FROM base\nCOPY f.txt /applink/\nCOPY f.txt /applink/renamed\nWORKDIR /applink/w\n\
         COPY rootfs/ /\nCOPY f.txt /applink\n\
         CMD [\"ls\", \"/usr/lib/app\", \"/usr/lib/app/tree\"]\n",
    );
    std::fs::write(ctx.path().join("f.txt"), "f\n").unwrap();
    // A tree for / whose `applink` is a directory: it goes where the image's link points.
    std::fs::create_dir_all(ctx.path().join("rootfs/applink/tree")).unwrap();
    std::fs::write(ctx.path().join("rootfs/applink/tree/deep"), "d\n").unwrap();
    let o = build(&["--no-cache", "-t", "mltest/built:links"], &ctx);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&["run", "--image", "mltest/built:links"]);
    // `COPY f.txt /applink` (a directory, no final /) copies into it.
    assert_eq!(
        stdout(&o),
        "/usr/lib/app:\nf.txt\nrenamed\ntree\nw\n\n/usr/lib/app/tree:\ndeep\n",
        "{}",
        stderr(&o)
    );
    let o = run(&[
        "run",
        "--image",
        "mltest/built:links",
        "--",
        "readlink",
        "/applink",
    ]);
    assert_eq!(stdout(&o), "usr/lib/app\n", "the link itself is kept");
}

/// A Docker daemon of the test's own: its state in a temporary directory, no bridge, no
/// iptables rules and no forwarding, so it changes nothing on the host. Stopped on drop.
struct Dockerd {
    dir: tempfile::TempDir,
    child: std::process::Child,
}

impl Dockerd {
    fn start() -> Dockerd {
        let dir = tempfile::tempdir().unwrap();
        let p = |s: &str| dir.path().join(s).to_str().unwrap().to_string();
        let log = std::fs::File::create(p("log")).unwrap();
        let child = std::process::Command::new("dockerd")
            .args(["--data-root", &p("data"), "--exec-root", &p("exec")])
            .args([
                "--pidfile",
                &p("pid"),
                "-H",
                &format!("unix://{}", p("sock")),
            ])
            .args(["--bridge=none", "--iptables=false", "--ip-forward=false"])
            .args(["--ip-masq=false", "--containerd-namespace", "mltest"])
            .args(["--containerd-plugins-namespace", "mltest-plugins"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("dockerd (apt-get install docker.io)");
        let d = Dockerd { dir, child };
        for _ in 0..120 {
            if d.docker(&["info"]).status.success() {
                return d;
            }
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
        panic!(
            "dockerd did not start: {}",
            std::fs::read_to_string(d.dir.path().join("log")).unwrap_or_default()
        );
    }

    fn docker(&self, args: &[&str]) -> std::process::Output {
        let sock = format!("unix://{}", self.dir.path().join("sock").display());
        std::process::Command::new("docker")
            .args(["-H", &sock])
            .args(args)
            .output()
            .expect("docker (apt-get install docker.io)")
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

#[test]
fn built_images_load_into_docker_in_both_formats() {
    // `scripts/setup` does not install Docker (on a systemd host its package starts a daemon
    // that rewrites the firewall); CI does, and sets MATCHLOCK_TEST_REQUIRE_DOCKER so that this
    // test cannot be skipped there.
    let have = std::process::Command::new("dockerd")
        .arg("--version")
        .output()
        .is_ok();
    if !have && std::env::var_os("MATCHLOCK_TEST_REQUIRE_DOCKER").is_none() {
        eprintln!("SKIPPED: no dockerd here (apt-get install docker.io to run this test)");
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let ctx = context(
        "FROM mltest/busybox:1\n\
         RUN echo built > /built && mkdir /d && ln -s /built /d/link && rm -f /bin/vi && \\\n\
             chown 65534:65534 /built && chmod 640 /built\n\
         COPY f.txt /app/\n\
         ENV GREETING=hi\n\
         CMD [\"sh\", \"-c\", \"cat /d/link /app/f.txt; test -e /bin/vi || echo no-vi; \
              stat -c '%u %a' /built; echo $GREETING\"]\n",
    );
    std::fs::write(ctx.path().join("f.txt"), "from the context\n").unwrap();
    let (archive, oci) = build_and_export(&ctx, "mltest/built:docker", &["--no-cache"]);
    let docker = Dockerd::start();
    for file in [&archive, &oci] {
        let o = docker.docker(&["load", "-i", file.to_str().unwrap()]);
        assert!(o.status.success(), "{}: {}", file.display(), stderr(&o));
        assert!(
            stdout(&o).contains("Loaded image: mltest/built:docker"),
            "{}",
            stdout(&o)
        );
        let o = docker.docker(&["run", "--rm", "--network", "none", "mltest/built:docker"]);
        assert_eq!(
            stdout(&o),
            "built\nfrom the context\nno-vi\n65534 640\nhi\n",
            "{}: {}",
            file.display(),
            stderr(&o)
        );
        let o = docker.docker(&["rmi", "mltest/built:docker"]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
}

#[test]
fn run_mounts_cache_bind_and_tmpfs() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let ctx = context(
        "FROM mltest/busybox:1 AS tool\n\
         RUN mkdir /out && echo from-stage > /out/x\n\
         FROM mltest/busybox:1\n\
         ARG NONCE\n\
         ARG ROUND\n\
         RUN --mount=type=cache,target=/cache,id=mltest-$NONCE \\\n\
             echo $ROUND >> /cache/log && wc -l < /cache/log > /count\n\
         RUN --mount=type=bind,source=src,target=/src cat /src/a.txt > /a.txt && \\\n\
             (test -e /src/secret.env && echo LEAK > /leak || true)\n\
         RUN --mount=type=bind,from=tool,source=/out,target=/o cat /o/x > /x\n\
         RUN --mount=type=tmpfs,target=/scratch --mount=target=/ctx,rw \\\n\
             echo t > /scratch/t && touch /ctx/newfile && ls /ctx > /ctx-list\n\
         CMD [\"sh\", \"-c\", \"cat /count /a.txt /x /ctx-list; ls -A /scratch /cache; \\\n\
              ls /leak 2>&1\"]\n",
    );
    std::fs::create_dir(ctx.path().join("src")).unwrap();
    std::fs::write(ctx.path().join("src/a.txt"), "bound\n").unwrap();
    std::fs::write(ctx.path().join("src/secret.env"), "TOKEN=x\n").unwrap();
    std::fs::write(ctx.path().join(".dockerignore"), "**/*.env\n").unwrap();
    // The cache directory outlives every test run: its id is new each time.
    let nonce = format!(
        "NONCE={}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let build_round = |round: &str, extra: &[&str]| {
        let mut a = vec!["--build-arg", &nonce, "--build-arg", round];
        a.extend_from_slice(extra);
        a.extend_from_slice(&["-t", "mltest/built:mounts"]);
        let o = build(&a, &ctx);
        assert!(o.status.success(), "{}", stderr(&o));
        stderr(&o)
    };
    // Nothing under a mount is in the image (the mount points stay, empty, as BuildKit leaves
    // them); .dockerignore holds for binds; a rw bind's writes are seen in the step only.
    let image = |count: u32, a: &str| {
        format!(
            "{count}\n{a}from-stage\nDockerfile\nnewfile\nsrc\n/cache:\n\n/scratch:\n\
             ls: /leak: No such file or directory\n"
        )
    };
    build_round("ROUND=1", &["--no-cache"]);
    let o = run(&["run", "--image", "mltest/built:mounts"]);
    assert_eq!(stdout(&o), image(1, "bound\n"), "{}", stderr(&o));
    assert!(
        !ctx.path().join("newfile").exists(),
        "rw bind writes are dropped"
    );
    // Unchanged: every step from the cache. A changed bound file runs its step (and those
    // after it) again; the cache step stays cached.
    let log = build_round("ROUND=1", &[]);
    assert_eq!(log.matches("CACHED").count(), 5, "{log}");
    std::fs::write(ctx.path().join("src/a.txt"), "changed\n").unwrap();
    let log = build_round("ROUND=1", &[]);
    assert_eq!(log.matches("CACHED").count(), 2, "{log}");
    let o = run(&["run", "--image", "mltest/built:mounts"]);
    assert_eq!(stdout(&o), image(1, "changed\n"), "{}", stderr(&o));
    // The cache outlives the build: the next round sees the first round's line.
    let log = build_round("ROUND=2", &[]);
    assert_eq!(log.matches("CACHED").count(), 1, "{log}");
    let o = run(&["run", "--image", "mltest/built:mounts"]);
    assert_eq!(stdout(&o), image(2, "changed\n"), "{}", stderr(&o));
}

#[test]
fn onbuild_triggers_run_in_the_child_build_only() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let base = context(
        "FROM mltest/busybox:1\n\
         ONBUILD COPY trigger.txt /from-trigger\n\
         ONBUILD RUN echo ran-trigger > /ran\n\
         CMD [\"cat\", \"/from-trigger\", \"/ran\"]\n",
    );
    let o = build(&["--no-cache", "-t", "mltest/built:onbuild-base"], &base);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&[
        "run",
        "--image",
        "mltest/built:onbuild-base",
        "--",
        "sh",
        "-c",
        "test -e /ran || echo not-run-here",
    ]);
    assert_eq!(stdout(&o), "not-run-here\n", "{}", stderr(&o));
    // The child's context gives the trigger's COPY its file.
    let child = context("FROM mltest/built:onbuild-base\n");
    std::fs::write(child.path().join("trigger.txt"), "child's file\n").unwrap();
    let o = build(&["--no-cache", "-t", "mltest/built:onbuild-child"], &child);
    assert!(o.status.success(), "{}", stderr(&o));
    let log = stderr(&o);
    assert!(
        log.contains("ONBUILD COPY trigger.txt /from-trigger"),
        "{log}"
    );
    assert!(log.contains("ONBUILD RUN echo ran-trigger > /ran"), "{log}");
    let o = run(&["run", "--image", "mltest/built:onbuild-child"]);
    assert_eq!(stdout(&o), "child's file\nran-trigger\n", "{}", stderr(&o));
    // Triggers fire once: a grandchild runs none.
    let grandchild = context("FROM mltest/built:onbuild-child\n");
    let o = build(
        &["--no-cache", "-t", "mltest/built:onbuild-grandchild"],
        &grandchild,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("ONBUILD"), "{}", stderr(&o));
}

#[test]
fn build_cache_size_drops_least_recently_used_steps() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        .to_string();
    // A's first step has a root file system of its own (the named image shares the last
    // one's), so dropping it frees space.
    let a =
        context("FROM mltest/busybox:1\nCOPY a.txt /a\nCOPY a.txt /a2\nCMD [\"cat\", \"/a\"]\n");
    std::fs::write(a.path().join("a.txt"), format!("a {nonce}\n")).unwrap();
    let b = context("FROM mltest/busybox:1\nCOPY b.txt /b\n");
    std::fs::write(b.path().join("b.txt"), format!("b {nonce}\n")).unwrap();
    let o = build(&["-t", "mltest/built:prune-a"], &a);
    assert!(o.status.success(), "{}", stderr(&o));
    // Tags are dated in whole seconds: B's build starts a second later than A's steps.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let o = build(
        &["--build-cache-size", "0", "-t", "mltest/built:prune-b"],
        &b,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("least recently used cached steps"),
        "{}",
        stderr(&o)
    );
    // This build's steps stay; A's went, though its named image is whole.
    let o = build(&["-t", "mltest/built:prune-b"], &b);
    assert_eq!(stderr(&o).matches("CACHED").count(), 1, "{}", stderr(&o));
    let o = build(&["-t", "mltest/built:prune-a"], &a);
    assert_eq!(stderr(&o).matches("CACHED").count(), 0, "{}", stderr(&o));
    let o = run(&["run", "--image", "mltest/built:prune-a"]);
    assert_eq!(stdout(&o), format!("a {nonce}\n"), "{}", stderr(&o));
}

#[test]
fn add_fetches_urls_on_the_host_under_the_builds_network_policy() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    use std::sync::atomic::{AtomicUsize, Ordering};
    static HITS: AtomicUsize = AtomicUsize::new(0);
    let port = std::sync::Arc::new(std::sync::OnceLock::<u16>::new());
    let p = port.clone();
    let served = http_server(move |head| {
        HITS.fetch_add(1, Ordering::SeqCst);
        let me = p.get().copied().unwrap_or(0);
        let redirect = |to: String| {
            format!("HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        };
        match request_path(head) {
            "/files/notes.txt" => "HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\
                Last-Modified: Tue, 14 Nov 2023 22:13:20 GMT\r\nConnection: close\r\n\r\n\
                remote notes\n"
                .to_string(),
            "/redirect" => redirect(format!("http://127.0.0.1:{me}/files/notes.txt")),
            // A hop to an address the build was not given.
            "/escape" => redirect(format!("http://127.0.0.2:{me}/files/notes.txt")),
            _ => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into(),
        }
    });
    port.set(served).unwrap();
    let sum = "sha256:aeb5922e55ef047dfe290885a889edd9a6e3488594eff8e95c19d8f782c5b1b3";
    let dockerfile = |extra: &str| {
        format!(
            "FROM mltest/busybox:1\nARG PORT\n\
             ADD http://127.0.0.1:$PORT/files/notes.txt /remote/\n{extra}\
             CMD [\"sh\", \"-c\", \"cat /remote/notes.txt; stat -c '%a %Y' /remote/notes.txt\"]\n"
        )
    };
    let port_arg = format!("PORT={served}");
    let open = ["--allow-private-host", "127.0.0.1"];
    let attempt = |df: &str, flags: &[&str]| {
        let ctx = context(df);
        let mut a = vec![
            "--build-arg",
            port_arg.as_str(),
            "-t",
            "mltest/built:add-url",
        ];
        a.extend_from_slice(flags);
        build(&a, &ctx)
    };
    // Refused before anything connects: the loopback is blocked by default, and a host the
    // --allow-host list does not name is too.
    let o = attempt(&dockerfile(""), &[]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--allow-private-host 127.0.0.1"),
        "{}",
        stderr(&o)
    );
    let o = attempt(
        &dockerfile(""),
        &[
            "--allow-private-host",
            "127.0.0.1",
            "--allow-host",
            "other.test",
        ],
    );
    assert!(stderr(&o).contains("not allowed"), "{}", stderr(&o));
    let o = attempt(&dockerfile(""), &["--no-network"]);
    assert!(stderr(&o).contains("--no-network"), "{}", stderr(&o));
    assert_eq!(
        HITS.load(Ordering::SeqCst),
        0,
        "a refused fetch reached the server"
    );
    // A redirect to an address the build was not given is refused at that hop.
    let o = attempt(&dockerfile("ADD http://127.0.0.1:$PORT/escape /e\n"), &open);
    assert!(stderr(&o).contains("127.0.0.2"), "{}", stderr(&o));
    // A wrong --checksum fails the step.
    let bad = format!(
        "ADD --checksum=sha256:{} http://127.0.0.1:$PORT/redirect /r\n",
        "0".repeat(64)
    );
    let o = attempt(&dockerfile(&bad), &open);
    assert!(stderr(&o).contains("not the --checksum"), "{}", stderr(&o));
    // Allowed: the file (mode 0600, Last-Modified as its time), and through a redirect.
    let good = format!("ADD --checksum={sum} http://127.0.0.1:$PORT/redirect /r.txt\n");
    let o = attempt(
        &dockerfile(&good),
        &["--no-cache", "--allow-private-host", "127.0.0.1"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&["run", "--image", "mltest/built:add-url"]);
    assert_eq!(
        stdout(&o),
        "remote notes\n600 1700000000\n",
        "{}",
        stderr(&o)
    );
    let o = run(&[
        "run",
        "--image",
        "mltest/built:add-url",
        "--",
        "cat",
        "/r.txt",
    ]);
    assert_eq!(stdout(&o), "remote notes\n", "{}", stderr(&o));
    // Unchanged content: both steps from the cache (fetched again, as Docker does, to see).
    let o = attempt(&dockerfile(&good), &open);
    assert_eq!(stderr(&o).matches("CACHED").count(), 2, "{}", stderr(&o));
}

#[test]
fn platform_args_and_copy_parents() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let ctx = context(
        "FROM --platform=$BUILDPLATFORM mltest/busybox:1\n\
         ARG TARGETARCH\n\
         ENV ARCH=$TARGETARCH\n\
         COPY --parents src/*.txt /p/\n\
         CMD [\"sh\", \"-c\", \"cat /p/src/a.txt; echo $ARCH\"]\n",
    );
    std::fs::create_dir(ctx.path().join("src")).unwrap();
    std::fs::write(ctx.path().join("src/a.txt"), "kept its path\n").unwrap();
    let o = build(&["-t", "mltest/built:platform"], &ctx);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&["run", "--image", "mltest/built:platform"]);
    assert_eq!(stdout(&o), "kept its path\namd64\n", "{}", stderr(&o));
    // `-f -`: the Dockerfile from standard input.
    let o = run_stdin(
        &[
            "build",
            "-f",
            "-",
            "-t",
            "mltest/built:stdin",
            ctx.path().to_str().unwrap(),
        ],
        b"FROM mltest/busybox:1\nCMD [\"echo\", \"from stdin\"]\n",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&["run", "--image", "mltest/built:stdin"]);
    assert_eq!(stdout(&o), "from stdin\n", "{}", stderr(&o));
    let other = context("FROM --platform=linux/arm64 mltest/busybox:1\n");
    let o = build(&[], &other);
    assert!(
        stderr(&o).contains("this host builds and runs linux/amd64 images only"),
        "{}",
        stderr(&o)
    );
}
