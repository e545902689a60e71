//! `stagehand dev`: a local fleet on loopback with no set-up.

use super::Ctx;
use anyhow::Result;
use clap::Args;

#[derive(Args, Debug)]
pub struct DevArgs {}

pub async fn run(_a: DevArgs, _ctx: &Ctx) -> Result<i32> {
    anyhow::bail!("not yet")
}
