//! `ds4 logits` (being written).

#[derive(clap::Args)]
pub struct LogitsArgs {}

pub fn run(_args: LogitsArgs) -> anyhow::Result<()> {
    anyhow::bail!("'logits' is not available yet in this build")
}
