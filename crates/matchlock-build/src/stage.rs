//! One stage's instructions, applied in order: the image config they set (`ENV`, `WORKDIR`,
//! `CMD`, …), with every word expanded in the stage's scope, and the file-system steps (`RUN`,
//! `COPY`, `ADD`) the executor runs. Pure: no sandbox, no file system, so every rule is tested
//! here.
//!
//! Scope, as BuildKit has it: `ENV` (the base image's, then the stage's) wins over `ARG`;
//! an `ARG` is visible from its declaration to the end of its stage, and to `RUN` as an
//! environment variable that is not kept in the image.

use crate::dockerfile::{Command, Flag, Heredoc, Instruction, Kind, Source};
use crate::plan::{arg_value, copy_from, CopyFrom, Stage};
use crate::words;
use std::collections::{BTreeMap, BTreeSet};

/// The parts of an image's config a Dockerfile sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageConfig {
    /// `Env`, in order, names unique.
    pub env: Vec<(String, String)>,
    /// `Entrypoint`.
    pub entrypoint: Option<Vec<String>>,
    /// `Cmd`.
    pub cmd: Option<Vec<String>>,
    /// `WorkingDir` (empty: `/`).
    pub working_dir: String,
    /// `User` (empty: root).
    pub user: String,
    /// `Labels`.
    pub labels: BTreeMap<String, String>,
    /// `ExposedPorts`, as `port/proto`.
    pub exposed_ports: BTreeSet<String>,
    /// `Volumes`.
    pub volumes: BTreeSet<String>,
    /// `StopSignal`.
    pub stop_signal: Option<String>,
    /// `Healthcheck`.
    pub healthcheck: Option<Healthcheck>,
    /// `Shell` (Docker's extension; `["/bin/sh", "-c"]` when unset).
    pub shell: Vec<String>,
    /// `OnBuild` triggers, recorded.
    pub onbuild: Vec<String>,
}

impl Default for ImageConfig {
    fn default() -> Self {
        ImageConfig {
            env: Vec::new(),
            entrypoint: None,
            cmd: None,
            working_dir: String::new(),
            user: String::new(),
            labels: BTreeMap::new(),
            exposed_ports: BTreeSet::new(),
            volumes: BTreeSet::new(),
            stop_signal: None,
            healthcheck: None,
            shell: vec!["/bin/sh".into(), "-c".into()],
            onbuild: Vec::new(),
        }
    }
}

impl ImageConfig {
    /// The value of `name` in `Env`.
    pub fn env_get(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn env_set(&mut self, name: String, value: String) {
        match self.env.iter_mut().find(|(k, _)| *k == name) {
            Some(slot) => slot.1 = value,
            None => self.env.push((name, value)),
        }
    }

    /// The working directory, `/` when unset.
    pub fn cwd(&self) -> &str {
        if self.working_dir.is_empty() {
            "/"
        } else {
            &self.working_dir
        }
    }
}

/// `HEALTHCHECK`, as the image config records it (durations in nanoseconds, 0: the default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Healthcheck {
    /// `["NONE"]`, `["CMD", args…]` or `["CMD-SHELL", command]`.
    pub test: Vec<String>,
    /// `--interval`.
    pub interval_ns: u64,
    /// `--timeout`.
    pub timeout_ns: u64,
    /// `--start-period`.
    pub start_period_ns: u64,
    /// `--start-interval`.
    pub start_interval_ns: u64,
    /// `--retries` (0: the default).
    pub retries: u32,
}

/// A `RUN` to execute in a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunStep {
    /// The program and its arguments.
    pub argv: Vec<String>,
    /// Given on stdin (a `RUN <<EOF` script, run from a file in `/tmp`).
    pub stdin: Option<String>,
    /// The image's `Env` and then the args in scope that `Env` does not set.
    pub env: Vec<(String, String)>,
    /// The working directory (created first when missing).
    pub cwd: String,
    /// The user (empty: root).
    pub user: String,
    /// `--network=none`: this step runs without a network.
    pub no_network: bool,
    /// `--mount`s, in the order written.
    pub mounts: Vec<RunMount>,
}

