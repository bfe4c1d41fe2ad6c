//! A forward pass stopped between layers takes its rows back.

use std::cell::Cell;

use tandem_gpu::CpuDevice;

use super::{Config, Llama, Logits};
use crate::error::Error;

fn model() -> Llama<CpuDevice> {
    let config = Config::llama(4, 64, 128, 4, 2, 96, 10_000.0, 512);
    Llama::synthetic(config, CpuDevice::new(1), 7).expect("synthetic model")
}

#[test]
fn a_step_stopped_between_layers_is_undone() {
    let model = model();
    let (first, rest) = ([1u32, 5, 9, 13, 17], [21u32, 25, 29]);
    let mut kv = model.new_cache().expect("cache");
    model
        .forward(&first, &mut kv, Logits::Last)
        .expect("forward");
    let held = kv.device_rows();

    let asked = Cell::new(0);
    let stop_at_third_layer = || {
        asked.set(asked.get() + 1);
        asked.get() > 2
    };
    let stopped = model.forward_until(&rest, &mut kv, Logits::Last, &stop_at_third_layer);
    assert!(matches!(stopped, Err(Error::Cancelled)), "{stopped:?}");
    assert_eq!(kv.positions(), first.len());
    assert_eq!(kv.device_rows(), held);
    assert!(kv.check_usable().is_ok());

    let resumed = model.forward(&rest, &mut kv, Logits::Last).expect("resume");
    let mut fresh = model.new_cache().expect("cache");
    let all: Vec<u32> = first.iter().chain(&rest).copied().collect();
    let expected = model
        .forward(&all, &mut fresh, Logits::Last)
        .expect("forward");
    let worst = resumed
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-3, "logits differ by {worst}");
}
