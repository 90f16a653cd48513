//! Progress reporting for pulls: a small event trait the store calls, and a ready-made reporter
//! for terminals ([`StderrProgress`]: indicatif bars when stderr is a TTY, one-line messages
//! otherwise, so logs and CI output stay readable).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Something that happened during a pull. Digests are `sha256:<hex>`.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum PullEvent<'a> {
    /// The registry is being asked for the image (authentication, then the manifest).
    Contacting {
        /// The registry host.
        registry: &'a str,
        /// The normalised reference.
        reference: &'a str,
    },
    /// The manifest was resolved: the image's config digest, its layer count and their total
    /// compressed size.
    Resolved {
        /// The normalised reference.
        reference: &'a str,
        /// The manifest digest.
        manifest: &'a str,
        /// Number of layers.
        layers: usize,
        /// Sum of the layer sizes (compressed).
        bytes: u64,
    },
    /// The image's root file system is already in the store; no layer is needed.
    UpToDate,
    /// A layer download starts (`resumed_at` > 0 when continuing a partial download).
    LayerStart {
        /// Layer digest.
        digest: &'a str,
        /// Its size in bytes.
        size: u64,
        /// Bytes already on disk from an interrupted pull.
        resumed_at: u64,
    },
    /// More bytes of a layer arrived.
    LayerProgress {
        /// Layer digest.
        digest: &'a str,
        /// Bytes received so far in total.
        done: u64,
    },
    /// A layer is available: downloaded and verified, or found (and verified) in the cache.
    LayerDone {
        /// Layer digest.
        digest: &'a str,
        /// Whether it came from the cache.
        cached: bool,
    },
    /// A cached blob failed verification and will be downloaded again.
    CorruptCacheEntry {
        /// Blob digest.
        digest: &'a str,
    },
    /// All layers are applied; the ext4 image is being built.
    Building,
}

/// Receives [`PullEvent`]s. Called from the pulling thread; implementations must be cheap.
pub trait PullProgress: Sync {
    /// One event.
    fn event(&self, event: PullEvent<'_>);
}

/// Discards every event.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl PullProgress for NoProgress {
    fn event(&self, _: PullEvent<'_>) {}
}

/// Reports to stderr: progress bars on a terminal, plain one-line messages otherwise.
pub struct StderrProgress {
    bars: Option<MultiProgress>,
    state: Mutex<HashMap<String, ProgressBar>>,
}

impl std::fmt::Debug for StderrProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StderrProgress")
            .field("tty", &self.bars.is_some())
            .finish()
    }
}

impl Default for StderrProgress {
    fn default() -> Self {
        Self::new()
    }
}

fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

impl StderrProgress {
    /// Bars when stderr is a terminal, lines otherwise.
    pub fn new() -> StderrProgress {
        let bars = std::io::stderr()
            .is_terminal()
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        StderrProgress {
            bars,
            state: Mutex::new(HashMap::new()),
        }
    }

    fn line(&self, msg: String) {
        match &self.bars {
            Some(m) => {
                let _ = m.println(msg);
            }
            None => eprintln!("{msg}"),
        }
    }
}

impl PullProgress for StderrProgress {
    fn event(&self, event: PullEvent<'_>) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match event {
            PullEvent::Contacting {
                registry,
                reference,
            } => self.line(format!("asking {registry} for {reference}...")),
            PullEvent::Resolved {
                reference,
                manifest,
                layers,
                bytes,
            } => self.line(format!(
                "pulling {reference} (manifest {}): {layers} layer(s), {}",
                short(manifest),
                mb(bytes)
            )),
            PullEvent::UpToDate => self.line("root file system already in the store".into()),
            PullEvent::LayerStart {
                digest,
                size,
                resumed_at,
            } => match &self.bars {
                Some(m) => {
                    let bar = m.add(ProgressBar::new(size));
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    );
                    bar.set_prefix(short(digest).to_string());
                    bar.set_position(resumed_at);
                    state.insert(digest.to_string(), bar);
                }
                None if resumed_at > 0 => self.line(format!(
                    "layer {}: resuming at {} of {}",
                    short(digest),
                    mb(resumed_at),
                    mb(size)
                )),
                None => self.line(format!("layer {}: downloading {}", short(digest), mb(size))),
            },
            PullEvent::LayerProgress { digest, done } => {
                if let Some(bar) = state.get(digest) {
                    bar.set_position(done);
                }
            }
            PullEvent::LayerDone { digest, cached } => {
                if let Some(bar) = state.remove(digest) {
                    bar.finish_and_clear();
                }
                let how = if cached { "cached" } else { "done" };
                self.line(format!("layer {}: {how}", short(digest)));
            }
            PullEvent::CorruptCacheEntry { digest } => self.line(format!(
                "cached blob {} is corrupt; downloading it again",
                short(digest)
            )),
            PullEvent::Building => self.line("building the root file system".into()),
        }
    }
}
