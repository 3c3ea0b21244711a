//! The posterior q(z | x, c) and the prior p(z | c): Gaussian heads over pooled hidden states.

use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{DiagonalGaussian, LatentError};

/// Masked mean over the sequence: `Σ_t m_t h_t / max(1, Σ_t m_t)`.
///
/// # Shapes
/// - hidden: `[batch, seq, d_hidden]`
/// - mask: `[batch, seq]`, 1.0 at positions to pool, 0.0 elsewhere
/// - output: `[batch, d_hidden]` (zeros for a row with nothing to pool)
pub fn masked_mean_pool<B: Backend>(hidden: Tensor<B, 3>, mask: Tensor<B, 2>) -> Tensor<B, 2> {
    let counts = mask.clone().sum_dim(1).clamp_min(1.0); // [batch, 1]
    let summed = (hidden * mask.unsqueeze_dim::<3>(2))
        .sum_dim(1)
        .squeeze_dim::<2>(1); // [batch, d]
    summed / counts
}

/// Configuration of a [`GaussianHead`]: pooled features → (μ, log σ²).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GaussianHeadConfig {
    /// Width of the pooled features.
    pub d_hidden: usize,
    /// Dimension of z.
    pub d_latent: usize,
}

impl GaussianHeadConfig {
    /// Validates and allocates. μ and log σ² start near zero (a near-standard Gaussian).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<GaussianHead<B>, LatentError> {
        for (key, value) in [("d_hidden", self.d_hidden), ("d_latent", self.d_latent)] {
            if value == 0 {
                return Err(LatentError::OutOfRange {
                    component: "gaussian_head",
                    key,
                    value,
                    expected: "> 0",
                });
            }
        }
        let proj = LinearConfig::new(self.d_hidden, 2 * self.d_latent)
            .with_initializer(burn::nn::Initializer::Normal {
                mean: 0.0,
                std: 0.01,
            })
            .init(device);
        Ok(GaussianHead {
            proj,
            d_latent: self.d_latent,
        })
    }
}

/// A linear map from pooled features to a diagonal Gaussian: `[μ, log σ²] = W h + b`.
#[derive(Module, Debug)]
pub struct GaussianHead<B: Backend> {
    /// `[d_hidden, 2 · d_latent]`: the first half gives μ, the second log σ².
    pub proj: Linear<B>,
    /// Dimension of z.
    pub d_latent: usize,
}

impl<B: Backend> GaussianHead<B> {
    /// # Shapes
    /// - pooled: `[batch, d_hidden]`
    /// - output: mean and log_var `[batch, d_latent]`
    pub fn forward(&self, pooled: Tensor<B, 2>) -> DiagonalGaussian<B> {
        let out = self.proj.forward(pooled);
        DiagonalGaussian {
            mean: out.clone().narrow(1, 0, self.d_latent),
            log_var: out.narrow(1, self.d_latent, self.d_latent),
        }
    }
}

/// The prior over z.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum PriorConfig {
    /// `p(z) = N(0, I)` (Optimus; also right when the context is empty).
    StandardNormal,
    /// `p_ψ(z | c) = N(μ_ψ(c), diag σ²_ψ(c))` from the pooled context.
    Conditional,
}

/// The prior module: nothing for `N(0, I)`, a [`GaussianHead`] for the conditional prior.
#[derive(Module, Debug)]
pub struct Prior<B: Backend> {
    /// `None` for the standard normal prior.
    pub head: Option<GaussianHead<B>>,
    /// Dimension of z.
    pub d_latent: usize,
}

impl PriorConfig {
    /// Allocates the prior for pooled context features of width `d_hidden`.
    pub fn init<B: Backend>(
        &self,
        d_hidden: usize,
        d_latent: usize,
        device: &B::Device,
    ) -> Result<Prior<B>, LatentError> {
        let head = match self {
            PriorConfig::StandardNormal => None,
            PriorConfig::Conditional => {
                Some(GaussianHeadConfig { d_hidden, d_latent }.init(device)?)
            }
        };
        Ok(Prior { head, d_latent })
    }
}

impl<B: Backend> Prior<B> {
    /// `p(z | c)`. For the conditional prior, `context` is the pooled context `[batch, d_hidden]`;
    /// `context_present` `[batch]` (1.0/0.0) says which rows have a non-empty context — rows without
    /// one get `N(0, I)`.
    pub fn forward(
        &self,
        batch: usize,
        context: Option<(Tensor<B, 2>, Tensor<B, 1>)>,
        device: &B::Device,
    ) -> DiagonalGaussian<B> {
        let standard = DiagonalGaussian::standard(batch, self.d_latent, device);
        match (&self.head, context) {
            (Some(head), Some((pooled, present))) => {
                let conditional = head.forward(pooled);
                let present = present.unsqueeze_dim::<2>(1); // [batch, 1]
                DiagonalGaussian {
                    mean: conditional.mean * present.clone(),
                    log_var: conditional.log_var * present,
                }
            }
            _ => standard,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestBackend as B;

    #[test]
    fn masked_mean_pool_ignores_masked_positions() {
        let device = Default::default();
        let hidden = Tensor::<B, 3>::from_data(
            [
                [[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]],
                [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]],
            ],
            &device,
        );
        let mask = Tensor::<B, 2>::from_data([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]], &device);
        let pooled = masked_mean_pool(hidden, mask)
            .into_data()
            .to_vec::<f64>()
            .unwrap();
        assert_eq!(pooled, vec![2.0, 3.0, 0.0, 0.0]);
    }

    #[test]
    fn rows_without_context_get_the_standard_normal() {
        let device = Default::default();
        let prior = PriorConfig::Conditional.init::<B>(4, 3, &device).unwrap();
        let pooled = Tensor::<B, 2>::ones([2, 4], &device) * 5.0;
        let present = Tensor::<B, 1>::from_data([1.0, 0.0], &device);
        let p = prior.forward(2, Some((pooled, present)), &device);
        let row1 = p.mean.clone().narrow(0, 1, 1).abs().sum().into_scalar()
            + p.log_var.clone().narrow(0, 1, 1).abs().sum().into_scalar();
        assert_eq!(row1, 0.0);
        assert!(p.mean.narrow(0, 0, 1).abs().sum().into_scalar() > 0.0);
        let err = GaussianHeadConfig {
            d_hidden: 0,
            d_latent: 2,
        }
        .init::<B>(&device)
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("gaussian_head.d_hidden = 0 must be > 0"),
            "{err}"
        );
    }
}
