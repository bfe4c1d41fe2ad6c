//! Matrix products of the CPU device.

use std::sync::Mutex;

use tandem_kernels::parallel::ThreadPool;
use tandem_kernels::quant::QuantizedVector;
use tandem_kernels::vector::{dot_bf16_f32, dot_f32};

use super::job_failed;
use crate::error::DeviceError;
use crate::host::HostMatrix;

/// `ys[t] = W · xs[t]` for every token, rows split over the pool's threads.
pub(super) fn matmul(
    pool: &ThreadPool,
    w: &HostMatrix,
    xs: &[f32],
    ys: &mut [f32],
) -> Result<(), DeviceError> {
    let (rows, cols) = w.shape();
    if !xs.len().is_multiple_of(cols) || ys.len() != xs.len() / cols * rows {
        return Err(DeviceError::Shape(format!(
            "matmul of a {rows}x{cols} matrix with {} inputs into {} outputs",
            xs.len(),
            ys.len()
        )));
    }
    let bounds = even_bounds(rows, pool.threads(), 16);
    let parts = split_rows(ys, rows, &bounds);
    match w {
        HostMatrix::Affine(m) => {
            let quantized: Vec<QuantizedVector> = xs
                .chunks_exact(cols)
                .map(QuantizedVector::from_f32)
                .collect();
            pool.run(&|i| {
                let mut outs = parts[i].lock().unwrap_or_else(|e| e.into_inner());
                if bounds[i] < bounds[i + 1] {
                    m.matmul(&quantized, bounds[i]..bounds[i + 1], &mut outs);
                }
            })
            .map_err(job_failed)
        }
        HostMatrix::F32 { data, .. } => dense_rows(pool, &parts, &bounds, xs, cols, &|r, x| {
            dot_f32(&data[r * cols..(r + 1) * cols], x)
        }),
        HostMatrix::Bf16 { data, .. } => dense_rows(pool, &parts, &bounds, xs, cols, &|r, x| {
            dot_bf16_f32(&data[r * cols..(r + 1) * cols], x)
        }),
    }
}

/// Splits each token's output row into one piece per thread, the pieces of thread
/// `i` covering rows `bounds[i]..bounds[i+1]` of every token.
fn split_rows<'a>(
    ys: &'a mut [f32],
    rows: usize,
    bounds: &[usize],
) -> Vec<Mutex<Vec<&'a mut [f32]>>> {
    let parts = bounds.len() - 1;
    let mut per_thread: Vec<Vec<&mut [f32]>> = (0..parts).map(|_| Vec::new()).collect();
    for mut token_row in ys.chunks_exact_mut(rows) {
        for i in 0..parts {
            let (head, tail) = token_row.split_at_mut(bounds[i + 1] - bounds[i]);
            per_thread[i].push(head);
            token_row = tail;
        }
    }
    per_thread.into_iter().map(Mutex::new).collect()
}

pub(super) fn even_bounds(n: usize, parts: usize, align: usize) -> Vec<usize> {
    let units = n.div_ceil(align);
    (0..=parts)
        .map(|i| (units * i / parts * align).min(n))
        .collect()
}

/// One thread's pieces of the output rows (see [`split_rows`]).
type RowParts<'a> = [Mutex<Vec<&'a mut [f32]>>];

/// Unquantized matmul: thread `i` computes rows `bounds[i]..bounds[i+1]` of every
/// token with `row_dot(row, x)`.
fn dense_rows(
    pool: &ThreadPool,
    parts: &RowParts<'_>,
    bounds: &[usize],
    xs: &[f32],
    cols: usize,
    row_dot: &(dyn Fn(usize, &[f32]) -> f32 + Sync),
) -> Result<(), DeviceError> {
    pool.run(&|i| {
        let mut outs = parts[i].lock().unwrap_or_else(|e| e.into_inner());
        for (x, out) in xs.chunks_exact(cols).zip(outs.iter_mut()) {
            for (o, r) in out.iter_mut().zip(bounds[i]..bounds[i + 1]) {
                *o = row_dot(r, x);
            }
        }
    })
    .map_err(job_failed)
}
