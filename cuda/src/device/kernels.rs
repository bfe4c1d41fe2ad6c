//! The compiled kernels and their launches.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DeviceRepr,
    LaunchConfig, PushKernelArg,
};

use crate::error::CudaError;
use crate::geometry::{Geometry, BLOCK};
use crate::sources::SOURCES;

// SAFETY: `Geometry` is `#[repr(C)]` plain data, laid out as the kernels'
// `struct Geometry`, and passed by value.
unsafe impl DeviceRepr for Geometry {}

/// Every kernel of [`SOURCES`], compiled for one GPU.
pub(crate) struct Kernels {
    functions: HashMap<&'static str, CudaFunction>,
}

/// A launch over `n` elements, one thread each.
fn elementwise(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A launch of one block of [`BLOCK`] threads per grid cell.
fn blocks(grid: (usize, usize, usize)) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0 as u32, grid.1 as u32, grid.2 as u32),
        block_dim: (BLOCK as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl Kernels {
    /// Compiles every source for `arch` and loads it into `ctx`.
    pub(crate) fn compile(ctx: &Arc<CudaContext>, arch: &'static str) -> Result<Self, CudaError> {
        let mut functions = HashMap::new();
        for source in SOURCES {
            let module = ctx.load_module(source.compile(arch)?)?;
            for &name in source.kernels {
                functions.insert(name, module.load_function(name)?);
            }
        }
        Ok(Kernels { functions })
    }

    fn get(&self, name: &str) -> Result<&CudaFunction, CudaError> {
        self.functions
            .get(name)
            .ok_or_else(|| CudaError::Unavailable(format!("kernel {name} is not loaded")))
    }

    pub(crate) fn embed(
        &self,
        stream: &CudaStream,
        table: &CudaSlice<u16>,
        tokens: &CudaSlice<u32>,
        out: &mut CudaSlice<f32>,
        cols: usize,
    ) -> Result<(), CudaError> {
        let f = self.get("embed")?;
        let mut b = stream.launch_builder(f);
        let cols = cols as i32;
        b.arg(table).arg(tokens).arg(out).arg(&cols);
        // SAFETY: `out` holds `tokens.len() × cols` elements and every token is
        // a row of `table` (checked by the caller).
        unsafe { b.launch(blocks((tokens.len(), 1, 1))) }?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rms_norm(
        &self,
        stream: &CudaStream,
        xs: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        eps: f32,
    ) -> Result<(), CudaError> {
        let width = weight.len();
        let f = self.get("rms_norm")?;
        let mut b = stream.launch_builder(f);
        let (rows, width_i) = (xs.len() / width, width as i32);
        b.arg(xs).arg(weight).arg(out).arg(&width_i).arg(&eps);
        // SAFETY: `xs` and `out` are whole rows of `width` (checked by the caller).
        unsafe { b.launch(blocks((rows, 1, 1))) }?;
        Ok(())
    }

    pub(crate) fn rope(
        &self,
        stream: &CudaStream,
        xs: &mut CudaSlice<f32>,
        angles: &CudaSlice<f32>,
        head_dim: usize,
        halves: bool,
    ) -> Result<(), CudaError> {
        let rows = angles.len() / head_dim;
        let width = xs.len() / rows;
        let f = self.get("rope")?;
        let mut b = stream.launch_builder(f);
        let (rows_i, width_i, d_i, halves_i) =
            (rows as i32, width as i32, head_dim as i32, halves as i32);
        b.arg(xs)
            .arg(angles)
            .arg(&rows_i)
            .arg(&width_i)
            .arg(&d_i)
            .arg(&halves_i);
        // SAFETY: `xs` is `rows × width` with whole heads and `angles` holds
        // `head_dim` values per row (checked by the caller).
        unsafe { b.launch(elementwise(rows * width / 2)) }?;
        Ok(())
    }

    /// `name(x, y, n)` over two equal buffers: add, silu_mul, gelu_tanh_mul.
    pub(crate) fn binary(
        &self,
        stream: &CudaStream,
        name: &str,
        x: &mut CudaSlice<f32>,
        y: &CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let n = x.len();
        if n == 0 {
            return Ok(());
        }
        let f = self.get(name)?;
        let mut b = stream.launch_builder(f);
        let n_i = n as i64;
        b.arg(x).arg(y).arg(&n_i);
        // SAFETY: `x` and `y` hold `n` elements (checked by the caller).
        unsafe { b.launch(elementwise(n)) }?;
        Ok(())
    }

    pub(crate) fn scale(
        &self,
        stream: &CudaStream,
        x: &mut CudaSlice<f32>,
        s: f32,
    ) -> Result<(), CudaError> {
        let n = x.len();
        if n == 0 {
            return Ok(());
        }
        let f = self.get("scale")?;
        let mut b = stream.launch_builder(f);
        let n_i = n as i64;
        b.arg(x).arg(&s).arg(&n_i);
        // SAFETY: one thread per element of `x`.
        unsafe { b.launch(elementwise(n)) }?;
        Ok(())
    }

    pub(crate) fn add_bias(
        &self,
        stream: &CudaStream,
        x: &mut CudaSlice<f32>,
        bias: &CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let (n, width) = (x.len(), bias.len());
        if n == 0 {
            return Ok(());
        }
        let f = self.get("add_bias")?;
        let mut b = stream.launch_builder(f);
        let (width_i, n_i) = (width as i32, n as i64);
        b.arg(x).arg(bias).arg(&width_i).arg(&n_i);
        // SAFETY: `x` is whole rows of `bias.len()` (checked by the caller).
        unsafe { b.launch(elementwise(n)) }?;
        Ok(())
    }

    pub(crate) fn to_bf16(
        &self,
        stream: &CudaStream,
        x: &CudaView<'_, f32>,
        out: &mut CudaViewMut<'_, u16>,
    ) -> Result<(), CudaError> {
        let n = x.len();
        if n == 0 {
            return Ok(());
        }
        let f = self.get("to_bf16")?;
        let mut b = stream.launch_builder(f);
        let n_i = n as i64;
        b.arg(x).arg(out).arg(&n_i);
        // SAFETY: `out` is as long as `x` (checked by the caller).
        unsafe { b.launch(elementwise(n)) }?;
        Ok(())
    }

    /// `attend_split` and `combine` for `tokens` queries.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention(
        &self,
        stream: &Arc<CudaStream>,
        q: &CudaView<'_, f32>,
        keys: &CudaView<'_, u16>,
        values: &CudaView<'_, u16>,
        g: Geometry,
        out: &mut CudaViewMut<'_, f32>,
        lse: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), CudaError> {
        let (tokens, heads, splits) = (lse.len() / g.n_heads as usize, g.n_heads, g.splits);
        let parts = tokens * heads as usize * splits as usize;
        if parts == 0 {
            return Ok(());
        }
        // SAFETY: `attend_split` writes every element of the three before `combine` reads them.
        let (mut part_max, mut part_sum, mut part_acc) = unsafe {
            (
                stream.alloc::<f32>(parts)?,
                stream.alloc::<f32>(parts)?,
                stream.alloc::<f32>(parts * g.head_dim as usize)?,
            )
        };
        let f = self.get("attend_split")?;
        let mut b = stream.launch_builder(f);
        b.arg(q)
            .arg(keys)
            .arg(values)
            .arg(&g)
            .arg(&mut part_max)
            .arg(&mut part_sum)
            .arg(&mut part_acc);
        // SAFETY: the caller checked that `q` holds `tokens` query rows, that
        // the window holds rows up to `first + tokens`, and the head dimension.
        unsafe { b.launch(blocks((splits as usize, heads as usize, tokens))) }?;
        let f = self.get("combine")?;
        let mut b = stream.launch_builder(f);
        b.arg(&part_max)
            .arg(&part_sum)
            .arg(&part_acc)
            .arg(&g)
            .arg(out)
            .arg(lse);
        // SAFETY: the partials are `tokens × heads × splits`; `out` and `lse`
        // hold `tokens` rows.
        unsafe { b.launch(blocks((heads as usize, tokens, 1))) }?;
        Ok(())
    }

    pub(crate) fn merge(
        &self,
        stream: &CudaStream,
        out: &mut CudaViewMut<'_, f32>,
        lse: &CudaView<'_, f32>,
        part_out: &CudaView<'_, f32>,
        part_lse: &CudaView<'_, f32>,
    ) -> Result<(), CudaError> {
        let pairs = part_lse.len();
        if pairs == 0 {
            return Ok(());
        }
        let d = part_out.len() / pairs;
        let d_i = d as i32;
        let f = self.get("merge")?;
        let mut b = stream.launch_builder(f);
        b.arg(out).arg(lse).arg(part_out).arg(part_lse).arg(&d_i);
        // SAFETY: `out` and `part_out` hold `pairs × d`, `lse` and `part_lse` `pairs`.
        unsafe { b.launch(blocks((pairs, 1, 1))) }?;
        Ok(())
    }
}
