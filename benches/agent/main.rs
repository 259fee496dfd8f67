//! Whole-system benchmarks of gryt-agent (issue 7), as a program: `cargo bench --bench agent`.
//!
//! Every figure is measured next to a baseline in the same run and reported as a ratio, because
//! the machines this runs on are shared and noisy: absolute times are context only. See
//! `docs/benchmarks.md` for what each figure means and the last results.
//!
//! ```text
//! cargo build --release && cargo bench --bench agent             # full size (minutes)
//! cargo bench --profile dev --bench agent -- --quick             # CI: small sizes, debug build
//! cargo bench --bench agent -- --only pickup --j 300             # one figure, own size
//! ```
//!
//! The `store` figure also needs an object store: `GRYT_STORE_URL` and the other `[store]`
//! settings, else the loopback test store `tests/store/garage.sh start` runs.
//!
//! Needs a Docker engine, `/bin/busybox` (Debian's busybox-static: the job image is built from
//! it, like the tests do, since no registry may be reachable) and the `docker` CLI for the
//! `docker run --rm` baseline. The fake API here is a small one of its own, not the conformance
//! fake of `tests/it/fake_api.rs`: that one polls its queue every 50 ms (which would be
//! measured as pickup latency) and keeps every request body (gigabytes for the log figure).

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bollard::Docker;
use bollard::container::LogOutput;
use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder,
};
use futures_util::StreamExt;
use gryt_agent::config::{PullPolicy, Settings};
use gryt_agent::executor::container::hardened_host_config;
use gryt_agent::executor::{Discard, Executor, ExecutorSettings, JobControl};
use serde_json::{Value, json};

/// The job image, built as the tests build theirs (the same file).
#[path = "../../tests/it/support/image.rs"]
mod image;

const KEY: &str = "bench-agent-key-0123456789abcdef0123";
/// Label on every container the bench itself creates (the agents label theirs by agent id).
const BENCH_LABEL: &str = "io.gryt.bench";
const MIB: u64 = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
mod agent_bin;
mod baseline;
mod fake_api;
mod figures;
mod footprint;
mod network_cost;
mod options;
mod report;
mod services;
mod store;
mod warm;

use agent_bin::*;
use baseline::*;
use fake_api::*;
use figures::*;
use footprint::*;
use options::*;
use report::*;
use store::*;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("benchmark failed: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let opts = parse_args()?;
    // Before anything else: without a store the run would fail only at the end.
    let store = match opts.wants("store") {
        true => Some(bench_store(&opts.store_env).await?),
        false => None,
    };
    let docker = gryt_agent::executor::connect(None)?
        .negotiate_version()
        .await
        .context("the Docker engine does not answer")?;
    let image = image::import(&docker).await.map_err(anyhow::Error::msg)?;
    let agent = AgentBinary::find(opts.agent.clone())?;
    let hard = Hardening::new(&image, &opts.network)?;
    let header = machine_info(&docker, &agent, &opts).await;
    eprintln!("{}", header.join("\n"));
    let mut bench = Bench {
        docker,
        hard,
        agent,
        work: tempfile::Builder::new().prefix("gryt-bench-").tempdir()?,
        sizes: opts.sizes.clone(),
        agent_ids: Vec::new(),
        store,
    };
    let mut rows = Vec::new();
    let total = Instant::now();
    for figure in FIGURES {
        if !opts.wants(figure) {
            continue;
        }
        eprintln!("running: {figure}");
        let clock = Instant::now();
        let figure_rows = match figure {
            "overhead" => bench.overhead().await,
            "throughput" => bench.throughput().await,
            "pickup" => bench.pickup().await,
            "store" => bench.store().await,
            "network" => bench.job_network().await,
            "services" => bench.services().await,
            "warm" => bench.warm().await,
            _ => bench.footprint().await,
        }
        .with_context(|| format!("figure `{figure}`"))?;
        eprintln!("  done in {:.1} s", clock.elapsed().as_secs_f64());
        rows.extend(figure_rows);
    }
    let left = bench.leftovers().await;

    println!("## gryt-agent benchmark\n");
    println!("{}", header.join("\n"));
    println!("- total time: {:.0} s\n", total.elapsed().as_secs_f64());
    println!("| figure | value | baseline | ratio | target | met |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "",
        };
        println!(
            "| {} | {} | {} | {} | {} | {met} |",
            r.figure, r.value, r.baseline, r.ratio, r.target
        );
    }
    if left > 0 {
        bail!("{left} container(s) of this run are left behind");
    }
    Ok(())
}
