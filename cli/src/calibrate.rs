//! `tandem calibrate`: the options checked and the output path tried before
//! the model loads, then the calibration, its table and its policy file.

use anyhow::Result;
use tandem_bench::calibrate::pairs::parse_pairs;
use tandem_bench::calibrate::policy_file::{check_writable, write_atomically};
use tandem_bench::calibrate::{calibrate, check_options, CalibrateOptions, Objective};
use tandem_gpu::DenseDevice;
use tandem_runtime::policy::PolicyConfig;
use tandem_runtime::{resolve_model_path, Engine, EngineOptions};

use crate::device::{run_on, DeviceTask};
use crate::{threads_or_cores, CalibrateArgs};

/// Runs `tandem calibrate` on the device `args` selects.
pub fn run(args: &CalibrateArgs) -> Result<()> {
    let threads = threads_or_cores(args.threads, "--threads");
    let opts = CalibrateOptions {
        text: args.text.clone(),
        context: args.context,
        queries: args.queries,
        recall: args.recall.unwrap_or(args.queries / 2),
        budget_bits: args.budget_bits,
        pairs: parse_pairs(&args.pairs)?,
        int2_heads: match args.int2_heads.as_slice() {
            [0] => Vec::new(),
            counts => counts.to_vec(),
        },
        base: PolicyConfig {
            policy: args.policy.clone(),
            dense_layers: args.dense_layers.clone(),
            sinks: args.sinks,
            window: args.window,
            dense_below: args.dense_below,
            ..PolicyConfig::default()
        },
        seed: args.seed,
        threads,
        objective: Objective::parse(&args.objective)
            .ok_or_else(|| anyhow::anyhow!("unknown objective {:?}", args.objective))?,
    };
    check_options(&opts)?;
    check_writable(&args.out)?;
    run_on(args.device, threads, Calibrate { args, opts })
}

struct Calibrate<'a> {
    args: &'a CalibrateArgs,
    opts: CalibrateOptions,
}

impl DeviceTask for Calibrate<'_> {
    fn run<D: DenseDevice + 'static>(self, device: D) -> Result<()> {
        let path = resolve_model_path(self.args.model.as_deref());
        let options = EngineOptions {
            threads: self.opts.threads,
            cpu_workers: self.opts.threads,
            memory_limit: self.args.memory_limit,
            policy: PolicyConfig {
                policy: "dense".into(),
                ..PolicyConfig::default()
            },
            ..EngineOptions::default()
        };
        let engine = Engine::load_on(&path, device, &options)?;
        let start = std::time::Instant::now();
        let calibration = calibrate(&self.opts, &engine, &mut |line| eprintln!("tandem: {line}"))?;
        print!("{}", calibration.table());
        write_atomically(&self.args.out, &calibration.to_toml())?;
        eprintln!(
            "tandem: wrote {} in {:.0} s (load it with --policy-file)",
            self.args.out.display(),
            start.elapsed().as_secs_f64()
        );
        Ok(())
    }
}
