//! Docker's rules for turning an image config plus user flags into the process to run.

use crate::{ImageConfig, ImageError};

/// The `PATH` a container gets when its image sets none (Docker's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The argv to run, with Docker semantics.
///
/// * `entrypoint_override`: `None` keeps the image's ENTRYPOINT; `Some(argv)` replaces it (an
///   empty one clears it; `docker run --entrypoint X` is `Some(["X"])`).
/// * `args`: when non-empty they replace the image's CMD.
/// * Any entrypoint override also drops the image's CMD, because Docker resets CMD when
///   `--entrypoint` is given; only `args` follow an overridden entrypoint.
///
/// Fails with [`ImageError::NoCommand`] if the result is empty.
pub fn compose_command(
    cfg: &ImageConfig,
    entrypoint_override: Option<&[String]>,
    args: &[String],
) -> Result<Vec<String>, ImageError> {
    let entrypoint = match entrypoint_override {
        None => cfg.entrypoint.clone().unwrap_or_default(),
        Some(argv) => argv.to_vec(),
    };
    let cmd = if !args.is_empty() {
        args.to_vec()
    } else if entrypoint_override.is_some() {
        Vec::new()
    } else {
        cfg.cmd.clone().unwrap_or_default()
    };
    let mut argv = entrypoint;
    argv.extend(cmd);
    if argv.is_empty() {
        return Err(ImageError::NoCommand);
    }
    Ok(argv)
}

/// Merge the image environment with the user's.
///
/// Image entries come first in image order, then user entries; a later entry for the same key
/// replaces the earlier value but keeps its position. `PATH` is [`DEFAULT_PATH`] when the image
/// sets none (the user may still override it). Image entries without `=` or with an empty key are
/// dropped because they cannot be passed to `execve` meaningfully.
pub fn merge_env(image_env: &[String], user: &[(String, String)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let set = |out: &mut Vec<(String, String)>, k: &str, v: &str| match out
        .iter_mut()
        .find(|(key, _)| key == k)
    {
        Some(slot) => slot.1 = v.to_string(),
        None => out.push((k.to_string(), v.to_string())),
    };
    for entry in image_env {
        if let Some((k, v)) = entry.split_once('=') {
            if !k.is_empty() {
                set(&mut out, k, v);
            }
        }
    }
    if !out.iter().any(|(k, _)| k == "PATH") {
        out.insert(0, ("PATH".to_string(), DEFAULT_PATH.to_string()));
    }
    for (k, v) in user {
        if !k.is_empty() {
            set(&mut out, k, v);
        }
    }
    out
}
