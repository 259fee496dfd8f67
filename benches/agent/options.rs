//! Command-line options of the benchmark: which figures, at which sizes, against which agent.

use super::*;

#[derive(Debug, Clone)]
pub(crate) struct Sizes {
    /// Jobs per variant for the per-job overhead.
    pub(crate) m: usize,
    /// Jobs for the throughput figure.
    pub(crate) k: usize,
    /// Jobs for the pickup latency.
    pub(crate) j: usize,
    /// Seconds of idle footprint.
    pub(crate) s: u64,
    /// Bytes printed by the log job.
    pub(crate) g: u64,
    /// Bytes of the artifact file (above the store's part size).
    pub(crate) a: u64,
    /// Files in the cache of many small files.
    pub(crate) c: usize,
    /// Rounds of the warm-start figure (per job, each variant once) and its refills.
    pub(crate) w: usize,
}

pub(crate) struct Opts {
    pub(crate) quick: bool,
    pub(crate) sizes: Sizes,
    pub(crate) only: Option<String>,
    pub(crate) agent: Option<PathBuf>,
    pub(crate) network: String,
    /// The loopback test store's connection file, when no `GRYT_STORE_URL` is set.
    pub(crate) store_env: PathBuf,
}

pub(crate) const FIGURES: [&str; 8] = [
    "overhead",
    "throughput",
    "pickup",
    "footprint",
    "store",
    "network",
    "services",
    "warm",
];

pub(crate) fn parse_args() -> anyhow::Result<Opts> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` appends `--bench` to a harness-less bench's arguments.
    args.retain(|a| a != "--bench");
    let quick = args.iter().any(|a| a == "--quick");
    let mut sizes = if quick {
        Sizes {
            m: 5,
            k: 12,
            j: 10,
            s: 3,
            g: 32 * MIB,
            a: 20 * MIB,
            c: 256,
            w: 2,
        }
    } else {
        Sizes {
            m: 50,
            k: 200,
            j: 100,
            s: 60,
            g: 1024 * MIB,
            a: 256 * MIB,
            c: 4096,
            w: 30,
        }
    };
    let mut opts = Opts {
        quick,
        sizes: sizes.clone(),
        only: None,
        agent: None,
        network: std::env::var("GRYT_NETWORK").unwrap_or_else(|_| "bridge".into()),
        store_env: std::env::var_os("GRYT_TEST_STORE_FILE")
            .map(PathBuf::from)
            .unwrap_or_else(|| "/tmp/gryt-test-garage/store.env".into()),
    };
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        let number = |v: String| -> anyhow::Result<u64> {
            v.parse().with_context(|| format!("not a number: {v}"))
        };
        match arg.as_str() {
            "--quick" => {}
            "--only" => {
                let v = value("--only")?;
                if !FIGURES.contains(&v.as_str()) {
                    bail!("--only takes one of {FIGURES:?}");
                }
                opts.only = Some(v);
            }
            "--agent" => opts.agent = Some(value("--agent")?.into()),
            "--network" => opts.network = value("--network")?,
            "--m" => sizes.m = number(value("--m")?)? as usize,
            "--k" => sizes.k = number(value("--k")?)? as usize,
            "--j" => sizes.j = number(value("--j")?)? as usize,
            "--s" => sizes.s = number(value("--s")?)?,
            "--g-mib" => sizes.g = number(value("--g-mib")?)? * MIB,
            "--a-mib" => sizes.a = number(value("--a-mib")?)? * MIB,
            "--c" => sizes.c = number(value("--c")?)? as usize,
            "--w" => sizes.w = number(value("--w")?)? as usize,
            "--store-env" => opts.store_env = value("--store-env")?.into(),
            "-h" | "--help" => {
                println!(
                    "usage: cargo bench --bench agent -- [--quick] [--only {}] [--agent PATH] \
                     [--network bridge|none] [--m N] [--k N] [--j N] [--s SECS] [--g-mib MIB] \
                     [--a-mib MIB] [--c N] [--w N] [--store-env FILE]",
                    FIGURES.join("|")
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument `{other}` (try --help)"),
        }
    }
    sizes.m = sizes.m.max(1);
    sizes.k = sizes.k.max(4);
    sizes.j = sizes.j.max(1);
    sizes.g = (sizes.g / MIB).max(1) * MIB;
    sizes.a = sizes.a.clamp(MIB, 4096 * MIB);
    sizes.c = sizes.c.clamp(1, 100_000);
    sizes.w = sizes.w.clamp(1, 1000);
    opts.sizes = sizes;
    Ok(opts)
}

impl Opts {
    pub(crate) fn wants(&self, figure: &str) -> bool {
        self.only.as_deref().is_none_or(|o| o == figure)
    }
}

// ---------------------------------------------------------------------------------------------
