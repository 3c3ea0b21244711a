//! `cargo xtask <task>`: project automation.
//!
//! Tasks land with the issues that need them; asking for one that has not landed is an error
//! that says so, never a silent success.

use anyhow::{Result, bail};

const TASKS: &[(&str, &str)] = &[
    (
        "train",
        "fetch data → pretrain experts → train the joint model → evaluate (not implemented yet)",
    ),
    (
        "fetch-data",
        "download and verify the corpora into $CHORUS_CACHE (not implemented yet)",
    ),
];

fn main() -> Result<()> {
    let task = std::env::args().nth(1);
    match task.as_deref() {
        None | Some("help" | "--help" | "-h") => {
            println!("usage: cargo xtask <task>\n\ntasks:");
            for (name, what) in TASKS {
                println!("  {name:<12} {what}");
            }
            Ok(())
        }
        Some(name) if TASKS.iter().any(|(n, _)| *n == name) => {
            bail!("`cargo xtask {name}` is not implemented yet: it arrives with the training issue")
        }
        Some(other) => bail!("unknown task `{other}`; run `cargo xtask help`"),
    }
}
