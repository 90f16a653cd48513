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
    assert!(stdout(&o).starts_with("sha256:"), "{}", stdout(&o));
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

    // Unchanged: every RUN is found in the cache. A changed build arg runs from its use on.
    let o = build(
        &["-t", "mltest/built:steps", "--build-arg", "GREETING=hi"],
        &ctx,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stderr(&o).matches("CACHED").count(), 3, "{}", stderr(&o));
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
    assert_eq!(stderr(&o).matches("CACHED").count(), 0, "{}", stderr(&o));
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
