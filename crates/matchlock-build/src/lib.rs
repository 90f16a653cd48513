//! `matchlock build`: images from a Dockerfile, built in Matchlock's own sandboxes (DESIGN D13).
//!
//! - [`dockerfile`] parses the file into instructions with their line numbers, keeping words raw
//!   (quotes and variables as written), as BuildKit's parser does.
//! - [`words`] splits and expands those raw words the way BuildKit's shell lexer does: quotes,
//!   the escape character, `$VAR`, `${VAR}` and the `${VAR:-…}` family.
//! - [`fetch`] is `ADD https://…`: the host's fetch, under the build's network policy.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod builder;
pub mod copy;
pub mod dockerfile;
pub mod fetch;
pub mod plan;
pub mod stage;
pub mod words;