/// A `RUN --mount`, expanded and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunMount {
    /// Where, absolute in the sandbox (a relative target is against the working directory).
    pub target: String,
    /// What is mounted there.
    pub kind: MountKind,
}

/// What a `RUN --mount` mounts. Nothing under a mount lands in the step's layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountKind {
    /// `type=cache`: a directory kept on the host between builds under `id` (the target when
    /// not given), read-write; its content is in no cache key.
    Cache {
        /// The cache's name.
        id: String,
        /// `mode`, `uid`, `gid` of its root directory.
        mode: u32,
        /// Owner the files show in the guest.
        uid: u32,
        /// Group the files show in the guest.
        gid: u32,
    },
    /// `type=bind` (the default): `source` of the context, or of `from`, read-only unless
    /// `rw`, whose writes are dropped after the step (Docker's rule). Its content is in the
    /// step's cache key.
    Bind {
        /// Path in the context (or the stage or image), `.` when not given.
        source: String,
        /// `from=`: a stage or an image instead of the context.
        from: Option<CopyFrom>,
        /// `rw`: writable, the writes thrown away.
        rw: bool,
    },
    /// `type=tmpfs`: an empty directory in memory.
    Tmpfs,
}

/// `--mount`'s comma-separated `key=value` fields (a field may be `"quoted"`, as Docker reads
/// them with a CSV reader); a bare key has no value.
pub fn mount_fields(spec: &str) -> Result<Vec<(String, Option<String>)>, String> {
    let mut fields = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = spec.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                cur.push('"');
            }
            '"' => quoted = !quoted,
            ',' if !quoted => fields.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    if quoted {
        return Err(format!("--mount={spec}: a quote is not closed"));
    }
    fields.push(cur);
    Ok(fields
        .into_iter()
        .filter(|f| !f.trim().is_empty())
        .map(|f| match f.split_once('=') {
            Some((k, v)) => (k.trim().to_ascii_lowercase(), Some(v.to_string())),
            None => (f.trim().to_ascii_lowercase(), None),
        })
        .collect())
}

/// A source of a `COPY` or `ADD`, expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopySource {
    /// A path or glob, relative to the context (or the stage or image copied from).
    Path(String),
    /// `ADD http(s)://…`: fetched on the host under the build's network policy.
    Url(String),
    /// A URL source once fetched (the builder makes these from [`CopySource::Url`]): the host
    /// file, the name it takes, its `Last-Modified` time. Mode 0600, as Docker gives it.
    Fetched {
        /// The downloaded file.
        file: std::path::PathBuf,
        /// Its name in the image (the URL path's last segment).
        name: String,
        /// Modification time, seconds since the epoch.
        mtime: u64,
    },
    /// A heredoc's content, as a file named after its delimiter.
    Inline {
        /// The file name.
        name: String,
        /// The content (expanded unless the delimiter was quoted).
        content: String,
    },
}

/// A `COPY` or `ADD` to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyStep {
    /// `ADD`: local tar archives are unpacked.
    pub add: bool,
    /// `--from`: another stage or an image instead of the context.
    pub from: Option<CopyFrom>,
    /// The sources.
    pub sources: Vec<CopySource>,
    /// The destination, absolute; a trailing `/` (or several sources) makes it a directory.
    pub dest: String,
    /// `--chown` (expanded; resolved against the image's `/etc/passwd` when applied).
    pub chown: Option<String>,
    /// `--chmod`, octal.
    pub chmod: Option<u32>,
    /// `--exclude` patterns.
    pub exclude: Vec<String>,
    /// `ADD --checksum=sha256:…`: what a URL source's content must hash to.
    pub checksum: Option<String>,
    /// `COPY --parents`: each source keeps its path from the context's root.
    pub parents: bool,
}

/// What one instruction does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// It only changed the config (or declared an arg).
    Config,
    /// `WORKDIR`: the directory, created when missing (root-owned, as Docker does).
    Workdir(String),
    /// `RUN`.
    Run(RunStep),
    /// `COPY` or `ADD`.
    Copy(CopyStep),
}

