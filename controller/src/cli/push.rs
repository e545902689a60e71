//! `stagehand push APP VERSION PATH`.

use super::Ctx;
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use stagehand_common::manifest::{self, ChunkSource};
use stagehand_common::protocol::{AdminRequest, AdminResponse};
use stagehand_common::Digest;
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

/// Bytes per upload batch, and batches in flight.
const BATCH_BYTES: usize = 16 << 20;
const PARALLEL: usize = 4;

#[derive(Args, Debug)]
pub struct PushArgs {
    /// The app's name (letters, digits, `.`, `_`, `-`).
    #[arg(value_parser = super::app_name)]
    pub app: String,
    /// The version's name; a version once pushed never changes.
    #[arg(id = "artifact_version", value_name = "VERSION", value_parser = super::version_name)]
    pub version: String,
    /// A file or a directory.
    pub path: PathBuf,
}

pub async fn run(a: PushArgs, ctx: &Ctx) -> Result<i32> {
    let client = ctx.client().await?;
    let pushed = upload(&client, &a.app, &a.version, &a.path).await?;
    client.close().await;
    print(ctx, &a, &pushed);
    Ok(0)
}

/// What a push did.
pub struct Pushed {
    pub digest: Digest,
    pub size: u64,
    pub uploaded_chunks: usize,
    pub already_present: bool,
}

/// Chunks a tree, offers its manifest and uploads only the chunks the controller lacks.
pub async fn upload(
    client: &crate::client::Client,
    app: &str,
    version: &str,
    path: &std::path::Path,
) -> Result<Pushed> {
    // What the agents would refuse at activation is refused now.
    match std::fs::read_to_string(path.join("stagehand.toml")) {
        Ok(text) => {
            stagehand_agent::hooks::ArtifactConfig::parse(&text).map_err(|e| {
                crate::client::OpError::new(
                    format!("{}: {e}", path.display()),
                    "fix stagehand.toml (docs/stagehand-toml.md lists every field), then push again",
                )
            })?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound || e.kind() == std::io::ErrorKind::NotADirectory => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.join("stagehand.toml").display())),
    }
    let owned = path.to_path_buf();
    let (manifest, sources) = tokio::task::spawn_blocking(move || manifest::build(&owned))
        .await?
        .with_context(|| format!("reading {}", path.display()))?;
    let bytes = manifest.encode();
    let resp = client
        .call(&AdminRequest::PushBegin { app: app.to_string(), version: version.to_string(), manifest: bytes })
        .await?;
    let AdminResponse::PushNeed { digest, missing, already_present } = resp else {
        bail!("{}", super::unexpected(&resp))
    };
    if already_present {
        return Ok(Pushed { digest, size: manifest.total_size(), uploaded_chunks: 0, already_present: true });
    }
    let by_digest: HashMap<Digest, ChunkSource> = sources.into_iter().map(|s| (s.digest, s)).collect();
    let total: u64 = missing.iter().filter_map(|d| by_digest.get(d)).map(|s| u64::from(s.len)).sum();
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut batches: Vec<Vec<ChunkSource>> = vec![vec![]];
    let mut batch_bytes = 0usize;
    for d in &missing {
        let s = by_digest.get(d).with_context(|| format!("the controller asked for unknown chunk {}", d.short()))?;
        if batch_bytes >= BATCH_BYTES {
            batches.push(vec![]);
            batch_bytes = 0;
        }
        batch_bytes += s.len as usize;
        batches.last_mut().expect("never empty").push(s.clone());
    }
    let mut inflight = tokio::task::JoinSet::new();
    for batch in batches.into_iter().filter(|b| !b.is_empty()) {
        while inflight.len() >= PARALLEL {
            inflight.join_next().await.expect("not empty")??;
        }
        let (client, bar) = (client.clone(), bar.clone());
        inflight.spawn(async move {
            let n: u64 = batch.iter().map(|s| u64::from(s.len)).sum();
            let chunks = tokio::task::spawn_blocking(move || read_chunks(&batch)).await??;
            client.push_chunks(chunks).await?;
            bar.inc(n);
            anyhow::Ok(())
        });
    }
    while let Some(r) = inflight.join_next().await {
        r??;
    }
    bar.finish_and_clear();
    let resp =
        client.call(&AdminRequest::PushCommit { app: app.to_string(), version: version.to_string(), digest }).await?;
    let AdminResponse::Pushed { digest, size } = resp else { bail!("{}", super::unexpected(&resp)) };
    Ok(Pushed { digest, size, uploaded_chunks: missing.len(), already_present: false })
}

/// Reads chunks back from the source, checking they did not change since they were hashed.
fn read_chunks(batch: &[ChunkSource]) -> Result<Vec<(Digest, Vec<u8>)>> {
    let mut out = Vec::with_capacity(batch.len());
    for s in batch {
        let mut f = std::fs::File::open(&s.path).with_context(|| format!("opening {}", s.path.display()))?;
        f.seek(SeekFrom::Start(s.offset))?;
        let mut buf = vec![0u8; s.len as usize];
        f.read_exact(&mut buf).with_context(|| format!("reading {}", s.path.display()))?;
        if Digest::of(&buf) != s.digest {
            bail!("{} changed while it was being pushed; push again once it is stable", s.path.display());
        }
        out.push((s.digest, buf));
    }
    Ok(out)
}

fn print(ctx: &Ctx, a: &PushArgs, p: &Pushed) {
    if ctx.json() {
        super::print_json(&serde_json::json!({
            "app": a.app, "version": a.version, "digest": p.digest.to_string(), "size": p.size,
            "uploaded_chunks": p.uploaded_chunks, "already_present": p.already_present,
        }));
        return;
    }
    outln!("{}", p.digest);
    if p.already_present {
        eprintln!("{} {} is already present with this content; nothing uploaded.", a.app, a.version);
    } else {
        eprintln!(
            "Pushed {} {} ({} bytes, {} new chunks). Next: stagehand deploy {} {} --env ENV --wait",
            a.app, a.version, p.size, p.uploaded_chunks, a.app, a.version
        );
    }
}
