//! From a parsed Dockerfile to the stages a build runs: stages split at `FROM`, the global
//! `ARG`s (those before the first `FROM`) applied to `FROM` lines, the target stage chosen
//! (`--target`, else the last), and only the stages it needs, dependencies first, as BuildKit
//! skips stages the target does not use.

use crate::dockerfile::{ArgDecl, Dockerfile, Instruction, Kind};
use crate::words;
use std::collections::BTreeMap;
use std::fmt;

/// Where a stage starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Base {
    /// `FROM scratch`: an empty file system.
    Scratch,
    /// An earlier stage, by index.
    Stage(usize),
    /// An image reference (local or to pull), `FROM` with the global args expanded.
    Image(String),
}

/// What `COPY --from=` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyFrom {
    /// A stage, by index.
    Stage(usize),
    /// An image reference.
    Image(String),
}

/// One stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// Its index among all the file's stages.
    pub index: usize,
    /// Its `AS` name (lowercased: stage names match case-insensitively).
    pub name: Option<String>,
    /// Where it starts.
    pub base: Base,
    /// The `FROM` line.
    pub line: usize,
    /// The instructions after `FROM`, up to the next.
    pub instructions: Vec<Instruction>,
}

/// The build's plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Every stage of the file.
    pub stages: Vec<Stage>,
    /// The stages to build, each after those it uses; the target last.
    pub order: Vec<usize>,
    /// The global args (declared before the first `FROM`) with their values, which a stage's
    /// bare `ARG NAME` takes over.
    pub global_args: BTreeMap<String, Option<String>>,
    /// The escape character, for expanding words later.
    pub escape: char,
    /// `--build-arg`s that no `ARG` declares (Docker warns about them too).
    pub unused_build_args: Vec<String>,
}

/// Why the file cannot be built as asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanError {
    /// The line it is about (0: the file as a whole).
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.message)
        } else {
            write!(f, "line {}: {}", self.line, self.message)
        }
    }
}

impl std::error::Error for PlanError {}

fn at(line: usize, message: impl Into<String>) -> PlanError {
    PlanError {
        line,
        message: message.into(),
    }
}

