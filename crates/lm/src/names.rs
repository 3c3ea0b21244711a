//! Checkpoint names ↔ chorus's parameters, one declarative table per architecture
//! ([`crate::llama::LLAMA_NAMES`], [`crate::gpt2::GPT2_NAMES`]), read by all three formats that are
//! not chorus's own: Hugging Face import ([`import_hf`]), Hugging Face export ([`export_hf`]) and
//! GGUF loading ([`hf_name_of_gguf`] + [`Layout::hf_values_from_gguf`], which bring a GGUF tensor to its
//! Hugging Face name and layout first).
//!
//! A table entry names one chorus parameter by its module path (`{i}` stands for the layer index),
//! its Hugging Face tensor, its GGUF tensor if llama.cpp has one, and the [`Layout`] that turns one
//! into the other. The engine walks the model's own parameters, so an entry that the model does not
//! have (an untied `lm_head` in a tied model) is simply not asked for; a checkpoint tensor nobody
//! asked for, one that is missing or one of the wrong shape is an error naming it.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::prelude::*;
use burn_store::{ModuleSnapshot, TensorSnapshot, TensorSnapshotError};

use crate::LmError;
use crate::import::NamedTensors;

/// One parameter's names in every format.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WeightName {
    /// chorus's module path, e.g. `layers.{i}.self_attn.q_proj.weight`.
    pub(crate) chorus: &'static str,
    /// The Hugging Face tensor, e.g. `model.layers.{i}.self_attn.q_proj.weight`.
    pub(crate) hf: &'static str,
    /// The GGUF tensor (llama.cpp's names), if the format has it.
    pub(crate) gguf: Option<&'static str>,
    /// How the values are laid out in each format.
    pub(crate) layout: Layout,
}

/// How a parameter's values differ between chorus (burn: linear weights `[in, out]`), Hugging Face
/// and GGUF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    /// The same values and shape everywhere (norms, embeddings, biases, GPT-2's Conv1D weights).
    Same,
    /// A linear weight: Hugging Face `[out, in]` is chorus's `[in, out]` transposed; GGUF as
    /// Hugging Face.
    Linear,
    /// A linear Q or K weight of a RoPE model: as [`Layout::Linear`], and in GGUF each head's rows
    /// are interleaved (llama.cpp's permutation: row `h·hd + 2i + half` is Hugging Face's row
    /// `h·hd + half·hd/2 + i`), over `n_heads` (Q) or `n_kv_heads` (K) heads.
    RopeLinear {
        /// K (`n_kv_heads` heads) rather than Q (`n_heads`).
        kv: bool,
    },
    /// Part `part` (q = 0, k = 1, v = 2) of a fused tensor whose last dimension holds q, k and v
    /// side by side (GPT-2's `c_attn` Conv1D weight `[in, 3·d]` and bias `[3·d]`).
    FusedQkv {
        /// Which third.
        part: usize,
    },
}

/// A tensor under a checkpoint name: (name, row-major shape, f32 values).
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// The heads a GGUF Q/K permutation runs over.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heads {
    /// Query heads.
    pub(crate) n_heads: usize,
    /// Key/value heads.
    pub(crate) n_kv_heads: usize,
}

/// `[rows, cols]` row-major → `[cols, rows]` row-major, in tiles of 32 × 32 (a tile's reads and
/// writes stay in the cache) and over the thread pool, a band of 32 output rows per task.
pub(crate) fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const TILE: usize = 32;
    let mut out = vec![0.0; values.len()];
    if rows == 0 {
        return out;
    }
    let mut bands: Vec<(usize, &mut [f32])> = out.chunks_mut(TILE * rows).enumerate().collect();
    crate::team::for_each_mut(
        &mut bands,
        || (),
        |_, (band, chunk)| {
            let band = *band;
            let c0 = band * TILE;
            let band_cols = chunk.len() / rows;
            for r0 in (0..rows).step_by(TILE) {
                for c in 0..band_cols {
                    for r in r0..(r0 + TILE).min(rows) {
                        chunk[c * rows + r] = values[r * cols + c0 + c];
                    }
                }
            }
        },
    );
    out
}

