//! The selector π(j | x_<t, c, z) over K models and the exact router posterior r_t(j).

use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::{log_softmax, softmax};

use crate::LatentError;

/// Configuration of the [`Selector`].
#[derive(Debug, Clone, PartialEq)]
pub struct SelectorConfig {
    /// Width of the base's hidden states.
    pub d_hidden: usize,
    /// Number of models K (the base is model 0); K = 2 is Co-LLM's deferral head.
    pub n_models: usize,
}

impl SelectorConfig {
    /// Validates and allocates. Weights start at zero and the bias at `[b, 0, …, 0]` with
    /// `b = ln(9 (K−1))`, so that π(base) = 0.9 everywhere before training.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<Selector<B>, LatentError> {
        for (key, value) in [("d_hidden", self.d_hidden), ("n_models", self.n_models)] {
            if value == 0 {
                return Err(LatentError::OutOfRange {
                    component: "selector",
                    key,
                    value,
                    expected: "> 0",
                });
            }
        }
        let mut proj = LinearConfig::new(self.d_hidden, self.n_models)
            .with_initializer(burn::nn::Initializer::Zeros)
            .init(device);
        if self.n_models > 1 {
            let mut bias = vec![0.0f32; self.n_models];
            bias[0] = (9.0 * (self.n_models - 1) as f32).ln();
            proj.bias = Some(burn::module::Param::from_tensor(Tensor::from_data(
                TensorData::new(bias, [self.n_models]).convert::<B::FloatElem>(),
                device,
            )));
        }
        Ok(Selector { proj })
    }
}

/// `π_θ(j | ·) = softmax(W_s h⁰_t + b)_j`, from the base's hidden state at each position.
#[derive(Module, Debug)]
pub struct Selector<B: Backend> {
    /// `[d_hidden, n_models]`.
    pub proj: Linear<B>,
}

impl<B: Backend> Selector<B> {
    /// Log-probabilities `log π(j)`.
    ///
    /// # Shapes
    /// - hidden: `[batch, seq, d_hidden]`
    /// - output: `[batch, seq, n_models]`
    pub fn forward(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        log_softmax(self.proj.forward(hidden), 2)
    }
}

/// The exact posterior over the writer of each token,
/// `r_t(j) = π(j) P_j(x_t) / Σ_k π(k) P_k(x_t)`, from `log π` and `log P`.
///
/// # Shapes
/// - log_pi, log_p: `[batch, seq, n_models]`
/// - output: `[batch, seq, n_models]`, rows sum to 1
pub fn router_posterior<B: Backend>(log_pi: Tensor<B, 3>, log_p: Tensor<B, 3>) -> Tensor<B, 3> {
    softmax(log_pi + log_p, 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestBackend as B;

    #[test]
    fn untrained_selector_prefers_the_base_at_ninety_percent() {
        let device = Default::default();
        for k in [2, 3] {
            let selector = SelectorConfig {
                d_hidden: 4,
                n_models: k,
            }
            .init::<B>(&device)
            .unwrap();
            let pi = selector.forward(Tensor::ones([1, 2, 4], &device)).exp();
            let pi = pi.into_data().to_vec::<f64>().unwrap();
            assert!((pi[0] - 0.9).abs() < 1e-6, "{pi:?}");
            assert!((pi[1] - 0.1 / (k - 1) as f64).abs() < 1e-6);
        }
    }

    #[test]
    fn router_posterior_is_bayes_rule() {
        let device = Default::default();
        let pi = [0.7f64, 0.3];
        let p = [0.1f64, 0.4];
        let log_pi = Tensor::<B, 3>::from_data([[[pi[0].ln(), pi[1].ln()]]], &device);
        let log_p = Tensor::<B, 3>::from_data([[[p[0].ln(), p[1].ln()]]], &device);
        let r = router_posterior(log_pi, log_p)
            .into_data()
            .to_vec::<f64>()
            .unwrap();
        let z = pi[0] * p[0] + pi[1] * p[1];
        assert!((r[0] - pi[0] * p[0] / z).abs() < 1e-6);
        assert!((r[1] - pi[1] * p[1] / z).abs() < 1e-6);
    }
}
