//! `ds4 convert` (being written).

#[derive(clap::Args)]
pub struct ConvertArgs {}

pub fn run(_args: ConvertArgs) -> anyhow::Result<()> {
    anyhow::bail!("'convert' is not available yet in this build")
}