/// For each row of a Q/K weight in Hugging Face's order, the GGUF row it comes from: row
/// `h·hd + half·hd/2 + i` is GGUF's row `h·hd + 2i + half` (llama.cpp's interleaving undone), for
/// `rows = n_heads · hd`.
fn rope_row_sources(n_heads: usize, rows: usize) -> Vec<usize> {
    let head_dim = rows / n_heads;
    let half = head_dim / 2;
    (0..rows)
        .map(|dst| {
            let (h, within) = (dst / head_dim, dst % head_dim);
            let (part, i) = (within / half, within % half);
            h * head_dim + 2 * i + part
        })
        .collect()
}

impl Layout {
    /// The Hugging Face shape of a chorus parameter of `shape` (for a fused part: the whole fused
    /// tensor).
    fn hf_shape(self, shape: &[usize]) -> Vec<usize> {
        match self {
            Layout::Same => shape.to_vec(),
            Layout::Linear | Layout::RopeLinear { .. } => shape.iter().rev().copied().collect(),
            Layout::FusedQkv { .. } => {
                let mut s = shape.to_vec();
                *s.last_mut().expect("a tensor has dims") *= 3;
                s
            }
        }
    }

    /// chorus values of `shape` from the Hugging Face tensor (of [`Layout::hf_shape`]).
    fn to_chorus(self, hf: &[f32], shape: &[usize]) -> Vec<f32> {
        match self {
            Layout::Same => hf.to_vec(),
            Layout::Linear | Layout::RopeLinear { .. } => {
                let (d_in, d_out) = (shape[0], shape[1]);
                transpose(hf, d_out, d_in)
            }
            Layout::FusedQkv { part } => {
                let width = *shape.last().expect("a tensor has dims");
                hf.chunks(3 * width)
                    .flat_map(|row| &row[part * width..(part + 1) * width])
                    .copied()
                    .collect()
            }
        }
    }

    /// Hugging Face values from a GGUF tensor of `shape` (already in Hugging Face's `[out, in]`
    /// order: GGUF lists dims innermost first and the reader reverses them).
    pub(crate) fn hf_values_from_gguf(
        self,
        values: Vec<f32>,
        shape: &[usize],
        heads: Heads,
    ) -> Result<Vec<f32>, String> {
        let Some(sources) = self.gguf_row_sources(shape, heads)? else {
            return Ok(values);
        };
        let cols = shape[1];
        Ok(sources
            .iter()
            .flat_map(|&src| &values[src * cols..(src + 1) * cols])
            .copied()
            .collect())
    }

    /// For a GGUF matrix of `shape` (`[rows, cols]`), the GGUF row each Hugging Face row comes
    /// from, or `None` when the rows are in the same order.
    pub(crate) fn gguf_row_sources(
        self,
        shape: &[usize],
        heads: Heads,
    ) -> Result<Option<Vec<usize>>, String> {
        let Layout::RopeLinear { kv } = self else {
            return Ok(None);
        };
        let n = if kv { heads.n_kv_heads } else { heads.n_heads };
        let [rows, _] = shape else {
            return Err(format!("shape {shape:?} is not a matrix"));
        };
        if rows % (2 * n) != 0 {
            return Err(format!("{rows} rows do not split into {n} heads"));
        }
        Ok(Some(rope_row_sources(n, *rows)))
    }
}

/// `name` with its first all-digit segment replaced by `{i}`, and that number.
fn pattern(name: &str) -> (String, Option<usize>) {
    let mut layer = None;
    let parts: Vec<String> = name
        .split('.')
        .map(|p| match p.parse::<usize>() {
            Ok(i) if layer.is_none() => {
                layer = Some(i);
                "{i}".to_string()
            }
            _ => p.to_string(),
        })
        .collect();
    (parts.join("."), layer)
}

/// `pattern` with `{i}` replaced by `layer`.
fn fill(pattern: &str, layer: Option<usize>) -> String {
    match layer {
        Some(i) => pattern.replace("{i}", &i.to_string()),
        None => pattern.to_string(),
    }
}