/// Plans the build of `target` (the last stage when `None`), with `build_args` overriding
/// `ARG` defaults.
pub fn plan(
    df: &Dockerfile,
    build_args: &BTreeMap<String, String>,
    target: Option<&str>,
) -> Result<Plan, PlanError> {
    let esc = df.escape;
    let mut global_args: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut stages: Vec<Stage> = Vec::new();
    let mut declared: Vec<String> = Vec::new();
    for inst in &df.instructions {
        match (&inst.kind, stages.last_mut()) {
            (Kind::Arg(decls), None) => {
                for d in decls {
                    declared.push(d.name.clone());
                    let value = arg_value(d, build_args, &global_args, esc, &|n| {
                        global_args
                            .get(n)
                            .cloned()
                            .flatten()
                            .or_else(|| automatic_arg(n))
                    })
                    .map_err(|e| at(inst.line, e))?;
                    global_args.insert(d.name.clone(), value);
                }
            }
            (Kind::From { image, alias }, _) => {
                let lookup = |n: &str| {
                    global_args
                        .get(n)
                        .cloned()
                        .flatten()
                        .or_else(|| automatic_arg(n))
                };
                let image =
                    words::expand(image, esc, &lookup).map_err(|e| at(inst.line, e.to_string()))?;
                // Images are run on this host's platform only: another is an error, not a
                // silently different image.
                for f in inst.flags.iter().filter(|f| f.name == "platform") {
                    let raw = f.value.as_deref().unwrap_or_default();
                    let want = words::expand(raw, esc, &lookup)
                        .map_err(|e| at(inst.line, e.to_string()))?;
                    let want = want.to_ascii_lowercase();
                    if want != platform() && want != platform().trim_start_matches("linux/") {
                        return Err(at(
                            inst.line,
                            format!(
                                "--platform={want}: this host builds and runs {} images only",
                                platform()
                            ),
                        ));
                    }
                }
                if image.is_empty() {
                    return Err(at(
                        inst.line,
                        "FROM names no image (an ARG expanded to nothing?)",
                    ));
                }
                let name = alias.as_ref().map(|a| a.to_ascii_lowercase());
                if let Some(n) = &name {
                    if !valid_stage_name(n) {
                        return Err(at(inst.line, format!("invalid stage name {n:?}")));
                    }
                    if stages.iter().any(|s| s.name.as_deref() == Some(n)) {
                        return Err(at(inst.line, format!("stage name {n:?} is used twice")));
                    }
                }
                let lower = image.to_ascii_lowercase();
                let base = if lower == "scratch" {
                    Base::Scratch
                } else if let Some(s) = stages.iter().find(|s| s.name.as_deref() == Some(&lower)) {
                    Base::Stage(s.index)
                } else {
                    Base::Image(image)
                };
                stages.push(Stage {
                    index: stages.len(),
                    name,
                    base,
                    line: inst.line,
                    instructions: Vec::new(),
                });
            }
            (_, None) => {
                return Err(at(
                    inst.line,
                    format!(
                        "{} before the first FROM (only ARG may come before it)",
                        inst.kind.keyword()
                    ),
                ))
            }
            (_, Some(stage)) => {
                if let Kind::Arg(decls) = &inst.kind {
                    declared.extend(decls.iter().map(|d| d.name.clone()));
                }
                stage.instructions.push(inst.clone());
            }
        }
    }
    if stages.is_empty() {
        return Err(at(0, "the Dockerfile has no FROM"));
    }
    let target = match target {
        None => stages.len() - 1,
        Some(t) => {
            let t = t.to_ascii_lowercase();
            stages
                .iter()
                .position(|s| s.name.as_deref() == Some(&t))
                .ok_or_else(|| {
                    let names: Vec<&str> =
                        stages.iter().filter_map(|s| s.name.as_deref()).collect();
                    at(
                        0,
                        format!("no stage named {t:?} (stages: {})", names.join(", ")),
                    )
                })?
        }
    };
    let mut order = Vec::new();
    let mut visiting = Vec::new();
    visit(&stages, target, esc, &mut order, &mut visiting)?;
    let mut unused: Vec<String> = build_args
        .keys()
        .filter(|k| !declared.contains(k))
        .cloned()
        .collect();
    unused.sort();
    Ok(Plan {
        stages,
        order,
        global_args,
        escape: esc,
        unused_build_args: unused,
    })
}

/// The platform this builds for and on, as `linux/ARCH` (OCI's names: `amd64`, `arm64`).
pub fn platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    format!("linux/{arch}")
}

/// BuildKit's automatic platform args (`TARGETPLATFORM`, `TARGETOS`, `TARGETARCH`,
/// `TARGETVARIANT` and the `BUILD…` four): in the global scope without a declaration (so
/// `FROM --platform=$BUILDPLATFORM` works), and in a stage once declared bare (`ARG
/// TARGETARCH`). Builds run where they target, so both sets name this host's platform.
pub fn automatic_arg(name: &str) -> Option<String> {
    let p = platform();
    let (os, arch) = p.split_once('/').unwrap_or(("linux", ""));
    let v = match name
        .strip_prefix("TARGET")
        .or_else(|| name.strip_prefix("BUILD"))?
    {
        "PLATFORM" => p.clone(),
        "OS" => os.to_string(),
        "ARCH" => arch.to_string(),
        "VARIANT" => String::new(),
        _ => return None,
    };
    Some(v)
}

