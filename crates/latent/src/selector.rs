//! The selector π(j | x_<t, c, z) over K models and the exact router posterior r_t(j).

use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::{log_softmax, softmax};
use serde::{Deserialize, Serialize};

use crate::LatentError;

/// What the selector's π depends on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SelectorKind {
    /// `π(j | x_<t, c, z) = softmax(W_s h⁰_t + b)_j`: a writer choice per token (Co-LLM's).
    #[default]
    PerToken,
    /// `π(j) = softmax(b)_j`, the same at every token: a static mixture of the K models, the
    /// ensemble that token-level routing has to beat.
    Static,
}

/// Configuration of the [`Selector`].
#[derive(Debug, Clone, PartialEq)]
pub struct SelectorConfig {
    /// Width of the base's hidden states.
    pub d_hidden: usize,
    /// Number of models K (the base is model 0); K = 2 is Co-LLM's deferral head.
    pub n_models: usize,
    /// Per token or static.
    pub kind: SelectorKind,
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
        Ok(Selector {
            proj,
            kind: self.kind,
        })
    }
}

/// `π_θ(j | ·) = softmax(W_s h⁰_t + b)_j`, from the base's hidden state at each position
/// ([`SelectorKind::PerToken`]), or `softmax(b)_j` ([`SelectorKind::Static`], `W_s` unused).
#[derive(Module, Debug)]
pub struct Selector<B: Backend> {
    /// `[d_hidden, n_models]`.
    pub proj: Linear<B>,
    /// Per token or static.
    #[module(skip)]
    pub kind: SelectorKind,
}

impl<B: Backend> Selector<B> {
    /// Log-probabilities `log π(j)`.
    ///
    /// # Shapes
    /// - hidden: `[batch, seq, d_hidden]`
    /// - output: `[batch, seq, n_models]`
    pub fn forward(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        match self.kind {
            SelectorKind::PerToken => log_softmax(self.proj.forward(hidden), 2),
            SelectorKind::Static => {
                let [batch, seq, _] = hidden.dims();
                let bias = self.proj.bias.as_ref().map(|b| b.val()).unwrap_or_else(|| {
                    Tensor::zeros([self.proj.weight.dims()[1]], &hidden.device())
                });
                let k = bias.dims()[0];
                log_softmax(bias.reshape([1, 1, k]), 2).expand([batch, seq, k])
            }
        }
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
        // One model: π(base) = 1 (log π = 0), not the log-softmax of a bias ln(9 · 0) = −∞.
        let alone = SelectorConfig {
            d_hidden: 4,
            n_models: 1,
            kind: SelectorKind::PerToken,
        }
        .init::<B>(&device)
        .unwrap();
        let log_pi = alone.forward(Tensor::ones([1, 2, 4], &device));
        assert_eq!(log_pi.into_data().to_vec::<f64>().unwrap(), vec![0.0, 0.0]);
        for k in [2, 3] {
            let selector = SelectorConfig {
                d_hidden: 4,
                n_models: k,
                kind: SelectorKind::PerToken,
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
    fn a_static_selector_gives_softmax_of_its_bias_at_every_token_and_trains_only_the_bias() {
        type A = burn::backend::Autodiff<B>;
        let device = Default::default();
        let mut selector = SelectorConfig {
            d_hidden: 3,
            n_models: 3,
            kind: SelectorKind::Static,
        }
        .init::<A>(&device)
        .unwrap();
        let bias = [0.5f32, -1.0, 2.0];
        selector.proj.bias = Some(burn::module::Param::from_tensor(Tensor::from_data(
            bias, &device,
        )));
        selector.proj.weight = burn::module::Param::from_tensor(Tensor::ones([3, 3], &device));
        let hidden = Tensor::<A, 3>::random(
            [2, 4, 3],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &device,
        );
        let log_pi = selector.forward(hidden);
        assert_eq!(log_pi.dims(), [2, 4, 3]);
        let norm = bias.iter().map(|b| b.exp()).sum::<f32>().ln();
        let got = log_pi.clone().into_data().to_vec::<f64>().unwrap();
        for (i, v) in got.iter().enumerate() {
            assert!((v - f64::from(bias[i % 3] - norm)).abs() < 1e-6, "{i}: {v}");
        }
        // ∂/∂b_j Σ_{positions} log π(0) = 8 (1[j = 0] − π_j); the weight gets no gradient.
        let grads = log_pi.slice([0..2, 0..4, 0..1]).sum().backward();
        let g = selector
            .proj
            .bias
            .as_ref()
            .unwrap()
            .grad(&grads)
            .unwrap()
            .into_data()
            .to_vec::<f64>()
            .unwrap();
        for j in 0..3 {
            let pi = f64::from(bias[j] - norm).exp();
            let expected = 8.0 * (f64::from(u8::from(j == 0)) - pi);
            assert!(
                (g[j] - expected).abs() < 1e-5,
                "{j}: {} vs {expected}",
                g[j]
            );
        }
        assert!(selector.proj.weight.grad(&grads).is_none());
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
