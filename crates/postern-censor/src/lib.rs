//! The censor lab: a reproducible model of the censor Postern's users face (see
//! `docs/censor-lab.md`), as a test harness.
//!
//! - [`topology`]: network namespaces (client, censor router, foreign hosting, domestic)
//!   made and torn down by the caller, nothing routed out of them.
//! - [`engine`]: the censor's decisions, packet by packet, with its modules.
//! - [`hello`]: the ClientHello and JA4, read after TCP reassembly.
//! - [`profile`]: which modules run, as TOML.
//! - [`prober`]: the active prober.
//! - [`daemon`]: the engine on NFQUEUE inside the censor namespace.
//! - [`dns`]: the national resolver.
//! - [`controls`]: the programs the lab must block or let through.

pub mod controls;
pub mod daemon;
pub mod dns;
pub mod engine;
pub mod hello;
pub mod prober;
pub mod profile;
pub mod topology;