/// An `ARG`'s value: the build arg, else (for a global redeclared bare) the global value, else
/// its default expanded with what is in scope, else an automatic platform arg's value.
pub fn arg_value(
    d: &ArgDecl,
    build_args: &BTreeMap<String, String>,
    globals: &BTreeMap<String, Option<String>>,
    esc: char,
    scope: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<String>, String> {
    if let Some(v) = build_args.get(&d.name) {
        return Ok(Some(v.clone()));
    }
    match &d.default {
        Some(raw) => words::expand(raw, esc, scope)
            .map(Some)
            .map_err(|e| e.to_string()),
        None => Ok(globals
            .get(&d.name)
            .cloned()
            .flatten()
            .or_else(|| automatic_arg(&d.name))),
    }
}

fn valid_stage_name(n: &str) -> bool {
    let mut c = n.chars();
    matches!(c.next(), Some(f) if f.is_ascii_alphabetic())
        && c.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// What `COPY --from=VALUE` (already expanded) names, seen from stage `current`.
pub fn copy_from(stages: &[Stage], current: usize, value: &str) -> Result<CopyFrom, String> {
    let lower = value.to_ascii_lowercase();
    if let Some(s) = stages[..current]
        .iter()
        .find(|s| s.name.as_deref() == Some(&lower))
    {
        return Ok(CopyFrom::Stage(s.index));
    }
    if let Ok(n) = value.parse::<usize>() {
        return if n < current {
            Ok(CopyFrom::Stage(n))
        } else {
            Err(format!(
                "--from={n}: only earlier stages can be copied from"
            ))
        };
    }
    if stages.iter().any(|s| s.name.as_deref() == Some(&lower)) {
        return Err(format!(
            "--from={value}: that stage comes later; only earlier stages can be copied from"
        ));
    }
    Ok(CopyFrom::Image(value.to_string()))
}

/// Depth-first: the stages `index` uses, then `index`.
fn visit(
    stages: &[Stage],
    index: usize,
    esc: char,
    order: &mut Vec<usize>,
    visiting: &mut Vec<usize>,
) -> Result<(), PlanError> {
    if order.contains(&index) {
        return Ok(());
    }
    visiting.push(index);
    let stage = &stages[index];
    let mut deps = Vec::new();
    if let Base::Stage(b) = stage.base {
        deps.push(b);
    }
    for inst in &stage.instructions {
        // `COPY --from=X` and `RUN --mount=…,from=X`.
        let froms: Vec<String> = match inst.kind {
            Kind::Copy { .. } => inst
                .flags
                .iter()
                .filter(|f| f.name == "from")
                .map(|f| f.value.clone().unwrap_or_default())
                .collect(),
            Kind::Run { .. } => inst
                .flags
                .iter()
                .filter(|f| f.name == "mount")
                .filter_map(|f| crate::stage::mount_fields(f.value.as_deref()?).ok())
                .filter_map(|fields| {
                    fields
                        .into_iter()
                        .rev()
                        .find(|(k, _)| k == "from")
                        .and_then(|(_, v)| v)
                })
                .collect(),
            _ => Vec::new(),
        };
        for raw in &froms {
            // `--from` is expanded with the stage's args when the step runs; a stage named
            // literally is what a plan can see (BuildKit requires the same).
            let value = words::expand(raw, esc, &|_| None).unwrap_or_else(|_| raw.to_string());
            match copy_from(stages, index, &value) {
                Ok(CopyFrom::Stage(s)) => deps.push(s),
                Ok(CopyFrom::Image(_)) => {}
                Err(e) => return Err(at(inst.line, e)),
            }
        }
    }
    for d in deps {
        if visiting.contains(&d) {
            return Err(at(stage.line, "stages depend on each other in a cycle"));
        }
        visit(stages, d, esc, order, visiting)?;
    }
    visiting.pop();
    order.push(index);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dockerfile::parse;

    fn args(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn stages_target_and_order() {
        let df = parse(
            "ARG BASE=alpine\nARG TAG\nFROM ${BASE}:${TAG:-3} AS Build\nRUN make\n\
             FROM scratch AS unused\nCOPY x y\n\
             FROM build AS test\nRUN test\n\
             FROM busybox\nCOPY --from=build /out /out\nCOPY --from=docker.io/library/x:1 /a /a\n",
        )
        .unwrap();
        let p = plan(&df, &args(&[("TAG", "3.20"), ("NOPE", "1")]), None).unwrap();
        assert_eq!(p.stages.len(), 4);
        assert_eq!(p.stages[0].base, Base::Image("alpine:3.20".into()));
        assert_eq!(p.stages[0].name.as_deref(), Some("build"));
        assert_eq!(p.stages[1].base, Base::Scratch);
        assert_eq!(p.stages[2].base, Base::Stage(0));
        assert_eq!(p.order, [0, 3], "the unused stages are skipped");
        assert_eq!(p.unused_build_args, ["NOPE"]);
        let p = plan(&df, &args(&[]), Some("TEST")).unwrap();
        assert_eq!(p.stages[0].base, Base::Image("alpine:3".into()));
        assert_eq!(p.order, [0, 2]);
        let e = plan(&df, &args(&[]), Some("nope")).unwrap_err().to_string();
        assert!(
            e.contains("no stage named \"nope\"") && e.contains("build, unused, test"),
            "{e}"
        );
    }

    #[test]
    fn platform_args_and_from_platform() {
        let here = platform();
        let arch = here.trim_start_matches("linux/").to_string();
        let df = parse(
            "FROM --platform=$BUILDPLATFORM golang:${TARGETOS} AS build\n\
             FROM --platform=${TARGETPLATFORM} busybox-$TARGETARCH\n",
        )
        .unwrap();
        let p = plan(&df, &args(&[]), None).unwrap();
        assert_eq!(p.stages[0].base, Base::Image("golang:linux".into()));
        assert_eq!(p.stages[1].base, Base::Image(format!("busybox-{arch}")));
        assert_eq!(automatic_arg("BUILDVARIANT").as_deref(), Some(""));
        assert_eq!(automatic_arg("TARGETNOPE"), None);
        // Declared bare in a stage, it takes the automatic value; a build arg wins.
        let decl = ArgDecl {
            name: "TARGETARCH".into(),
            default: None,
        };
        let none = BTreeMap::new();
        assert_eq!(
            arg_value(&decl, &args(&[]), &none, '\\', &|_| None).unwrap(),
            Some(arch)
        );
        assert_eq!(
            arg_value(&decl, &args(&[("TARGETARCH", "x")]), &none, '\\', &|_| None).unwrap(),
            Some("x".into())
        );
        let other = if here == "linux/amd64" {
            "linux/arm64"
        } else {
            "linux/amd64"
        };
        let e = plan(
            &parse(&format!("FROM --platform={other} a\n")).unwrap(),
            &args(&[]),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("images only"), "{e}");
    }

    #[test]
    fn errors_name_the_line() {
        let e = |t: &str| {
            plan(&parse(t).unwrap(), &args(&[]), None)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            e("RUN x\nFROM a"),
            "line 1: RUN before the first FROM (only ARG may come before it)"
        );
        assert_eq!(e("ARG A"), "the Dockerfile has no FROM");
        assert!(e("FROM a AS x\nFROM b AS X").contains("used twice"));
        assert!(e("ARG E\nFROM $E").contains("names no image"));
        assert!(e("FROM a\nCOPY --from=1 x y").contains("only earlier stages"));
        assert!(
            e("FROM a AS first\nCOPY --from=later x y\nFROM b AS later\nFROM first")
                .contains("comes later")
        );
        assert!(e("FROM a AS 1x").contains("invalid stage name"));
    }

    #[test]
    fn bare_arg_in_a_stage_takes_the_global_value() {
        let df = parse("ARG V=1\nFROM a\nARG V\nARG W=${V}x\n").unwrap();
        let p = plan(&df, &args(&[]), None).unwrap();
        assert_eq!(p.global_args["V"].as_deref(), Some("1"));
        let ArgDeclsIn(decls) = decls(&p.stages[0].instructions[0]);
        let v = arg_value(&decls[0], &args(&[]), &p.global_args, '\\', &|_| None).unwrap();
        assert_eq!(v.as_deref(), Some("1"));
        let v = arg_value(
            &decls[0],
            &args(&[("V", "2")]),
            &p.global_args,
            '\\',
            &|_| None,
        )
        .unwrap();
        assert_eq!(v.as_deref(), Some("2"));
    }

    struct ArgDeclsIn(Vec<ArgDecl>);

    fn decls(i: &Instruction) -> ArgDeclsIn {
        match &i.kind {
            Kind::Arg(d) => ArgDeclsIn(d.clone()),
            other => panic!("{other:?}"),
        }
    }
}
