//! Test harness for weft: `weft` processes driven the way users drive them, and LANs of
//! network namespaces for tests that need several hosts.
//!
//! - [`WeftProcess`] starts `weft run` on loopback (mDNS off, every port chosen by the
//!   OS, a fresh data directory), learns its peer id, listen addresses and API URL from
//!   its stdout, and wraps the `weft` client commands and the HTTP API.
//! - [`netns::Lan`] builds hosts on a bridge and runs nodes in them with mDNS on.
//! - [`wait_until`] is the one way to wait for something that happens eventually.
//!
//! Every wait is bounded; a failing test prints the log tail of every node it started.
//! The `weft` binary is found next to the test executable (see [`weft_binary`]).

mod binary;
mod cli;
pub mod in_process;
pub mod netns;
mod process;
mod wait;

pub use binary::weft_binary;
pub use cli::{run_cli, CliOutput, CLI_TIMEOUT};
pub use process::{
    parse_event_id, Appended, HttpReply, WeftBuilder, WeftProcess, DEFAULT_SPACE, HTTP_TIMEOUT,
    STARTUP_TIMEOUT, STOP_TIMEOUT,
};
pub use wait::wait_until;