/// A stage being applied: its config and the args in scope.
#[derive(Debug, Clone)]
pub struct StageState<'a> {
    /// The config so far (the base image's, then each instruction's changes).
    pub config: ImageConfig,
    /// Args declared so far in this stage, with their values.
    pub args: BTreeMap<String, Option<String>>,
    escape: char,
    build_args: &'a BTreeMap<String, String>,
    globals: &'a BTreeMap<String, Option<String>>,
    stages: &'a [Stage],
    index: usize,
}

impl<'a> StageState<'a> {
    /// Starts stage `index` of `stages` from its base's config.
    pub fn new(
        plan: &'a crate::plan::Plan,
        index: usize,
        base: ImageConfig,
        build_args: &'a BTreeMap<String, String>,
    ) -> StageState<'a> {
        StageState {
            config: base,
            args: BTreeMap::new(),
            escape: plan.escape,
            build_args,
            globals: &plan.global_args,
            stages: &plan.stages,
            index,
        }
    }

    /// A variable's value for expansion: `Env` first, then the args in scope.
    fn lookup(&self, name: &str) -> Option<String> {
        self.config
            .env_get(name)
            .map(str::to_string)
            .or_else(|| self.args.get(name).cloned().flatten())
    }

    fn expand(&self, raw: &str) -> Result<String, String> {
        words::expand(raw, self.escape, &|n| self.lookup(n)).map_err(|e| e.to_string())
    }

    fn expand_flag(&self, flags: &[Flag], name: &str) -> Result<Option<String>, String> {
        match flags.iter().rev().find(|f| f.name == name) {
            Some(Flag { value: Some(v), .. }) => self.expand(v).map(Some),
            Some(Flag { value: None, .. }) => Err(format!("--{name} needs a value")),
            None => Ok(None),
        }
    }

    /// Applies one instruction; an error names what is wrong (the caller adds the line).
    pub fn apply(&mut self, inst: &Instruction) -> Result<Step, String> {
        match &inst.kind {
            Kind::From { .. } => Err("FROM inside a stage".into()),
            Kind::Arg(decls) => {
                for d in decls {
                    let scope = |n: &str| self.lookup(n);
                    let v = arg_value(d, self.build_args, self.globals, self.escape, &scope)?;
                    self.args.insert(d.name.clone(), v);
                }
                Ok(Step::Config)
            }
            Kind::Env(pairs) => {
                // Each pair sees the ones before it on the same line, as Docker does.
                for (k, v) in pairs {
                    let k = self.expand(k)?;
                    let v = self.expand(v)?;
                    if k.is_empty() || k.contains('=') {
                        return Err(format!("invalid ENV name {k:?}"));
                    }
                    self.config.env_set(k, v);
                }
                Ok(Step::Config)
            }
            Kind::Label(pairs) => {
                for (k, v) in pairs {
                    let (k, v) = (self.expand(k)?, self.expand(v)?);
                    self.config.labels.insert(k, v);
                }
                Ok(Step::Config)
            }
            Kind::Maintainer(m) => {
                self.config.labels.insert("maintainer".into(), m.clone());
                Ok(Step::Config)
            }
            Kind::Workdir(raw) => {
                let dir = self.expand(raw)?;
                let dir = absolute(self.config.cwd(), &dir);
                self.config.working_dir = dir.clone();
                Ok(Step::Workdir(dir))
            }
            Kind::User(raw) => {
                let user = self.expand(raw)?;
                if user.is_empty() {
                    return Err("USER names no user".into());
                }
                self.config.user = user;
                Ok(Step::Config)
            }
            Kind::Expose(ports) => {
                for raw in ports {
                    let p = self.expand(raw)?;
                    self.config.exposed_ports.insert(port(&p)?);
                }
                Ok(Step::Config)
            }
            Kind::Volume(paths) => {
                for raw in paths {
                    let p = self.expand(raw)?;
                    if p.is_empty() {
                        return Err("VOLUME names an empty path".into());
                    }
                    self.config.volumes.insert(p);
                }
                Ok(Step::Config)
            }
            Kind::StopSignal(raw) => {
                let s = self.expand(raw)?;
                signal_ok(&s)?;
                self.config.stop_signal = Some(s);
                Ok(Step::Config)
            }
            Kind::Shell(v) => {
                self.config.shell = v.clone();
                Ok(Step::Config)
            }
            Kind::Cmd(cmd) => {
                let c = &mut self.config;
                c.cmd = Some(argv(&c.shell, cmd));
                Ok(Step::Config)
            }
            Kind::Entrypoint(cmd) => {
                let c = &mut self.config;
                c.entrypoint = Some(argv(&c.shell, cmd));
                // A new entrypoint drops the base image's CMD, as Docker does; a CMD in this
                // stage after it sets one again.
                c.cmd = None;
                Ok(Step::Config)
            }
            Kind::Healthcheck(cmd) => {
                self.config.healthcheck = Some(healthcheck(cmd.as_ref(), &inst.flags)?);
                Ok(Step::Config)
            }
            Kind::Onbuild(text) => {
                self.config.onbuild.push(text.clone());
                Ok(Step::Config)
            }
            Kind::Run { command, heredocs } => self.run(command, heredocs, &inst.flags),
            Kind::Copy { sources, dest } => self.copy(false, sources, dest, &inst.flags),
            Kind::Add { sources, dest } => self.copy(true, sources, dest, &inst.flags),
        }
    }

    fn run(&self, command: &Command, heredocs: &[Heredoc], flags: &[Flag]) -> Result<Step, String> {
        let c = &self.config;
        let no_network = match self.expand_flag(flags, "network")?.as_deref() {
            None | Some("default") => false,
            Some("none") => true,
            Some(other) => {
                return Err(format!(
                    "RUN --network={other} is not supported (default or none; the build's \
                     --allow-host and --no-network set the policy)"
                ))
            }
        };
        if flags.iter().any(|f| f.name == "security") {
            return Err(
                "RUN --security is not supported (steps run unprivileged, as users' \
                        sandboxes do)"
                    .into(),
            );
        }
        let mut mounts = Vec::new();
        for f in flags.iter().filter(|f| f.name == "mount") {
            let spec = self.expand(f.value.as_deref().unwrap_or_default())?;
            let m = self.mount(&spec)?;
            if mounts.iter().any(|o: &RunMount| o.target == m.target) {
                return Err(format!("two --mounts at {}", m.target));
            }
            mounts.push(m);
        }
        let (argv, stdin) = match (command, heredocs) {
            (Command::Exec(v), _) => (v.clone(), None),
            (Command::Shell(text), [only])
                if !text.trim().contains(char::is_whitespace)
                    && crate::dockerfile::marker(text.trim()).is_some() =>
            {
                // The heredoc is the script: run from a file, so `#!` picks its interpreter.
                let script = "f=$(mktemp) && cat > \"$f\" && chmod 700 \"$f\" && \
                              if head -c 2 \"$f\" | grep -q '^#!'; then \"$f\"; else sh \"$f\"; fi; \
                              rc=$?; rm -f \"$f\"; exit $rc";
                (
                    vec!["/bin/sh".into(), "-c".into(), script.into()],
                    Some(only.body.clone()),
                )
            }
            (Command::Shell(text), hs) => {
                // The shell reads the heredocs itself: the line, then each body and delimiter.
                let mut script = text.clone();
                for h in hs {
                    script.push('\n');
                    script.push_str(&h.body);
                    script.push_str(&h.delimiter);
                }
                let mut v = c.shell.clone();
                v.push(script);
                (v, None)
            }
        };
        let mut env = c.env.clone();
        for (k, v) in &self.args {
            if let (Some(v), None) = (v, c.env_get(k)) {
                env.push((k.clone(), v.clone()));
            }
        }
        Ok(Step::Run(RunStep {
            argv,
            stdin,
            env,
            cwd: c.cwd().to_string(),
            user: c.user.clone(),
            no_network,
            mounts,
        }))
    }

    /// One `--mount` value (expanded).
    fn mount(&self, spec: &str) -> Result<RunMount, String> {
        let fields = mount_fields(spec)?;
        let get = |names: &[&str]| -> Option<Option<String>> {
            fields
                .iter()
                .rev()
                .find(|(k, _)| names.contains(&k.as_str()))
                .map(|(_, v)| v.clone())
        };
        let value = |names: &[&str]| -> Result<Option<String>, String> {
            match get(names) {
                None => Ok(None),
                Some(Some(v)) => Ok(Some(v)),
                Some(None) => Err(format!("--mount={spec}: {} needs a value", names[0])),
            }
        };
        let flag = |names: &[&str]| -> Result<bool, String> {
            match get(names) {
                None => Ok(false),
                Some(None) => Ok(true),
                Some(Some(v)) => match v.to_ascii_lowercase().as_str() {
                    "true" | "1" => Ok(true),
                    "false" | "0" => Ok(false),
                    _ => Err(format!(
                        "--mount={spec}: {}={v} is not true or false",
                        names[0]
                    )),
                },
            }
        };
        let kind = value(&["type"])?.unwrap_or_else(|| "bind".into());
        let known: &[&str] = match kind.as_str() {
            "bind" => &[
                "type",
                "target",
                "dst",
                "destination",
                "source",
                "src",
                "from",
                "readonly",
                "ro",
                "rw",
                "readwrite",
            ],
            "cache" => &[
                "type",
                "target",
                "dst",
                "destination",
                "id",
                "sharing",
                "mode",
                "uid",
                "gid",
                "readonly",
                "ro",
            ],
            "tmpfs" => &["type", "target", "dst", "destination", "size"],
            "secret" | "ssh" => {
                return Err(format!(
                    "RUN --mount=type={kind} is not supported: give the step secrets with \
                     --secret NAME@HOST, which keeps the value on the host and sends it only \
                     to that host (the guest sees a placeholder)"
                ))
            }
            other => {
                return Err(format!(
                    "RUN --mount=type={other}: not a mount type (bind, cache or tmpfs)"
                ))
            }
        };
        if let Some((k, _)) = fields.iter().find(|(k, _)| !known.contains(&k.as_str())) {
            return Err(format!(
                "--mount={spec}: {k} is not an option of type={kind}"
            ));
        }
        let target = value(&["target", "dst", "destination"])?
            .filter(|t| !t.is_empty())
            .ok_or_else(|| format!("--mount={spec}: a target is needed"))?;
        let target = absolute(self.config.cwd(), &target);
        if target == "/" {
            return Err(format!("--mount={spec}: the target cannot be /"));
        }
        let number = |names: &[&str], radix: u32, default: u32| -> Result<u32, String> {
            match value(names)? {
                None => Ok(default),
                Some(v) => u32::from_str_radix(&v, radix)
                    .map_err(|_| format!("--mount={spec}: {}={v} is not a number", names[0])),
            }
        };
        let kind = match kind.as_str() {
            "cache" => {
                if flag(&["readonly", "ro"])? {
                    return Err(format!(
                        "--mount={spec}: a read-only cache is not supported"
                    ));
                }
                if let Some(s) = value(&["sharing"])? {
                    // Steps run one at a time, so every sharing mode behaves as `locked`.
                    if !matches!(s.as_str(), "shared" | "private" | "locked") {
                        return Err(format!(
                            "--mount={spec}: sharing={s}: shared, private or locked"
                        ));
                    }
                }
                MountKind::Cache {
                    id: value(&["id"])?
                        .filter(|i| !i.is_empty())
                        .unwrap_or_else(|| target.clone()),
                    mode: number(&["mode"], 8, 0o755)?,
                    uid: number(&["uid"], 10, 0)?,
                    gid: number(&["gid"], 10, 0)?,
                }
            }
            "tmpfs" => MountKind::Tmpfs,
            _ => {
                let rw = flag(&["rw", "readwrite"])?;
                if rw && flag(&["readonly", "ro"])? {
                    return Err(format!("--mount={spec}: rw and readonly together"));
                }
                MountKind::Bind {
                    source: value(&["source", "src"])?
                        .filter(|s| !s.is_empty())
                        .unwrap_or_else(|| ".".into()),
                    from: match value(&["from"])? {
                        Some(f) => Some(copy_from(self.stages, self.index, &f)?),
                        None => None,
                    },
                    rw,
                }
            }
        };
        Ok(RunMount { target, kind })
    }

    fn copy(
        &self,
        add: bool,
        sources: &[Source],
        dest: &str,
        flags: &[Flag],
    ) -> Result<Step, String> {
        let from = match self.expand_flag(flags, "from")? {
            Some(v) => Some(copy_from(self.stages, self.index, &v)?),
            None => None,
        };
        let chmod = match self.expand_flag(flags, "chmod")? {
            Some(m) => Some(
                u32::from_str_radix(&m, 8)
                    .ok()
                    .filter(|m| *m <= 0o7777)
                    .ok_or_else(|| format!("--chmod={m}: an octal mode such as 755"))?,
            ),
            None => None,
        };
        let chown = self.expand_flag(flags, "chown")?;
        let checksum = match self.expand_flag(flags, "checksum")? {
            Some(c) => {
                let hex = c.strip_prefix("sha256:").unwrap_or_default();
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(format!(
                        "--checksum={c}: give sha256: and 64 hex digits (the only digest \
                         supported)"
                    ));
                }
                Some(c.to_ascii_lowercase())
            }
            None => None,
        };
        let mut exclude = Vec::new();
        for f in flags.iter().filter(|f| f.name == "exclude") {
            exclude.push(self.expand(f.value.as_deref().unwrap_or_default())?);
        }
        let mut out = Vec::new();
        for s in sources {
            out.push(match s {
                Source::Path(raw) => {
                    let p = self.expand(raw)?;
                    if p.is_empty() {
                        return Err("a source expanded to nothing".into());
                    }
                    let lower = p.to_ascii_lowercase();
                    let git = lower.starts_with("git@")
                        || lower.starts_with("git://")
                        || lower.split('#').next().is_some_and(|u| u.ends_with(".git"));
                    if add && git {
                        return Err(format!(
                            "ADD {p}: git sources are not supported yet; clone with RUN git \
                             clone (under the build's network policy)"
                        ));
                    }
                    if add && (lower.starts_with("http://") || lower.starts_with("https://")) {
                        CopySource::Url(p)
                    } else if add && p.contains("://") {
                        return Err(format!("ADD {p}: only http and https URLs can be fetched"));
                    } else {
                        CopySource::Path(p)
                    }
                }
                Source::Inline(h) => CopySource::Inline {
                    name: h.delimiter.clone(),
                    content: if h.quoted {
                        h.body.clone()
                    } else {
                        self.expand_heredoc(&h.body)?
                    },
                },
            });
        }
        let d = self.expand(dest)?;
        if d.is_empty() {
            return Err("the destination expanded to nothing".into());
        }
        let mut dest = absolute(self.config.cwd(), &d);
        if (d.ends_with('/') || d == ".") && !dest.ends_with('/') {
            dest.push('/');
        }
        let parents = match flags.iter().rev().find(|f| f.name == "parents") {
            None => false,
            Some(Flag { value: None, .. }) => true,
            Some(Flag { value: Some(v), .. }) => match self.expand(v)?.as_str() {
                "true" => true,
                "false" => false,
                other => return Err(format!("--parents={other}: true or false")),
            },
        };
        if parents
            && out
                .iter()
                .any(|s| matches!(s, CopySource::Path(p) if p.contains("/./")))
        {
            return Err("COPY --parents with a ./ pivot in a source is not supported".into());
        }
        if checksum.is_some() && !out.iter().all(|s| matches!(s, CopySource::Url(_))) {
            return Err("--checksum is for URL sources only".into());
        }
        Ok(Step::Copy(CopyStep {
            add,
            from,
            sources: out,
            dest,
            chown,
            chmod,
            exclude,
            checksum,
            parents,
        }))
    }

    /// A heredoc body with `$VAR` expanded and quotes kept (it is file content, not a word).
    fn expand_heredoc(&self, body: &str) -> Result<String, String> {
        let mut out = String::new();
        for line in body.split_inclusive('\n') {
            let mut rest = line;
            while let Some(at) = rest.find('$') {
                out.push_str(&rest[..at]);
                let tail = &rest[at..];
                // The variable alone: its end is where a name (or `${…}`) ends.
                let len = if tail.starts_with("${") {
                    tail.find('}').map_or(tail.len(), |e| e + 1)
                } else {
                    1 + tail[1..]
                        .find(|c: char| !(c == '_' || c.is_ascii_alphanumeric()))
                        .unwrap_or(tail.len() - 1)
                };
                out.push_str(&self.expand(&tail[..len])?);
                rest = &tail[len..];
            }
            out.push_str(rest);
        }
        Ok(out)
    }
}

