//! pacsgate command line: subcommands and logging setup.
#![forbid(unsafe_code)]
fn main() {}
