//! AdamW (decoupled weight decay) with burn's formula and state, in one pass over each parameter
//! on the CPU backends.
//!
//! burn 0.21's `AdamW` updates a parameter through fifteen element-wise tensor operations, each a
//! pass over the parameter in memory; at the SmolLM2-135M shape that made the optimizer ≈ 2×
//! PyTorch's share of a step on burn-ndarray (docs/performance.md). [`AdamW`] computes the same
//! values in the same order of f32 operations — on burn-ndarray and (with the `tch` feature) on
//! LibTorch's CPU tensors in one pass over the parameter, its gradient and its two moments,
//! elsewhere through burn's tensor operations — and keeps
//! burn's [`AdamWState`], so that checkpoints written with either load in the other.

use std::any::{Any, TypeId};

use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamWState, AdaptiveMomentumState, LearningRate, SimpleOptimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_ndarray::NdArrayTensor;
use ndarray::{ArcArray, IxDyn};
use rayon::prelude::*;

/// AdamW's hyper-parameters: `m ← β₁m + (1 − β₁)g`, `v ← β₂v + (1 − β₂)g²`,
/// `p ← p·(1 − lr·λ) − lr · m̂ / (√v̂ + ε)` with `m̂ = m / (1 − β₁ᵗ)`, `v̂ = v / (1 − β₂ᵗ)` at step
/// `t` (1 for the first) and `λ` the weight decay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    /// β₁, the first moment's decay.
    pub beta_1: f32,
    /// β₂, the second moment's decay.
    pub beta_2: f32,
    /// ε, added to `√v̂`.
    pub epsilon: f32,
    /// λ, the decoupled weight decay (scaled by the learning rate).
    pub weight_decay: f32,
}

impl Default for AdamW {
    /// burn's `AdamWConfig` defaults: β₁ 0.9, β₂ 0.999, ε 1e-5, λ 1e-4.
    fn default() -> Self {
        Self {
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-5,
            weight_decay: 1e-4,
        }
    }
}

impl AdamW {
    /// The optimizer over `M`'s parameters (burn's adaptor: gradients matched to parameters, a
    /// state recorded per parameter).
    pub fn init<B: AutodiffBackend, M: AutodiffModule<B>>(self) -> OptimizerAdaptor<Self, M, B> {
        OptimizerAdaptor::from(self)
    }

    /// The scalars of step `time` at learning rate `lr`, computed and rounded to f32 where burn's
    /// `AdamW` computes and rounds them.
    fn scalars(&self, lr: LearningRate, time: usize) -> Scalars {
        let decay_rate = lr * self.weight_decay as f64;
        let time = time as i32;
        Scalars {
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            factor_1: 1.0 - self.beta_1,
            factor_2: 1.0 - self.beta_2,
            correction_1: 1.0 - self.beta_1.powi(time),
            correction_2: 1.0 - self.beta_2.powi(time),
            epsilon: self.epsilon,
            keep: (decay_rate != 0.0).then_some((1.0 - decay_rate) as f32),
            lr: lr as f32,
        }
    }
}

/// One step's scalars ([`AdamW::scalars`]).
#[derive(Debug, Clone, Copy)]
struct Scalars {
    beta_1: f32,
    beta_2: f32,
    factor_1: f32,
    factor_2: f32,
    correction_1: f32,
    correction_2: f32,
    epsilon: f32,
    /// `1 − lr·λ`; none without weight decay.
    keep: Option<f32>,
    lr: f32,
}

impl Scalars {
    /// One element's step ([`AdamW`]'s formula) in burn's order of f32 operations. Zero moments
    /// at the first step give burn's first moments, `(1 − β₁)g` and `(1 − β₂)g²`.
    #[inline(always)]
    fn update(&self, p: &mut f32, g: f32, m: &mut f32, v: &mut f32) {
        *m = *m * self.beta_1 + g * self.factor_1;
        *v = *v * self.beta_2 + g * g * self.factor_2;
        let m_hat = *m / self.correction_1;
        let v_hat = *v / self.correction_2;
        let delta = m_hat / (v_hat.sqrt() + self.epsilon);
        let decayed = match self.keep {
            Some(keep) => *p * keep,
            None => *p,
        };
        *p = decayed - delta * self.lr;
    }

