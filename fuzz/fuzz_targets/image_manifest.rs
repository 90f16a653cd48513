//! Image references and the JSON documents of an image archive, as the image store reads them on
//! import (`matchlock_image::normalize_reference`, then `ImageStore::import`'s planning: the
//! `docker save` manifest, OCI `index.json` with nested indexes, platforms and name annotations,
//! OCI image manifests, and the image config with its runtime defaults and `diff_ids`).
//!
//! The first byte picks what the rest of the input is:
//!
//! - `0`: an image reference; a normalized reference must normalize to itself;
//! - `1`: a `docker save` `manifest.json`, next to a valid config (`config.json`, also as a
//!   blob) and layer (`layer.tar`, also as a blob);
//! - `2`: an OCI `index.json`, in a layout holding a manifest, its config and layer, and an index
//!   of that manifest (all named by digest; `make_corpus.py` computes them for the seeds);
//! - `3`: an OCI image manifest, stored as a blob that the harness's `index.json` names;
//! - `4`: an image config, in a `docker save` archive whose manifest names it.
//!
//! The harness's configs name a `diff_id` that is not the layer's, so a plan that succeeds still
//! unpacks the layer but stops before the (slow, external) ext4 build. Each import uses a fresh
//! store in a fenced temp directory that is removed afterwards.

#![no_main]

#[path = "common/image.rs"]
mod image;

use libfuzzer_sys::fuzz_target;
use matchlock_image::normalize_reference;

/// The layer every harness-built archive carries: an empty tar (two zero blocks), whose digest
/// the seeds can name.
fn layer() -> Vec<u8> {
    vec![0; 1024]
}

/// A config for [`layer`] whose diff_id does not match it (see the crate docs above).
fn config() -> Vec<u8> {
    image::config(&image::digest(b"not this layer"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, doc)) = data.split_first() else {
        return;
    };
    match mode % 5 {
        0 => {
            let Ok(s) = std::str::from_utf8(doc) else {
                return;
            };
            if let Ok(n) = normalize_reference(s) {
                assert_eq!(
                    normalize_reference(&n).ok().as_deref(),
                    Some(n.as_str()),
                    "{s:?} normalizes to {n:?}, which does not normalize to itself"
                );
            }
        }
        1 => {
            let archive = image::docker_archive(doc, &config(), &layer());
            let _ = image::fence().import(&archive);
        }
        2 => {
            let (config, layer) = (config(), layer());
            let manifest = image::oci_manifest(&config, &layer);
            let nested = image::oci_index(&manifest);
            let archive = image::oci_layout(doc, &[&manifest, &config, &layer, &nested]);
            let _ = image::fence().import(&archive);
        }
        3 => {
            let (config, layer) = (config(), layer());
            let index = image::oci_index(doc);
            let archive = image::oci_layout(&index, &[doc, &config, &layer]);
            let _ = image::fence().import(&archive);
        }
        _ => {
            let archive = image::docker_archive(&image::docker_manifest(), doc, &layer());
            let _ = image::fence().import(&archive);
        }
    }
});
