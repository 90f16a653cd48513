//! `matchlock ssh` end to end with OpenSSH's own `ssh`, `scp` and `sftp` against real sandboxes
//! whose images have no sshd: commands and exit codes, stdin, terminals, port forwards, files, and
//! the refusals (another key, another host key, traffic that is not SSH, a forward out of the
//! sandbox, a privileged remote forward), in images with and without sftp-server.

mod common;

use common::*;
use std::io::Write;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// `matchlock ssh ID --serve`: the process and the ssh options of the command it printed.
struct Served {
    child: Child,
    options: Vec<String>,
    dest: String,
}

impl Served {
    fn start(id: &str) -> Served {
        let mut child = ml(&["ssh", id, "--serve"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let line = first_line(child.stdout.take().unwrap());
        let mut words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
        assert_eq!(words.first().map(String::as_str), Some("ssh"), "{line:?}");
        let dest = words.pop().unwrap();
        assert_eq!(dest, "root@127.0.0.1", "{line:?}");
        Served {
            child,
            options: words[1..].to_vec(),
            dest,
        }
    }

    fn port(&self) -> u16 {
        self.options
            .iter()
            .find_map(|o| o.strip_prefix("Port=")?.parse().ok())
            .unwrap()
    }

    /// `program` (ssh, scp, sftp) with the served options, `options` replaced where given.
    fn tool(&self, program: &str, replace: &[(&str, &str)]) -> Command {
        let mut c = Command::new(program);
        let mut opts = self.options.clone();
        for (from, to) in replace {
            for o in opts.iter_mut() {
                if o == from {
                    *o = to.to_string();
                }
            }
        }
        c.args(opts).stdin(Stdio::null());
        c
    }

    fn ssh(&self, args: &[&str]) -> Output {
        self.tool("ssh", &[])
            .arg(&self.dest)
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn commands_stdin_terminals_and_exit_codes() {
    let sb = Sandbox::detached(&[], &["sleep", "100000"]);
    let o = run(&["ssh", &sb.id, "--", "echo out; echo err >&2; exit 7"]);
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    assert_eq!(stdout(&o), "out\n");
    assert!(stderr(&o).contains("err"), "{}", stderr(&o));

    // 2 MiB through `cat` and back: stdin, its EOF and flow control.
    let big: Vec<u8> = (0..(2 << 20)).map(|i| (i % 251) as u8).collect();
    let o = run_stdin(&["ssh", &sb.id, "--", "cat"], &big);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(o.stdout == big, "{} bytes came back", o.stdout.len());

    // A terminal on request, with the size ssh asked for; the user name picks the guest user.
    let o = run(&["ssh", &sb.id, "--", "-tt", "tty; stty size"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("/dev/pts/"), "{}", stdout(&o));
    let o = run(&["ssh", &sb.id, "-u", "nobody", "--", "id -u"]);
    assert_eq!(stdout(&o), "65534\n", "{}", stderr(&o));
    let o = run(&["ssh", &sb.id, "-u", "nosuchuser", "--", "true"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("nosuchuser"), "{}", stderr(&o));
}

#[test]
fn served_access_forwards_files_and_refusals() {
    let sb = Sandbox::detached_from(
        python_image(),
        &[],
        &["nc", "-ll", "-p", "9000", "-e", "cat"],
    );
    let served = Served::start(&sb.id);
    let o = served.ssh(&["echo", "served"]);
    assert_eq!(stdout(&o), "served\n", "{}", stderr(&o));

    // ssh -L to the sandbox's loopback.
    let port = free_port();
    let mut fwd = served
        .tool("ssh", &[])
        .args(["-N", "-L", &format!("{port}:localhost:9000"), &served.dest])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_until(Duration::from_secs(30), || round_trip(
        port,
        b"through ssh -L"
    )
    .as_deref()
        == Some(b"through ssh -L")));
    let _ = fwd.kill();
    let _ = fwd.wait();
    // A forward to anything but the sandbox's loopback is refused.
    let port = free_port();
    let out = served
        .tool("ssh", &[])
        .args([
            "-v",
            "-N",
            "-L",
            &format!("{port}:10.0.2.2:80"),
            &served.dest,
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = scopeguard(out);
    assert!(wait_until(Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    }));
    // Closed or reset, but nothing from anywhere.
    assert!(round_trip(port, b"x").unwrap_or_default().is_empty());
    let _ = out.0.kill();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut out.0.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains("administratively prohibited"), "{err}");

    // sftp and scp (which speaks SFTP).
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..(1 << 20)).map(|i| (i * 7 % 256) as u8).collect();
    std::fs::write(dir.path().join("up"), &data).unwrap();
    let o = served
        .tool("scp", &[])
        .arg(dir.path().join("up"))
        .arg(format!("{}:/tmp/scp-up", served.dest))
        .output()
        .unwrap();
    assert!(o.status.success(), "scp: {}", stderr(&o));
    let o = served
        .tool("scp", &[])
        .arg(format!("{}:/tmp/scp-up", served.dest))
        .arg(dir.path().join("back"))
        .output()
        .unwrap();
    assert!(o.status.success(), "scp back: {}", stderr(&o));
    assert!(std::fs::read(dir.path().join("back")).unwrap() == data);
    let batch = dir.path().join("batch");
    std::fs::write(
        &batch,
        format!(
            "put {} /tmp/sftp-up\nmkdir /tmp/made\nls -l /tmp/scp-up\nget /etc/passwd {}\n",
            dir.path().join("up").display(),
            dir.path().join("passwd").display()
        ),
    )
    .unwrap();
    let o = served
        .tool("sftp", &[])
        .arg("-b")
        .arg(&batch)
        .arg(&served.dest)
        .output()
        .unwrap();
    assert!(o.status.success(), "sftp: {}", stderr(&o));
    assert!(stdout(&o).contains("1048576"), "{}", stdout(&o));
    assert!(std::fs::read_to_string(dir.path().join("passwd"))
        .unwrap()
        .starts_with("root:"));
    let o = sb.exec(&[
        "sh",
        "-c",
        "cmp /tmp/sftp-up /tmp/scp-up && test -d /tmp/made && echo same",
    ]);
    assert_eq!(stdout(&o), "same\n", "{}", stderr(&o));

    // Another key is refused.
    let key = dir.path().join("other");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", ""])
        .arg("-f")
        .arg(&key)
        .status()
        .unwrap();
    assert!(st.success());
    let identity = served.options[1].clone();
    let o = served
        .tool("ssh", &[(&identity, key.to_str().unwrap())])
        .args(["-o", "BatchMode=yes", &served.dest, "true"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(255));
    assert!(stderr(&o).contains("Permission denied"), "{}", stderr(&o));

    // A server with another host key than the one pinned is refused by ssh.
    let kh = dir.path().join("known_hosts");
    let alias = served
        .options
        .iter()
        .find_map(|o| o.strip_prefix("HostKeyAlias="))
        .unwrap();
    let other_pub = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    std::fs::write(&kh, format!("{alias} {other_pub}")).unwrap();
    let pinned = served
        .options
        .iter()
        .find(|o| o.starts_with("UserKnownHostsFile="))
        .unwrap()
        .clone();
    let o = served
        .tool(
            "ssh",
            &[(&pinned, &format!("UserKnownHostsFile={}", kh.display()))],
        )
        .args(["-o", "BatchMode=yes", &served.dest, "true"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(255));
    assert!(
        stderr(&o).contains("HOST IDENTIFICATION HAS CHANGED")
            || stderr(&o).contains("Host key verification failed"),
        "{}",
        stderr(&o)
    );

    // Traffic that is not SSH is dropped, and the server goes on serving.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", served.port())).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\0\0\0\0garbage");
    let mut got = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut got);
    assert!(!String::from_utf8_lossy(&got).contains("200"), "{got:?}");
    let o = served.ssh(&["echo", "still serving"]);
    assert_eq!(stdout(&o), "still serving\n", "{}", stderr(&o));
}

#[test]
fn sftp_scp_and_remote_forwards_in_an_image_without_sftp_server() {
    // The busybox image has no sftp-server: the agent's own serves, as the SSH user.
    let sb = Sandbox::detached(&[], &["sleep", "100000"]);
    let served = Served::start(&sb.id);
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..(3 << 20)).map(|i| (i * 13 % 256) as u8).collect();
    std::fs::write(dir.path().join("up"), &data).unwrap();
    let o = served
        .tool("scp", &[])
        .arg(dir.path().join("up"))
        .arg(format!("{}:/tmp/up", served.dest))
        .output()
        .unwrap();
    assert!(o.status.success(), "scp: {}", stderr(&o));
    let o = served
        .tool("scp", &[])
        .arg(format!("{}:/tmp/up", served.dest))
        .arg(dir.path().join("back"))
        .output()
        .unwrap();
    assert!(o.status.success(), "scp back: {}", stderr(&o));
    assert!(std::fs::read(dir.path().join("back")).unwrap() == data);

    // As another user: its files are its own, and the guest's permissions hold.
    let batch = dir.path().join("batch");
    std::fs::write(
        &batch,
        format!(
            "put {up} /tmp/nobody-up\nmkdir /tmp/nobody-dir\nrename /tmp/nobody-up /tmp/nobody-dir/f\n\
             ln -s f /tmp/nobody-dir/link\nls -l /tmp/nobody-dir\ndf .\n-put {up} /root/denied\n",
            up = dir.path().join("up").display()
        ),
    )
    .unwrap();
    let nobody = "nobody@127.0.0.1".to_string();
    let o = served
        .tool("sftp", &[])
        .arg("-b")
        .arg(&batch)
        .arg(&nobody)
        .output()
        .unwrap();
    assert!(o.status.success(), "sftp: {}", stderr(&o));
    assert!(stdout(&o).contains("3145728"), "{}", stdout(&o));
    assert!(stdout(&o).contains("nobody"), "{}", stdout(&o));
    assert!(stderr(&o).contains("ermission denied"), "{}", stderr(&o));
    let o = sb.exec(&[
        "sh",
        "-c",
        "stat -c '%u %s' /tmp/nobody-dir/f; readlink /tmp/nobody-dir/link; test -e /root/denied || echo none",
    ]);
    assert_eq!(stdout(&o), "65534 3145728\nf\nnone\n", "{}", stderr(&o));

    // ssh -R: a listener on the sandbox's loopback, back to a server on the host.
    let echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let echo_port = echo.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in echo.incoming() {
            let Ok(mut c) = conn else { continue };
            let mut line = String::new();
            let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(&c), &mut line);
            let _ = c.write_all(format!("host saw {line}").as_bytes());
        }
    });
    let fwd = served
        .tool("ssh", &[])
        .args([
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            &format!("9100:127.0.0.1:{echo_port}"),
            &served.dest,
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _fwd = scopeguard(fwd);
    let mut last = String::new();
    assert!(
        wait_until(Duration::from_secs(30), || {
            let o = sb.exec(&["sh", "-c", "echo from-guest | nc 127.0.0.1 9100"]);
            last = format!("{}{}", stdout(&o), stderr(&o));
            stdout(&o) == "host saw from-guest\n"
        }),
        "{last}"
    );
    // Ports below 1024 are root's, as with sshd.
    let o = served
        .tool("ssh", &[])
        .args([
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            &format!("80:127.0.0.1:{echo_port}"),
            &nobody,
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(255), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("remote port forwarding failed"),
        "{}",
        stderr(&o)
    );
}

/// Kills the child on drop, so a failing assertion leaves no ssh behind.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn scopeguard(c: Child) -> Guard {
    Guard(c)
}

/// A real sshd on 127.0.0.1 that only `dir/user_key` opens (for root), with a bare repository
/// `dir/srv/repo.git`; killed on drop.
struct GitServer {
    dir: tempfile::TempDir,
    sshd: Child,
    port: u16,
}

impl Drop for GitServer {
    fn drop(&mut self) {
        let _ = self.sshd.kill();
        let _ = self.sshd.wait();
    }
}

fn sh_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", stderr(&out));
}

impl GitServer {
    fn start() -> GitServer {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for k in ["host_key", "user_key"] {
            sh_ok(
                Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                    .arg(d.join(k)),
            );
        }
        std::fs::copy(d.join("user_key.pub"), d.join("authorized_keys")).unwrap();
        let port = free_port();
        std::fs::write(
            d.join("sshd_config"),
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {0}/host_key\n\
                 AuthorizedKeysFile {0}/authorized_keys\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n\
                 UsePAM no\nStrictModes no\nPidFile none\n",
                d.display()
            ),
        )
        .unwrap();
        std::fs::create_dir_all("/run/sshd").unwrap();
        let sshd = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stderr(Stdio::null())
            .spawn()
            .expect("/usr/sbin/sshd (apt-get install openssh-server)");
        assert!(wait_until(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        }));
        let git = |args: &[&str], cwd: &std::path::Path| {
            sh_ok(
                Command::new("git")
                    .args([
                        "-c",
                        "user.email=t@test",
                        "-c",
                        "user.name=t",
                        "-c",
                        "init.defaultBranch=main",
                    ])
                    .args(args)
                    .current_dir(cwd),
            )
        };
        std::fs::create_dir(d.join("work")).unwrap();
        git(&["init", "-q"], &d.join("work"));
        std::fs::write(d.join("work/README"), "cloned through the host\n").unwrap();
        git(&["add", "README"], &d.join("work"));
        git(&["commit", "-q", "-m", "first"], &d.join("work"));
        std::fs::create_dir(d.join("srv")).unwrap();
        git(
            &["clone", "-q", "--bare", "../work", "repo.git"],
            &d.join("srv"),
        );
        let pubkey = std::fs::read_to_string(d.join("host_key.pub")).unwrap();
        std::fs::write(d.join("known_hosts"), format!("[git.test]:{port} {pubkey}")).unwrap();
        GitServer { dir, sshd, port }
    }