/// The Hugging Face name and layout of GGUF tensor `name` under `table`.
pub(crate) fn hf_name_of_gguf(table: &[WeightName], name: &str) -> Option<(String, Layout)> {
    let (p, layer) = pattern(name);
    table
        .iter()
        .find(|e| e.gguf == Some(p.as_str()))
        .map(|e| (fill(e.hf, layer), e.layout))
}

/// Every float parameter of a module as (path, shape), without initialising lazy parameters.
fn parameter_shapes<B: Backend, M: Module<B>>(module: &M) -> Vec<(String, Vec<usize>)> {
    struct Shapes {
        path: Vec<String>,
        found: Vec<(String, Vec<usize>)>,
    }
    impl<B: Backend> ModuleVisitor<B> for Shapes {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.found
                .push((self.path.join("."), param.lazy_shape().to_vec()));
        }
    }
    let mut shapes = Shapes {
        path: Vec::new(),
        found: Vec::new(),
    };
    module.visit(&mut shapes);
    shapes.found
}

fn entry<'t>(
    table: &'t [WeightName],
    path: &str,
) -> Result<(&'t WeightName, Option<usize>), LmError> {
    let (p, layer) = pattern(path);
    table
        .iter()
        .find(|e| e.chorus == p)
        .map(|e| (e, layer))
        .ok_or_else(|| LmError::InvalidConfig {
            field: "weight names",
            reason: format!("parameter `{path}` has no entry in its architecture's name table"),
        })
}

/// Fills `skeleton`'s parameters from Hugging Face tensors under `table`, each with the shape the
/// model needs. Tensors listed in `droppable` are removed if present (e.g. a tied model's copy of
/// `lm_head`); the caller's [`NamedTensors::finish`] then refuses any tensor nobody read. The
/// parameters of deferred tensors ([`NamedTensors::defer`]) are left as the skeleton has them.
pub(crate) fn import_hf<B: Backend, M: Module<B> + ModuleSnapshot<B>>(
    mut skeleton: M,
    table: &[WeightName],
    droppable: &[&str],
    tensors: &mut NamedTensors,
) -> Result<M, LmError> {
    let mut snapshots = Vec::new();
    let mut deferred = Vec::new();
    for (path, shape) in parameter_shapes::<B, M>(&skeleton) {
        let (e, layer) = entry(table, &path)?;
        let hf = fill(e.hf, layer);
        if tensors.is_deferred(&hf) {
            deferred.push(path);
            continue;
        }
        let hf_shape = e.layout.hf_shape(&shape);
        // A fused tensor is read once per part, so its part is copied now; any other tensor is
        // read once, so it is taken now (its errors now) and turned into chorus's layout when
        // `apply` asks for it, after which nothing holds it: the file's values and the
        // parameters never coexist in full.
        let (layout, values) = match e.layout {
            Layout::FusedQkv { .. } => (
                Layout::Same,
                e.layout.to_chorus(tensors.get(&hf, &hf_shape)?, &shape),
            ),
            layout => (layout, tensors.take(&hf, &hf_shape)?),
        };
        let pending = RefCell::new(Some(values));
        let data_shape = shape.clone();
        let data = move || {
            let values = pending.borrow_mut().take().ok_or_else(|| {
                TensorSnapshotError::DataError("an imported tensor is applied once".into())
            })?;
            let values = match layout {
                Layout::Same => values,
                layout => layout.to_chorus(&values, &data_shape),
            };
            Ok(TensorData::new(values, data_shape.clone()).convert::<B::FloatElem>())
        };
        snapshots.push(TensorSnapshot::from_closure(
            Rc::new(data),
            <B::FloatElem as burn::tensor::Element>::dtype(),
            Shape::from(shape),
            path.split('.').map(str::to_string).collect(),
            Vec::new(),
            ParamId::new(),
        ));
    }
    for name in droppable {
        tensors.discard(name);
    }
    let result = skeleton.apply(snapshots, None, None, false);
    if let Some(e) = result.errors.first() {
        return Err(LmError::InvalidConfig {
            field: "weight names",
            reason: format!("applying the imported tensors: {e:?}"),
        });
    }
    if let Some((path, _)) = result.missing.iter().find(|(p, _)| !deferred.contains(p)) {
        return Err(LmError::InvalidConfig {
            field: "weight names",
            reason: format!("parameter `{path}` was not filled"),
        });
    }
    Ok(skeleton)
}