/// `cmd` as an argv: exec form as is, shell form through `shell`.
fn argv(shell: &[String], cmd: &Command) -> Vec<String> {
    match cmd {
        Command::Exec(v) => v.clone(),
        Command::Shell(s) => {
            let mut v = shell.to_vec();
            v.push(s.clone());
            v
        }
    }
}

/// `p` made absolute against `cwd`, with `.` and `..` resolved by name.
pub fn absolute(cwd: &str, p: &str) -> String {
    let joined = if p.starts_with('/') {
        p.to_string()
    } else {
        format!("{}/{p}", cwd.trim_end_matches('/'))
    };
    let mut parts: Vec<&str> = Vec::new();
    for seg in joined.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    format!("/{}", parts.join("/"))
}

/// `80`, `80/tcp`, `53/udp`, `8000-8010/tcp` as `port/proto`.
fn port(p: &str) -> Result<String, String> {
    let (num, proto) = p.split_once('/').unwrap_or((p, "tcp"));
    let proto = proto.to_ascii_lowercase();
    let valid = |n: &str| n.parse::<u16>().is_ok_and(|n| n > 0);
    let nums_ok = match num.split_once('-') {
        Some((a, b)) => valid(a) && valid(b),
        None => valid(num),
    };
    if !nums_ok || !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
        return Err(format!("EXPOSE {p}: a port such as 80, 80/tcp or 53/udp"));
    }
    Ok(format!("{num}/{proto}"))
}

