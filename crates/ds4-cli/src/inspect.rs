//! `ds4 inspect` (being written).

#[derive(clap::Args)]
pub struct InspectArgs {}

pub fn run(_args: InspectArgs) -> anyhow::Result<()> {
    anyhow::bail!("'inspect' is not available yet in this build")
}