    /// The same step through burn's tensor operations (any backend).
    fn update_tensors<B: Backend, const D: usize>(
        &self,
        p: Tensor<B, D>,
        g: Tensor<B, D>,
        moments: Option<(Tensor<B, D>, Tensor<B, D>)>,
    ) -> [Tensor<B, D>; 3] {
        let (m, v) = match moments {
            Some((m, v)) => (
                m.mul_scalar(self.beta_1)
                    .add(g.clone().mul_scalar(self.factor_1)),
                v.mul_scalar(self.beta_2)
                    .add(g.square().mul_scalar(self.factor_2)),
            ),
            None => (
                g.clone().mul_scalar(self.factor_1),
                g.square().mul_scalar(self.factor_2),
            ),
        };
        let m_hat = m.clone().div_scalar(self.correction_1);
        let v_hat = v.clone().div_scalar(self.correction_2);
        let delta = m_hat.div(v_hat.sqrt().add_scalar(self.epsilon));
        let decayed = match self.keep {
            Some(keep) => p.mul_scalar(keep),
            None => p,
        };
        [decayed - delta.mul_scalar(self.lr), m, v]
    }
}

impl<B: Backend> SimpleOptimizer<B> for AdamW {
    type State<const D: usize> = AdamWState<B, D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        let time = state.as_ref().map_or(1, |s| s.momentum.time + 1);
        let scalars = self.scalars(lr, time);
        let moments = state.map(|s| (s.momentum.moment_1, s.momentum.moment_2));
        let [p, m, v] = match () {
            _ if in_one_pass(&tensor, &grad, moments.as_ref()) => {
                one_pass(&scalars, tensor, grad, moments)
            }
            #[cfg(feature = "tch")]
            _ if libtorch::in_one_pass(&tensor, &grad, moments.as_ref()) => {
                libtorch::one_pass(&scalars, tensor, grad, moments)
            }
            _ => scalars.update_tensors(tensor, grad, moments),
        };
        let momentum = AdaptiveMomentumState {
            time,
            moment_1: m,
            moment_2: v,
            max_moment_2: None,
        };
        (p, Some(AdamWState { momentum }))
    }

    fn to_device<const D: usize>(mut state: Self::State<D>, device: &B::Device) -> Self::State<D> {
        state.momentum = state.momentum.to_device(device);
        state
    }
}

/// Whether [`one_pass`] applies: burn-ndarray's f32 tensors of one shape.
fn in_one_pass<B: Backend, const D: usize>(
    p: &Tensor<B, D>,
    g: &Tensor<B, D>,
    moments: Option<&(Tensor<B, D>, Tensor<B, D>)>,
) -> bool {
    let fits = |t: &Tensor<B, D>| t.dtype() == DType::F32 && t.shape() == p.shape();
    TypeId::of::<B::FloatTensorPrimitive>() == TypeId::of::<NdArrayTensor>()
        && fits(p)
        && fits(g)
        && moments.is_none_or(|(m, v)| fits(m) && fits(v))
}

/// Elements per task of [`one_pass`]: 1 MiB of each of the four buffers.
const CHUNK: usize = 1 << 18;

