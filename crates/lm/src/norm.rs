//! RMSNorm computed in the input's own precision (burn's `RmsNorm` rounds the statistic through f32,
//! which breaks f64 gradient checks and is not what llama implementations do in f32 either).

use burn::module::Param;
use burn::prelude::*;

/// `y = x / √(mean(x²) + ε) ⊙ weight`, over the last dimension.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// `[d_model]`, initialised to ones.
    pub weight: Param<Tensor<B, 1>>,
    /// ε.
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// A norm of width `d_model` with unit weights.
    pub fn new(d_model: usize, eps: f64, device: &B::Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::ones([d_model], device)),
            eps,
        }
    }

    /// # Shapes
    /// - x, output: `[..., d_model]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let rms = (x.clone().powf_scalar(2.0).mean_dim(D - 1) + self.eps).sqrt();
        x / rms * self.weight.val().unsqueeze()
    }
}