fn signal_ok(s: &str) -> Result<(), String> {
    let name = s.strip_prefix("SIG").unwrap_or(s);
    let ok = s.parse::<u8>().is_ok_and(|n| (1..=64).contains(&n))
        || (!name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '+' || c == '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "STOPSIGNAL {s}: a signal name or number, e.g. SIGTERM or 15"
        ))
    }
}

fn healthcheck(cmd: Option<&Command>, flags: &[Flag]) -> Result<Healthcheck, String> {
    let test = match cmd {
        None => vec!["NONE".to_string()],
        Some(Command::Exec(v)) => std::iter::once("CMD".to_string())
            .chain(v.clone())
            .collect(),
        Some(Command::Shell(s)) => vec!["CMD-SHELL".into(), s.clone()],
    };
    let mut h = Healthcheck {
        test,
        interval_ns: 0,
        timeout_ns: 0,
        start_period_ns: 0,
        start_interval_ns: 0,
        retries: 0,
    };
    for f in flags {
        let v = f.value.as_deref().unwrap_or_default();
        match f.name.as_str() {
            "retries" => {
                h.retries = v
                    .parse()
                    .map_err(|_| format!("--retries={v}: a whole number"))?
            }
            name => {
                let ns = duration_ns(v)
                    .ok_or_else(|| format!("--{name}={v}: a duration such as 30s or 1m30s"))?;
                match name {
                    "interval" => h.interval_ns = ns,
                    "timeout" => h.timeout_ns = ns,
                    "start-period" => h.start_period_ns = ns,
                    _ => h.start_interval_ns = ns,
                }
            }
        }
    }
    Ok(h)
}

/// A Go-style duration (`1h2m3s`, `500ms`, `1.5s`) in nanoseconds.
fn duration_ns(s: &str) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let mut total: f64 = 0.0;
    let mut rest = s;
    while !rest.is_empty() {
        let n = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let value: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = match &rest[..u] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        total += value * unit;
        rest = &rest[u..];
    }
    (total.is_finite() && total < u64::MAX as f64).then_some(total as u64)
}

#[cfg(test)]
mod tests;
