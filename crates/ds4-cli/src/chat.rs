//! `ds4 chat` (being written).

#[derive(clap::Args)]
pub struct ChatArgs {}

pub fn run(_args: ChatArgs) -> anyhow::Result<()> {
    anyhow::bail!("'chat' is not available yet in this build")
}
