//! `ds4 tokenize` (being written).

#[derive(clap::Args)]
pub struct TokenizeArgs {}

pub fn run(_args: TokenizeArgs) -> anyhow::Result<()> {
    anyhow::bail!("'tokenize' is not available yet in this build")
}
