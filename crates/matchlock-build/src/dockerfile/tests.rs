use super::*;

fn one(text: &str) -> Instruction {
    let df = parse(text).unwrap();
    assert_eq!(df.instructions.len(), 1, "{:?}", df.instructions);
    df.instructions.into_iter().next().unwrap()
}

fn kind(text: &str) -> Kind {
    one(text).kind
}

fn error(text: &str) -> String {
    parse(text).unwrap_err().to_string()
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn directives_only_at_the_top() {
    let df = parse("# syntax=docker/dockerfile:1\n# escape=`\nFROM a\nRUN x `\n  y\n").unwrap();
    assert_eq!(df.escape, '`');
    assert_eq!(df.syntax.as_deref(), Some("docker/dockerfile:1"));
    assert_eq!(
        df.instructions[1].kind,
        Kind::Run {
            command: Command::Shell("x   y".into()),
            heredocs: vec![]
        }
    );
    // After a comment or an instruction, `# escape=` is a comment.
    let df = parse("# hello\n# escape=`\nFROM a\n").unwrap();
    assert_eq!(df.escape, '\\');
    assert!(error("# escape=x\nFROM a").contains("invalid escape"));
    assert!(error("# escape=`\n# escape=\\\nFROM a").contains("twice"));
    // A byte-order mark and CRLF line ends are accepted.
    let df = parse("\u{feff}FROM a\r\nRUN b\r\n").unwrap();
    assert_eq!(df.instructions.len(), 2);
}

#[test]
fn continuations_skip_comments_and_blank_lines_and_allow_trailing_blanks() {
    let i =
        one("RUN apt-get update && \\  \n# a comment\n\n    apt-get install -y \\\n      git\n");
    assert_eq!(i.line, 1);
    assert_eq!(
        i.kind,
        Kind::Run {
            command: Command::Shell("apt-get update &&     apt-get install -y       git".into()),
            heredocs: vec![]
        }
    );
    // A continuation at the end of the file ends the instruction.
    assert_eq!(
        kind("RUN a \\"),
        Kind::Run {
            command: Command::Shell("a".into()),
            heredocs: vec![]
        }
    );
    // Line numbers count every physical line.
    let df = parse("FROM a\n\n# c\nRUN b \\\n c\nRUN d\n").unwrap();
    assert_eq!(
        df.instructions.iter().map(|i| i.line).collect::<Vec<_>>(),
        [1, 4, 6]
    );
}

#[test]
fn from_forms() {
    assert_eq!(
        kind("from alpine:3 as Build"),
        Kind::From {
            image: "alpine:3".into(),
            alias: Some("Build".into())
        }
    );
    let i = one("FROM --platform=linux/amd64 scratch");
    assert_eq!(i.flags[0].name, "platform");
    assert!(error("FROM").contains("FROM takes"));
    assert!(error("FROM a b").contains("FROM takes"));
}

#[test]
fn commands_exec_and_shell_form() {
    assert_eq!(
        kind(r#"CMD ["python3", "-m", "http.server"]"#),
        Kind::Cmd(Command::Exec(s(&["python3", "-m", "http.server"])))
    );
    // Not valid JSON: shell form, as Docker decides.
    assert_eq!(
        kind("ENTRYPOINT [\"a\", b]"),
        Kind::Entrypoint(Command::Shell("[\"a\", b]".into()))
    );
    assert_eq!(
        kind("SHELL [\"/bin/bash\", \"-o\", \"pipefail\", \"-c\"]"),
        Kind::Shell(s(&["/bin/bash", "-o", "pipefail", "-c"]))
    );
    assert!(error("SHELL /bin/bash -c").contains("JSON array"));
    assert!(error("RUN").contains("needs a command"));
}

#[test]
fn run_flags_and_heredocs() {
    let i = one("RUN --mount=type=cache,target=/root/.cache --network=none pip install x");
    assert_eq!(i.flags.len(), 2);
    assert_eq!(
        i.flags[0].value.as_deref(),
        Some("type=cache,target=/root/.cache")
    );
    assert!(error("RUN --frobnicate x").contains("RUN does not take --frobnicate"));

    let df = parse(
        "FROM a\nRUN <<EOF\nset -e\necho hi\nEOF\nRUN python3 <<-'PY' > /out\n\tprint('$x')\n\tPY\nRUN b\n",
    )
    .unwrap();
    let Kind::Run { command, heredocs } = &df.instructions[1].kind else {
        panic!()
    };
    assert_eq!(command, &Command::Shell("<<EOF".into()));
    assert_eq!(heredocs[0].body, "set -e\necho hi\n");
    assert!(!heredocs[0].quoted);
    let Kind::Run { heredocs, .. } = &df.instructions[2].kind else {
        panic!()
    };
    assert_eq!(heredocs[0].delimiter, "PY");
    assert!(heredocs[0].strip_tabs && heredocs[0].quoted);
    assert_eq!(heredocs[0].body, "print('$x')\n");
    assert_eq!(df.instructions[3].line, 9);
    // Two heredocs on one line are read in order.
    let Kind::Run { heredocs, .. } = kind("RUN cat <<A <<B\na\nA\nb\nB\n") else {
        panic!()
    };
    assert_eq!(
        (heredocs[0].body.as_str(), heredocs[1].body.as_str()),
        ("a\n", "b\n")
    );
    // Here-strings and quoted `<<` are no heredocs.
    let Kind::Run { heredocs, .. } = kind("RUN cat <<<word; echo '<<X'") else {
        panic!()
    };
    assert!(heredocs.is_empty());
    assert!(error("RUN cat <<EOF\nnever ended\n").contains("<<EOF is never ended"));
}

#[test]
fn copy_and_add() {
    let i = one("COPY --from=build --chown=app:app --chmod=755 a \"b c\" /dst/");
    assert_eq!(
        i.kind,
        Kind::Copy {
            sources: vec![Source::Path("a".into()), Source::Path("\"b c\"".into())],
            dest: "/dst/".into()
        }
    );
    assert_eq!(
        i.flags.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(),
        ["from", "chown", "chmod"]
    );
    assert_eq!(
        kind(r#"ADD ["a b", "/x y/"]"#),
        Kind::Add {
            sources: vec![Source::Path("a b".into())],
            dest: "/x y/".into()
        }
    );
    let Kind::Copy { sources, dest } = kind("COPY <<EOF /etc/motd\nhello\nEOF\n") else {
        panic!()
    };
    assert_eq!(dest, "/etc/motd");
    assert!(matches!(&sources[0], Source::Inline(h) if h.body == "hello\n"));
    assert!(error("COPY onlyone").contains("source and a destination"));
    assert!(error("COPY --from=x").contains("source and a destination"));
    assert!(error("ADD --from=x a b").contains("ADD does not take --from"));
}

#[test]
fn env_label_and_arg() {
    assert_eq!(
        kind("ENV A=1 B=\"two words\" C=x\\ y"),
        Kind::Env(vec![
            ("A".into(), "1".into()),
            ("B".into(), "\"two words\"".into()),
            ("C".into(), "x\\ y".into())
        ])
    );
    assert_eq!(
        kind("ENV LEGACY some value here"),
        Kind::Env(vec![("LEGACY".into(), "some value here".into())])
    );
    assert_eq!(
        kind("LABEL org.opencontainers.image.description=\"My app\" \"c d\"=\"e f\""),
        Kind::Label(vec![
            (
                "org.opencontainers.image.description".into(),
                "\"My app\"".into()
            ),
            ("\"c d\"".into(), "\"e f\"".into())
        ])
    );
    assert!(error("ENV ONLYKEY").contains("has no value"));
    assert!(error("ENV A=1 B").contains("not key=value"));
    assert!(error("ENV =x").contains("not key=value"));
    assert_eq!(
        kind("ARG A B=\"x y\""),
        Kind::Arg(vec![
            ArgDecl {
                name: "A".into(),
                default: None
            },
            ArgDecl {
                name: "B".into(),
                default: Some("\"x y\"".into())
            }
        ])
    );
    assert!(error("ARG 9x").contains("invalid ARG name"));
}

#[test]
fn the_rest() {
    assert_eq!(kind("WORKDIR /app/$X"), Kind::Workdir("/app/$X".into()));
    assert_eq!(kind("USER app:staff"), Kind::User("app:staff".into()));
    assert_eq!(
        kind("EXPOSE 80/tcp 53/udp"),
        Kind::Expose(s(&["80/tcp", "53/udp"]))
    );
    assert_eq!(
        kind("VOLUME [\"/a\", \"/b\"]"),
        Kind::Volume(s(&["/a", "/b"]))
    );
    assert_eq!(kind("VOLUME /a /b"), Kind::Volume(s(&["/a", "/b"])));
    assert_eq!(
        kind("STOPSIGNAL SIGTERM"),
        Kind::StopSignal("SIGTERM".into())
    );
    let i = one("HEALTHCHECK --interval=5s --retries=3 CMD curl -f http://localhost/");
    assert_eq!(
        i.kind,
        Kind::Healthcheck(Some(Command::Shell("curl -f http://localhost/".into())))
    );
    assert_eq!(i.flags.len(), 2);
    assert_eq!(kind("HEALTHCHECK NONE"), Kind::Healthcheck(None));
    assert!(error("HEALTHCHECK curl x").contains("HEALTHCHECK takes"));
    assert_eq!(kind("ONBUILD RUN make"), Kind::Onbuild("RUN make".into()));
    assert!(error("ONBUILD FROM x").contains("ONBUILD cannot take FROM"));
    assert_eq!(kind("MAINTAINER me"), Kind::Maintainer("me".into()));
    assert!(error("FROM a\nFOOBAR x").starts_with("line 2: unknown instruction FOOBAR"));
}

#[test]
fn malformed_input_is_an_error_never_a_panic() {
    for text in [
        "RUN [\"unterminated",
        "RUN x \\",
        "\\",
        "COPY <<",
        "RUN <<'EOF\nx\nEOF",
        "\0\0\u{1}",
        "FROM a\nRUN --=x y",
        "LABEL =",
        "ENV \"a=b",
        "HEALTHCHECK",
        "COPY <<A <<B /x\nA\n",
    ] {
        let _ = parse(text);
    }
}