/// [`Scalars::update`] over every element, the tensors' buffers split into chunks shared out
/// over rayon's threads; `[p, m, v]` after the step.
///
/// # Shapes
/// - every tensor: the parameter's (checked by [`in_one_pass`])
fn one_pass<B: Backend, const D: usize>(
    scalars: &Scalars,
    p: Tensor<B, D>,
    g: Tensor<B, D>,
    moments: Option<(Tensor<B, D>, Tensor<B, D>)>,
) -> [Tensor<B, D>; 3] {
    let mut p = standard_f32::<B, D>(p);
    let g = standard_f32::<B, D>(g);
    let (mut m, mut v) = match moments {
        Some((m, v)) => (standard_f32::<B, D>(m), standard_f32::<B, D>(v)),
        None => {
            let zeros = || ArcArray::<f32, IxDyn>::zeros(p.raw_dim());
            (zeros(), zeros())
        }
    };
    // Standard layout (above) makes every buffer a slice in the same order of elements.
    let slices = (
        p.as_slice_memory_order_mut(),
        g.as_slice_memory_order(),
        m.as_slice_memory_order_mut(),
        v.as_slice_memory_order_mut(),
    );
    let (Some(ps), Some(gs), Some(ms), Some(vs)) = slices else {
        unreachable!("standard-layout arrays are contiguous");
    };
    update_slices(scalars, ps, gs, ms, vs);
    [p, m, v].map(|a| from_primitive(NdArrayTensor::from(a)))
}

/// The backend's float tensor `T` of `t`, which the caller checked `B`'s to be.
fn primitive<T: 'static, B: Backend, const D: usize>(t: Tensor<B, D>) -> T {
    let primitive: Box<dyn Any> = Box::new(t.into_primitive().tensor());
    *primitive
        .downcast::<T>()
        .expect("B's float tensors are T (checked by the caller)")
}

/// The tensor of `B` holding `t`, a float tensor of the type `B`'s are (checked by the caller).
fn from_primitive<T: 'static, B: Backend, const D: usize>(t: T) -> Tensor<B, D> {
    let primitive: Box<dyn Any> = Box::new(t);
    let primitive = *primitive
        .downcast::<B::FloatTensorPrimitive>()
        .expect("B's float tensors are T (checked by the caller)");
    Tensor::from_primitive(TensorPrimitive::Float(primitive))
}

/// [`Scalars::update`] over each element of `p`, `g`, `m`, `v` (equal lengths), in chunks spread
/// over rayon's threads.
fn update_slices(scalars: &Scalars, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| {
            for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m).zip(v) {
                scalars.update(p, g, m, v);
            }
        });
}

/// The f32 array of a burn-ndarray tensor (checked by [`in_one_pass`]) in standard layout.
fn standard_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> ArcArray<f32, IxDyn> {
    let array = primitive::<NdArrayTensor, B, D>(t)
        .into_f32_array()
        .expect("an f32 burn-ndarray tensor (checked by in_one_pass)");
    if array.is_standard_layout() {
        array
    } else {
        array.as_standard_layout().into_owned().into_shared()
    }
}

/// The same pass over LibTorch's CPU tensors (the `tch` feature): LibTorch would take the fifteen
/// operations of [`Scalars::update_tensors`] one pass each, as burn-ndarray did.
#[cfg(feature = "tch")]
mod libtorch {
    use super::*;
    use burn_tch::{LibTorchDevice, TchTensor};

    /// Whether [`one_pass`] takes this step: `B` is LibTorch on the CPU, and the parameter, its
    /// gradient and moments are f32 of one shape.
    pub(super) fn in_one_pass<B: Backend, const D: usize>(
        p: &Tensor<B, D>,
        g: &Tensor<B, D>,
        moments: Option<&(Tensor<B, D>, Tensor<B, D>)>,
    ) -> bool {
        let fits = |t: &Tensor<B, D>| t.dtype() == DType::F32 && t.shape() == p.shape();
        let device: Box<dyn Any> = Box::new(p.device());
        TypeId::of::<B::FloatTensorPrimitive>() == TypeId::of::<TchTensor>()
            && device.downcast_ref::<LibTorchDevice>() == Some(&LibTorchDevice::Cpu)
            && fits(p)
            && fits(g)
            && moments.is_none_or(|(m, v)| fits(m) && fits(v))
    }