    fn path(&self, p: &str) -> String {
        self.dir.path().join(p).display().to_string()
    }
}

#[test]
fn git_clone_over_ssh_from_the_guest_with_the_hosts_key() {
    let git = GitServer::start();
    let allow = format!("git.test:{}", git.port);
    let rule = format!("allow:git-upload-pack '{}/*.git'", git.path("srv"));
    let (known_hosts, key) = (git.path("known_hosts"), git.path("user_key"));
    let events = git.path("events.jsonl");
    let sb = Sandbox::detached_from(
        python_image(),
        &[
            "--event-log",
            &events,
            "--add-host",
            "git.test:127.0.0.1",
            "--allow-private-host",
            "127.0.0.1",
            "--ssh-allow",
            &allow,
            "--ssh-known-hosts",
            &known_hosts,
            "--ssh-key",
            &key,
            "--ssh-exec",
            &rule,
        ],
        &["sleep", "100000"],
    );
    // The key never enters the guest; its ssh has none, and trusts the egress proxy's key.
    let url = format!(
        "ssh://root@git.test:{}{}/repo.git",
        git.port,
        git.path("srv")
    );
    let o = sb.exec(&[
        "sh",
        "-c",
        &format!(
            "GIT_SSH_COMMAND='ssh -o BatchMode=yes' git clone -q {url} /tmp/c && cat /tmp/c/README"
        ),
    ]);
    assert_eq!(stdout(&o), "cloned through the host\n", "{}", stderr(&o));
    let o = sb.exec(&[
        "sh",
        "-c",
        "ls /root/.ssh 2>/dev/null; grep -rl PRIVATE /etc /root 2>/dev/null; true",
    ]);
    assert!(!stdout(&o).contains("PRIVATE"), "{}", stdout(&o));
    // A push is no allowed command: refused, with the reason.
    let o = sb.exec(&[
        "sh",
        "-c",
        "cd /tmp/c && GIT_SSH_COMMAND='ssh -o BatchMode=yes' git push -q origin HEAD:refs/heads/other",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("no exec rule allows it"),
        "{}",
        stderr(&o)
    );
}