/// The model's parameters under Hugging Face names and layouts (the inverse of [`import_hf`]),
/// fused tensors joined again.
pub(crate) fn export_hf<B: Backend, M: ModuleSnapshot<B>>(
    model: &M,
    table: &[WeightName],
) -> Result<Vec<NamedTensor>, LmError> {
    let mut out = Vec::new();
    // Fused tensors by Hugging Face name: the shape of one part and the parts found so far.
    type Parts = [Option<Vec<f32>>; 3];
    let mut fused: BTreeMap<String, (Vec<usize>, Parts)> = BTreeMap::new();
    for snapshot in model.collect(None, None, false) {
        let path = snapshot.full_path();
        let (e, layer) = entry(table, &path)?;
        let shape = snapshot.shape.to_vec();
        let values = snapshot
            .to_data()
            .map_err(|err| LmError::InvalidConfig {
                field: "weight names",
                reason: format!("reading `{path}`: {err:?}"),
            })?
            .convert::<f32>()
            .to_vec::<f32>()
            .expect("converted to f32");
        let hf = fill(e.hf, layer);
        match e.layout {
            Layout::Same => out.push((hf, shape, values)),
            Layout::Linear | Layout::RopeLinear { .. } => {
                let (d_in, d_out) = (shape[0], shape[1]);
                out.push((hf, vec![d_out, d_in], transpose(&values, d_in, d_out)));
            }
            Layout::FusedQkv { part } => {
                let slot = fused.entry(hf).or_insert((shape, [None, None, None]));
                slot.1[part] = Some(values);
            }
        }
    }
    for (hf, (shape, parts)) in fused {
        let width = *shape.last().expect("a tensor has dims");
        let [Some(q), Some(k), Some(v)] = parts else {
            return Err(LmError::InvalidConfig {
                field: "weight names",
                reason: format!("`{hf}`: not every part of the fused tensor was found"),
            });
        };
        let rows = q.len() / width;
        let mut values = Vec::with_capacity(3 * q.len());
        for r in 0..rows {
            for part in [&q, &k, &v] {
                values.extend_from_slice(&part[r * width..(r + 1) * width]);
            }
        }
        out.push((hf, Layout::FusedQkv { part: 0 }.hf_shape(&shape), values));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::{fill, pattern, transpose};

    /// A name's first all-digit segment is its layer; a later number stays in the pattern.
    #[test]
    fn a_names_first_number_is_its_layer() {
        let owned = |p: &str, layer| (p.to_string(), layer);
        assert_eq!(
            pattern("blk.3.ffn_up.weight"),
            owned("blk.{i}.ffn_up.weight", Some(3))
        );
        assert_eq!(
            pattern("h.10.mlp.2.weight"),
            owned("h.{i}.mlp.2.weight", Some(10))
        );
        assert_eq!(
            pattern("output_norm.weight"),
            owned("output_norm.weight", None)
        );
        assert_eq!(fill("h.{i}.mlp.2.weight", Some(7)), "h.7.mlp.2.weight");
        assert_eq!(fill("output_norm.weight", None), "output_norm.weight");
    }

    #[test]
    fn transpose_moves_every_value_for_shapes_that_are_not_whole_tiles() {
        for (rows, cols) in [(45, 70), (1, 5), (70, 1), (32, 64), (33, 31), (0, 3)] {
            let values: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let out = transpose(&values, rows, cols);
            assert_eq!(out.len(), values.len());
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        out[c * rows + r],
                        values[r * cols + c],
                        "{rows}×{cols} [{r}, {c}]"
                    );
                }
            }
        }
    }
}