    /// The LibTorch tensor of `t` (checked by [`in_one_pass`]), contiguous, and its own: `t`
    /// itself when no other tensor reads its buffer, else a copy, so that writing it changes
    /// nothing else.
    fn own_contiguous<B: Backend, const D: usize>(t: Tensor<B, D>) -> TchTensor {
        let t = primitive::<TchTensor, B, D>(t);
        if !t.tensor.is_contiguous() {
            TchTensor::new(t.tensor.contiguous())
        } else if !t.can_mut() {
            TchTensor::new(t.tensor.copy())
        } else {
            t
        }
    }

    /// The f32 values of a contiguous CPU tensor, to write.
    ///
    /// # Safety
    /// `t` is a contiguous f32 tensor on the CPU that no other tensor reads while the slice
    /// lives ([`own_contiguous`]).
    unsafe fn values_mut(t: &mut TchTensor) -> &mut [f32] {
        let n = t.tensor.numel();
        // SAFETY: the caller guarantees n contiguous f32 on the host, read by nothing else.
        unsafe { std::slice::from_raw_parts_mut(t.tensor.data_ptr().cast::<f32>(), n) }
    }

    /// [`super::one_pass`] on LibTorch's CPU tensors (checked by [`in_one_pass`]): the parameter
    /// and moments updated where they are when nothing else reads them.
    pub(super) fn one_pass<B: Backend, const D: usize>(
        scalars: &Scalars,
        p: Tensor<B, D>,
        g: Tensor<B, D>,
        moments: Option<(Tensor<B, D>, Tensor<B, D>)>,
    ) -> [Tensor<B, D>; 3] {
        let mut p = own_contiguous(p);
        let g = primitive::<TchTensor, B, D>(g).tensor.contiguous();
        let (mut m, mut v) = match moments {
            Some((m, v)) => (own_contiguous(m), own_contiguous(v)),
            None => (
                TchTensor::new(p.tensor.zeros_like()),
                TchTensor::new(p.tensor.zeros_like()),
            ),
        };
        // SAFETY: p, m, v are contiguous f32 CPU tensors of one shape, each the only reader of
        // its buffer (own_contiguous, zeros_like); g is contiguous f32 of that shape, read only.
        unsafe {
            let gs = std::slice::from_raw_parts(g.data_ptr().cast::<f32>().cast_const(), g.numel());
            update_slices(
                scalars,
                values_mut(&mut p),
                gs,
                values_mut(&mut m),
                values_mut(&mut v),
            );
        }
        [p, m, v].map(from_primitive)
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use burn::optim::AdamWConfig;
    use burn::tensor::{Distribution, TensorData};

    use super::*;

    /// Three steps of `ours` and of burn's AdamW from the same parameter, gradients and rate;
    /// the parameters and moments after each step, as f64.
    fn three_steps<B: Backend, const D: usize>(p: Tensor<B, D>) -> Vec<[Vec<f64>; 2]> {
        let burn = AdamWConfig::new().with_weight_decay(0.1).build();
        let ours = AdamW {
            weight_decay: 0.1,
            ..AdamW::default()
        };
        let (mut theirs_p, mut theirs_s) = (p.clone(), None);
        let (mut ours_p, mut ours_s) = (p.clone(), None);
        let values =
            |t: &Tensor<B, D>| -> Vec<f64> { t.to_data().convert::<f64>().to_vec().unwrap() };
        let mut out = Vec::new();
        for step in 0..3 {
            let shape = p.shape();
            let g = Tensor::<B, D>::random(shape, Distribution::Normal(0.0, 1.0), &p.device());
            let lr = 1e-3 * (step + 1) as f64;
            (theirs_p, theirs_s) = burn.step(lr, theirs_p, g.clone(), theirs_s);
            (ours_p, ours_s) = SimpleOptimizer::<B>::step(&ours, lr, ours_p, g, ours_s);
            let moments = |s: &Option<AdamWState<B, D>>| {
                let m = &s.as_ref().unwrap().momentum;
                assert_eq!(m.time, step + 1);
                [values(&m.moment_1), values(&m.moment_2)].concat()
            };
            out.push([
                [values(&theirs_p), moments(&theirs_s)].concat(),
                [values(&ours_p), moments(&ours_s)].concat(),
            ]);
        }
        out
    }

    #[test]
    fn one_pass_equals_burns_adamw_bit_for_bit() {
        type B = NdArray<f32>;
        let device = Default::default();
        B::seed(&device, 7);
        // Large enough for several chunks of the pass (3 × 2^18 + 5 elements).
        let p = Tensor::<B, 2>::random([3, (1 << 18) + 5], Distribution::Normal(0.0, 1.0), &device)
            .div_scalar(3.0);
        let ones = Tensor::<B, 2>::ones([3, (1 << 18) + 5], &device);
        assert!(in_one_pass(&p, &ones, None));
        for [theirs, ours] in three_steps(p) {
            assert!(theirs == ours, "the one pass differs from burn's AdamW");
        }
    }

    /// The one pass reads every buffer as the parameter's f32 elements: a tensor of another float
    /// type or shape goes through the tensor operations.
    #[test]
    fn the_one_pass_takes_only_f32_tensors_of_the_parameters_shape() {
        type B = NdArray<f32>;
        let device = Default::default();
        let p = Tensor::<B, 2>::ones([2, 3], &device);
        let f64 = || p.clone().cast(burn::tensor::FloatDType::F64);
        assert_eq!(f64().dtype(), DType::F64);
        let other_shape = Tensor::<B, 2>::ones([3, 2], &device);
        assert!(in_one_pass(&p, &p, Some(&(p.clone(), p.clone()))));
        assert!(
            !in_one_pass(&p, &other_shape, None),
            "a gradient of another shape"
        );
        assert!(!in_one_pass(&p, &f64(), None), "an f64 gradient");
        assert!(!in_one_pass(&f64(), &p, None), "an f64 parameter");
        assert!(
            !in_one_pass(&p, &p, Some(&(f64(), p.clone()))),
            "an f64 first moment"
        );
        assert!(
            !in_one_pass(&p, &p, Some(&(p.clone(), f64()))),
            "an f64 second moment"
        );
        assert!(
            !in_one_pass(&p, &p, Some(&(p.clone(), other_shape.clone()))),
            "a second moment of another shape"
        );
    }

    #[test]
    fn a_transposed_parameter_is_stepped_element_by_element() {
        type B = NdArray<f32>;
        let device = Default::default();
        B::seed(&device, 8);
        // A transposed view: its buffer's order is not its elements' order.
        let p = Tensor::<B, 2>::from_data(
            TensorData::new((0..35).map(|i| i as f32 / 7.0 - 2.0).collect(), [5, 7]),
            &device,
        )
        .transpose();
        for [theirs, ours] in three_steps(p) {
            assert!(
                theirs == ours,
                "a transposed parameter differs from burn's AdamW"
            );
        }
    }

    /// Three steps of `ours` on backend `B` from the parameter `p` (a `[rows, cols]` matrix,
    /// transposed when `transposed`) with fixed gradients; the parameter and moments after each.
    #[cfg(feature = "tch")]
    fn ours_three_steps<B: Backend>(
        p: &[f32],
        [rows, cols]: [usize; 2],
        transposed: bool,
        device: &B::Device,
    ) -> Vec<Vec<f64>> {
        let ours = AdamW {
            weight_decay: 0.1,
            ..AdamW::default()
        };
        let matrix = |values: Vec<f32>| {
            let t = Tensor::<B, 2>::from_data(TensorData::new(values, [rows, cols]), device);
            if transposed { t.transpose() } else { t }
        };
        let values =
            |t: &Tensor<B, 2>| -> Vec<f64> { t.to_data().convert::<f64>().to_vec().unwrap() };
        let (mut p, mut state) = (matrix(p.to_vec()), None);
        let mut out = Vec::new();
        for step in 0..3 {
            let g = (0..rows * cols)
                .map(|i| ((i * (step + 3)) as f32 * 0.37).sin() * (step + 1) as f32)
                .collect();
            (p, state) = SimpleOptimizer::<B>::step(&ours, 1e-3, p, matrix(g), state);
            let m = &state.as_ref().unwrap().momentum;
            out.push([values(&p), values(&m.moment_1), values(&m.moment_2)].concat());
        }
        out
    }

    /// LibTorch's CPU tensors take the one pass, and it computes what it computes on
    /// burn-ndarray (there bit for bit burn's AdamW, above), for a plain and a transposed
    /// parameter. LibTorch's own element-wise operations are not all correctly rounded, so burn's
    /// AdamW through them differs from both in the last bits of a few elements. Run with `cargo
    /// test -p chorus-train --features tch` against `cargo xtask setup-torch`'s PyTorch (its
    /// `torch/lib` on `LD_LIBRARY_PATH`).
    #[cfg(feature = "tch")]
    #[test]
    fn libtorch_one_pass_equals_the_ndarray_one_bit_for_bit() {
        type T = burn_tch::LibTorch<f32>;
        let torch = burn_tch::LibTorchDevice::Cpu;
        let probe = Tensor::<T, 1>::zeros([4], &torch);
        assert!(libtorch::in_one_pass(&probe, &probe.clone(), None));
        // Large enough for several chunks of the pass (3 × 2^18 + 5 elements).
        let shape = [3, (1 << 18) + 5];
        let p: Vec<f32> = (0..shape[0] * shape[1])
            .map(|i| (i as f32 * 0.61).cos() / 3.0)
            .collect();
        for transposed in [false, true] {
            let on_torch = ours_three_steps::<T>(&p, shape, transposed, &torch);
            let on_ndarray =
                ours_three_steps::<NdArray<f32>>(&p, shape, transposed, &Default::default());
            assert!(
                on_torch == on_ndarray,
                "the one pass on LibTorch differs from burn-ndarray's (transposed: {transposed})"
            );
        }
    }

    /// The pass writes a parameter in place only when nothing else reads its buffer.
    #[cfg(feature = "tch")]
    #[test]
    fn libtorch_one_pass_leaves_a_shared_parameter_alone() {
        type B = burn_tch::LibTorch<f32>;
        let device = burn_tch::LibTorchDevice::Cpu;
        B::seed(&device, 8);
        let p = Tensor::<B, 1>::random([1000], Distribution::Normal(0.0, 1.0), &device);
        let kept = p.clone();
        let before = kept.to_data();
        let g = Tensor::<B, 1>::ones([1000], &device);
        let (stepped, _) = SimpleOptimizer::<B>::step(&AdamW::default(), 0.1, p, g, None);
        assert_eq!(
            kept.to_data(),
            before,
            "the step wrote into a shared buffer"
        );
        assert_ne!(stepped.to_data(), before, "the step changed nothing");
    }

    #[test]
    fn other_backends_step_through_tensor_operations_as_burn_does() {
        // Autodiff's tensors are not burn-ndarray's: the tensor operations give burn's values.
        type B = burn::backend::Autodiff<NdArray<f32>>;
        let device = Default::default();
        B::seed(&device, 9);
        let p = Tensor::<B, 1>::random([1000], Distribution::Normal(0.0, 1.0), &device);
        assert!(!in_one_pass(&p, &p, None));
        for [theirs, ours] in three_steps(p) {
            assert!(
                theirs == ours,
                "the tensor operations differ from burn's AdamW"
            );
        }
    }
}
