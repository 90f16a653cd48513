use super::*;
use crate::dockerfile::parse;
use crate::plan::plan;

/// Applies the last stage of `text` to `base`; the steps and the final config.
fn apply_all(
    text: &str,
    base: ImageConfig,
    build_args: &[(&str, &str)],
) -> Result<(Vec<Step>, ImageConfig), String> {
    let df = parse(text).map_err(|e| e.to_string())?;
    let args: BTreeMap<String, String> = build_args
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let p = plan(&df, &args, None).map_err(|e| e.to_string())?;
    let last = *p.order.last().unwrap();
    let mut st = StageState::new(&p, last, base, &args);
    let mut steps = Vec::new();
    for i in &p.stages[last].instructions {
        steps.push(st.apply(i).map_err(|e| format!("line {}: {e}", i.line))?);
    }
    Ok((steps, st.config))
}

fn ok(text: &str) -> (Vec<Step>, ImageConfig) {
    apply_all(text, ImageConfig::default(), &[]).unwrap()
}

fn run_of(step: &Step) -> &RunStep {
    match step {
        Step::Run(r) => r,
        other => panic!("{other:?}"),
    }
}

fn copy_of(step: &Step) -> &CopyStep {
    match step {
        Step::Copy(c) => c,
        other => panic!("{other:?}"),
    }
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn env_wins_over_arg_and_args_reach_run_only() {
    let mut base = ImageConfig::default();
    base.env.push(("PATH".into(), "/usr/bin:/bin".into()));
    let (steps, cfg) = apply_all(
        "FROM x\nARG V=argv\nARG ONLY=arg-only\nENV PATH=/opt/bin:$PATH V=envv\nENV W=$V\nRUN echo",
        base,
        &[("ONLY", "from-cli")],
    )
    .unwrap();
    assert_eq!(cfg.env_get("PATH"), Some("/opt/bin:/usr/bin:/bin"));
    assert_eq!(
        cfg.env_get("W"),
        Some("envv"),
        "ENV set before wins over ARG"
    );
    assert_eq!(cfg.env_get("ONLY"), None, "args are not kept in the image");
    let run = run_of(&steps[4]);
    assert!(run.env.contains(&("ONLY".into(), "from-cli".into())));
    assert!(!run.env.iter().any(|(k, v)| k == "V" && v == "argv"));
    assert_eq!(run.argv, s(&["/bin/sh", "-c", "echo"]));
}

#[test]
fn workdir_user_and_relative_paths() {
    let (steps, cfg) = ok("FROM x\nENV D=app\nWORKDIR /srv\nWORKDIR $D/../web\nUSER nobody\nCOPY a b/ c\nCOPY x .\nRUN pwd");
    assert_eq!(steps[1], Step::Workdir("/srv".into()));
    assert_eq!(steps[2], Step::Workdir("/srv/web".into()));
    assert_eq!(cfg.working_dir, "/srv/web");
    assert_eq!(copy_of(&steps[4]).dest, "/srv/web/c");
    assert_eq!(copy_of(&steps[5]).dest, "/srv/web/");
    let run = run_of(&steps[6]);
    assert_eq!(
        (run.cwd.as_str(), run.user.as_str()),
        ("/srv/web", "nobody")
    );
}

#[test]
fn cmd_entrypoint_shell_and_config() {
    let base = ImageConfig {
        cmd: Some(s(&["sh"])),
        ..Default::default()
    };
    let (_, cfg) = apply_all(
        "FROM x\nSHELL [\"/bin/bash\", \"-c\"]\nENTRYPOINT [\"/init\"]\nLABEL a=\"b c\" \\\n  v=$X\n\
         EXPOSE 80 53/udp\nVOLUME /data\nSTOPSIGNAL SIGINT\nMAINTAINER me\n\
         HEALTHCHECK --interval=1m30s --retries=2 CMD curl -f localhost\nONBUILD RUN x",
        base,
        &[],
    )
    .unwrap();
    assert_eq!(cfg.entrypoint, Some(s(&["/init"])));
    assert_eq!(cfg.cmd, None, "ENTRYPOINT drops the base image's CMD");
    assert_eq!(cfg.labels["a"], "b c");
    assert_eq!(cfg.labels["v"], "");
    assert_eq!(cfg.labels["maintainer"], "me");
    assert_eq!(
        cfg.exposed_ports.iter().cloned().collect::<Vec<_>>(),
        s(&["53/udp", "80/tcp"])
    );
    assert!(cfg.volumes.contains("/data"));
    assert_eq!(cfg.stop_signal.as_deref(), Some("SIGINT"));
    let h = cfg.healthcheck.unwrap();
    assert_eq!(h.test, s(&["CMD-SHELL", "curl -f localhost"]));
    assert_eq!((h.interval_ns, h.retries), (90_000_000_000, 2));
    assert_eq!(cfg.onbuild, s(&["RUN x"]));
    let (_, cfg) = ok("FROM x\nSHELL [\"/bin/bash\", \"-c\"]\nCMD echo $HOME");
    assert_eq!(cfg.cmd, Some(s(&["/bin/bash", "-c", "echo $HOME"])));
}

#[test]
fn run_heredocs() {
    let (steps, _) = ok(
        "FROM x\nRUN <<EOF\n#!/usr/bin/env python3\nprint(1)\nEOF\nRUN cat > /f <<'X'\n$HOME\nX\n",
    );
    let script = run_of(&steps[0]);
    assert_eq!(
        script.stdin.as_deref(),
        Some("#!/usr/bin/env python3\nprint(1)\n")
    );
    assert_eq!(script.argv[..2], s(&["/bin/sh", "-c"]));
    let inline = run_of(&steps[1]);
    assert_eq!(inline.argv[2], "cat > /f <<'X'\n$HOME\nX");
    assert_eq!(inline.stdin, None);
}

#[test]
fn copy_flags_and_heredoc_files() {
    let (steps, _) = ok("FROM a AS build\nFROM x\nARG OWNER=app\nENV NAME=world\n\
         COPY --from=build --chown=$OWNER:$OWNER --chmod=640 --exclude=*.tmp /out /dst/\n\
         COPY <<EOF /etc/greeting\nhello $NAME\nEOF\nCOPY <<'EOF' /etc/raw\nhello $NAME\nEOF\n");
    let c = copy_of(&steps[2]);
    assert_eq!(c.from, Some(CopyFrom::Stage(0)));
    assert_eq!(c.chown.as_deref(), Some("app:app"));
    assert_eq!(c.chmod, Some(0o640));
    assert_eq!(c.exclude, s(&["*.tmp"]));
    assert_eq!(c.dest, "/dst/");
    assert_eq!(
        copy_of(&steps[3]).sources,
        [CopySource::Inline {
            name: "EOF".into(),
            content: "hello world\n".into()
        }]
    );
    assert_eq!(
        copy_of(&steps[4]).sources,
        [CopySource::Inline {
            name: "EOF".into(),
            content: "hello $NAME\n".into()
        }]
    );
    let c =
        copy_of(&ok("FROM x\nCOPY --from=docker.io/library/busybox:1 /bin/sh /sh").0[0]).clone();
    assert_eq!(
        c.from,
        Some(CopyFrom::Image("docker.io/library/busybox:1".into()))
    );
}

#[test]
fn bad_values_are_errors_with_the_reason() {
    let e = |t: &str| apply_all(t, ImageConfig::default(), &[]).unwrap_err();
    assert!(e("FROM x\nEXPOSE http").contains("EXPOSE http"));
    assert!(e("FROM x\nEXPOSE 0").contains("EXPOSE 0"));
    assert!(e("FROM x\nCOPY --chmod=u+x a b").contains("octal"));
    assert!(e("FROM x\nSTOPSIGNAL kill me").contains("STOPSIGNAL"));
    assert!(e("FROM x\nHEALTHCHECK --interval=soon CMD x").contains("duration"));
    assert!(e("FROM x\nRUN --network=host x").contains("not supported"));
    assert!(e("FROM x\nRUN --mount=type=secret,id=t x").contains("--secret NAME@HOST"));
    assert!(e("FROM x\nRUN --mount=type=cache x").contains("a target is needed"));
    assert!(e("FROM x\nRUN --mount=type=cache,target=/c,from=y x").contains("from is not"));
    assert!(e("FROM x\nRUN --mount=type=nfs,target=/c x").contains("not a mount type"));
    assert!(e("FROM x\nRUN --mount=target=/c,rw=maybe x").contains("true or false"));
    assert!(e("FROM x\nRUN --mount=type=tmpfs,target=/ x").contains("cannot be /"));
    assert!(e("FROM x\nRUN --mount=target=/c --mount=type=tmpfs,target=/c x").contains("two"));
    assert!(e("FROM x\nRUN --mount=type=cache,target=/c,uid=me x").contains("number"));
    assert!(e("FROM x\nRUN --mount=\"target=/c x").contains("quote"));
    assert!(e("FROM x\nADD git@github.com:a/b.git /src").contains("git sources"));
    assert!(e("FROM x\nADD https://example.com/a/b.git /src").contains("git sources"));
    assert!(e("FROM x\nADD ftp://example.com/x /x").contains("only http and https"));
    assert!(e("FROM x\nCOPY --parents=maybe a /b/").contains("true or false"));
    assert!(e("FROM x\nCOPY --parents a/./b /c/").contains("pivot"));
    assert!(e("FROM x\nADD --checksum=md5:abc https://e.com/x /x").contains("sha256"));
    assert!(e(&format!(
        "FROM x\nADD --checksum=sha256:{} a /x",
        "0".repeat(64)
    ))
    .contains("URL sources only"));
    assert!(e("FROM x\nENV A=\"${B:?set B}\"").contains("B: set B"));
    assert!(e("FROM x\nUSER $NOBODY").contains("no user"));
    assert!(e("FROM x\nCOPY --from x y").contains("--from needs a value"));
}

#[test]
fn add_urls() {
    let sum = format!("sha256:{}", "AB".repeat(32));
    let (steps, _) = ok(&format!(
        "FROM x\nADD --checksum={sum} https://example.com/t.tgz /opt/\nCOPY https://x /y\n"
    ));
    let add = copy_of(&steps[0]);
    assert_eq!(
        add.sources,
        [CopySource::Url("https://example.com/t.tgz".into())]
    );
    assert_eq!(add.checksum.as_deref(), Some(&*sum.to_ascii_lowercase()));
    // COPY never fetches: that is a path in the context.
    assert_eq!(
        copy_of(&steps[1]).sources,
        [CopySource::Path("https://x".into())]
    );
}

#[test]
fn run_mounts() {
    let (steps, _) = ok("FROM x AS a\nFROM x\nARG V=/v\nWORKDIR /w\n\
         RUN --mount=type=cache,target=$V/c,uid=1000,gid=100,mode=0700 \\\n\
         --mount=src=sub,dst=rel,rw --mount=\"type=bind,from=a,source=/out,target=/o,ro\" \\\n\
         --mount=type=tmpfs,target=/t,size=64m --mount=type=cache,target=/id,id=shared,sharing=locked x");
    let r = run_of(steps.last().unwrap());
    let kinds: Vec<(&str, &MountKind)> = r
        .mounts
        .iter()
        .map(|m| (m.target.as_str(), &m.kind))
        .collect();
    assert_eq!(
        kinds,
        [
            (
                "/v/c",
                &MountKind::Cache {
                    id: "/v/c".into(),
                    mode: 0o700,
                    uid: 1000,
                    gid: 100
                }
            ),
            (
                "/w/rel",
                &MountKind::Bind {
                    source: "sub".into(),
                    from: None,
                    rw: true
                }
            ),
            (
                "/o",
                &MountKind::Bind {
                    source: "/out".into(),
                    from: Some(CopyFrom::Stage(0)),
                    rw: false
                }
            ),
            ("/t", &MountKind::Tmpfs),
            (
                "/id",
                &MountKind::Cache {
                    id: "shared".into(),
                    mode: 0o755,
                    uid: 0,
                    gid: 0
                }
            ),
        ]
    );
    // A bind with nothing but a target: the whole context, read-only.
    let (steps, _) = ok("FROM x\nRUN --mount=target=/ctx x");
    assert_eq!(
        run_of(&steps[0]).mounts[0].kind,
        MountKind::Bind {
            source: ".".into(),
            from: None,
            rw: false
        }
    );
}

#[test]
fn paths_and_durations() {
    assert_eq!(absolute("/", "a/./b/../c"), "/a/c");
    assert_eq!(absolute("/w", "../../.."), "/");
    assert_eq!(absolute("/w/", "/abs"), "/abs");
    assert_eq!(duration_ns("1h2m3s"), Some(3_723_000_000_000));
    assert_eq!(duration_ns("1.5s"), Some(1_500_000_000));
    assert_eq!(duration_ns("500ms"), Some(500_000_000));
    assert_eq!(duration_ns("5"), None);
    assert_eq!(duration_ns("s"), None);
}
