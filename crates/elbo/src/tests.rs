//! Exact checks of the objective against independent formulas.

use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::Distribution;
use chorus_latent::DiagonalGaussian;

use crate::*;

use crate::TestBackend as F64;

/// burn-ndarray's RNG is one process-wide generator: tests that draw from it take turns and seed it
/// first, so a seed pins every draw and a statistical failure reproduces.
fn seeded(seed: u64) -> std::sync::MutexGuard<'static, ()> {
    static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let guard = RNG.lock().unwrap_or_else(|e| e.into_inner());
    F64::seed(&Default::default(), seed);
    guard
}

fn to_vec<const D: usize>(t: Tensor<F64, D>) -> Vec<f64> {
    t.into_data().to_vec::<f64>().unwrap()
}

/// log Σ_{Z ∈ K^T} Π_t π_{Z_t}(t) P_{Z_t}(x_t), by enumerating every router assignment.
fn brute_force(pi: &[Vec<f64>], p: &[Vec<f64>]) -> f64 {
    let (t_len, k) = (pi.len(), pi[0].len());
    let mut total = 0.0;
    for code in 0..k.pow(t_len as u32) {
        let mut c = code;
        let mut prob = 1.0;
        for t in 0..t_len {
            let j = c % k;
            c /= k;
            prob *= pi[t][j] * p[t][j];
        }
        total += prob;
    }
    total.ln()
}

#[test]
fn token_mixture_equals_brute_force_enumeration_of_the_router() {
    let device = Default::default();
    let _rng = seeded(3);
    for (k, t_len) in [(2, 6), (3, 5)] {
        let pi_logits =
            Tensor::<F64, 3>::random([1, t_len, k], Distribution::Normal(0.0, 1.0), &device);
        let log_pi = burn::tensor::activation::log_softmax(pi_logits, 2);
        let log_p =
            Tensor::<F64, 3>::random([1, t_len, k], Distribution::Uniform(-6.0, -0.1), &device);
        let mask = Tensor::<F64, 2>::ones([1, t_len], &device);
        let ours = mixture_log_likelihood(log_pi.clone(), log_p.clone(), mask).per_sequence;
        let rows = |t: Tensor<F64, 3>| -> Vec<Vec<f64>> {
            to_vec(t.exp()).chunks(k).map(|c| c.to_vec()).collect()
        };
        let reference = brute_force(&rows(log_pi), &rows(log_p));
        let ours = to_vec(ours)[0];
        assert!(
            (ours - reference).abs() < 1e-10,
            "K={k}: {ours} vs {reference}"
        );
    }
}

#[test]
fn padding_positions_do_not_count() {
    let _rng = seeded(1);
    let device = Default::default();
    let log_pi = Tensor::<F64, 3>::random([2, 4, 2], Distribution::Uniform(-3.0, -0.1), &device);
    let log_p = Tensor::<F64, 3>::random([2, 4, 2], Distribution::Uniform(-3.0, -0.1), &device);
    let mask = Tensor::<F64, 2>::from_data([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], &device);
    let full = mixture_log_likelihood(log_pi.clone(), log_p.clone(), mask).per_sequence;
    let short = mixture_log_likelihood(
        log_pi.narrow(1, 0, 2),
        log_p.narrow(1, 0, 2),
        Tensor::ones([2, 2], &device),
    )
    .per_sequence;
    let (full, short) = (to_vec(full), to_vec(short));
    assert!((full[0] - short[0]).abs() < 1e-12);
    assert!((full[1] - short[1]).abs() > 1e-3);
}

#[test]
fn k2_without_z_is_co_llm_deferral_loss() {
    // Co-LLM: −log(σ(−d) P_base + σ(d) P_asst) with d the deferral logit.
    let device = Default::default();
    let d = [-2.0f64, 0.3, 1.7, 0.0];
    let p_base = [0.2f64, 0.01, 0.5, 0.9];
    let p_asst = [0.6f64, 0.3, 0.05, 0.9];
    let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
    let co_llm: f64 = (0..4)
        .map(|t| -(sigmoid(-d[t]) * p_base[t] + sigmoid(d[t]) * p_asst[t]).ln())
        .sum();
    // Same thing through the selector's parameterisation: logits [0, d] → log π by log-softmax.
    let logits: Vec<f64> = d.iter().flat_map(|&d| [0.0, d]).collect();
    let log_pi = burn::tensor::activation::log_softmax(
        Tensor::<F64, 3>::from_data(TensorData::new(logits, [1, 4, 2]), &device),
        2,
    );
    let log_p: Vec<f64> = (0..4)
        .flat_map(|t| [p_base[t].ln(), p_asst[t].ln()])
        .collect();
    let log_p = Tensor::<F64, 3>::from_data(TensorData::new(log_p, [1, 4, 2]), &device);
    let ours =
        -to_vec(mixture_log_likelihood(log_pi, log_p, Tensor::ones([1, 4], &device)).per_sequence)
            [0];
    assert!((ours - co_llm).abs() < 1e-12, "{ours} vs {co_llm}");
}

#[test]
fn k1_is_the_plain_language_model_nll() {
    let _rng = seeded(2);
    let device = Default::default();
    let logits = Tensor::<F64, 3>::random([2, 5, 11], Distribution::Normal(0.0, 2.0), &device);
    let targets = Tensor::<F64, 2, Int>::random([2, 5], Distribution::Uniform(0.0, 11.0), &device);
    let log_p = token_log_probs(logits.clone(), targets.clone()).unsqueeze_dim::<3>(2);
    let log_pi = Tensor::<F64, 3>::zeros([2, 5, 1], &device); // π = 1
    let ours =
        to_vec(mixture_log_likelihood(log_pi, log_p, Tensor::ones([2, 5], &device)).per_sequence);
    // Reference: Σ_t log softmax(logits)[x_t], by hand on the host.
    let l = to_vec(logits);
    let x = targets.into_data().to_vec::<i64>().unwrap();
    for b in 0..2 {
        let mut nll = 0.0;
        for t in 0..5 {
            let row = &l[(b * 5 + t) * 11..(b * 5 + t + 1) * 11];
            let z: f64 = row.iter().map(|v| v.exp()).sum();
            nll -= row[x[b * 5 + t] as usize] - z.ln();
        }
        assert!((ours[b] + nll).abs() < 1e-10);
    }
}

#[test]
fn free_bits_zero_the_gradient_of_dimensions_below_lambda() {
    type AD = Autodiff<F64>;
    let device = Default::default();
    let q_mean = Tensor::<AD, 2>::from_data([[0.01, 2.0, 0.05, -1.5]], &device).require_grad();
    let q = DiagonalGaussian {
        mean: q_mean.clone(),
        log_var: Tensor::zeros([1, 4], &device),
    };
    let kl = q.kl(&DiagonalGaussian::standard(1, 4, &device)); // ½ μ² per dimension
    let lambda = 0.5;
    let grads = kl_free_bits(kl, lambda).sum().backward();
    let grad = q_mean
        .grad(&grads)
        .unwrap()
        .into_data()
        .to_vec::<f64>()
        .unwrap();
    // KL_d = ½ μ_d²: dims 0 and 2 are below λ = 0.5 → zero gradient; dims 1, 3 get dKL/dμ = μ.
    assert_eq!(grad[0], 0.0);
    assert_eq!(grad[2], 0.0);
    assert!(
        (grad[1] - 2.0).abs() < 1e-12 && (grad[3] + 1.5).abs() < 1e-12,
        "{grad:?}"
    );
    // λ = 0 is the plain sum.
    let kl = Tensor::<F64, 2>::from_data([[0.1, 0.2]], &device);
    assert!((to_vec(kl_free_bits(kl, 0.0))[0] - 0.3).abs() < 1e-12);
}

#[test]
fn elbo_terms_are_sequence_sums_with_beta() {
    let device = Default::default();
    let log_px = Tensor::<F64, 2>::from_data([[-10.0, -20.0], [-12.0, -22.0]], &device); // [S=2, B=2]
    let kl = Tensor::<F64, 2>::from_data([[0.1, 0.5], [1.0, 2.0]], &device);
    let terms = elbo_terms(log_px, kl, 0.5, 0.2);
    assert_eq!(to_vec(terms.reconstruction), vec![-11.0, -21.0]);
    assert!((to_vec(terms.kl.clone())[0] - 0.6).abs() < 1e-12);
    assert!((to_vec(terms.kl_free_bits)[0] - 0.7).abs() < 1e-12); // max(0.2, 0.1) + 0.5
    // loss = mean(11 + 0.5·0.7, 21 + 0.5·3.0)
    assert!((to_vec(terms.loss)[0] - (11.35 + 22.5) / 2.0).abs() < 1e-12);
}

/// The 1-D linear-Gaussian model of the IW tests, where log p(x) is known: z ~ N(0, 1),
/// x | z ~ N(z, σ²), so x ~ N(0, 1 + σ²); observed x = 1.3, σ² = 0.5.
const LINEAR_GAUSSIAN_X: f64 = 1.3;
const LINEAR_GAUSSIAN_SIGMA2: f64 = 0.5;

/// log p(x) = log N(x; 0, 1 + σ²) of the linear-Gaussian model.
fn linear_gaussian_log_px() -> f64 {
    let (x, sigma2) = (LINEAR_GAUSSIAN_X, LINEAR_GAUSSIAN_SIGMA2);
    -0.5 * ((2.0 * std::f64::consts::PI * (1.0 + sigma2)).ln() + x * x / (1.0 + sigma2))
}

/// log p(x | z) = log N(x; z, σ²) of the linear-Gaussian model.
///
/// # Shapes
/// - z: `[S, 1, 1]`
/// - output: `[S, 1]`
fn linear_gaussian_log_px_given(z: Tensor<F64, 3>) -> Tensor<F64, 2> {
    let (x, sigma2) = (LINEAR_GAUSSIAN_X, LINEAR_GAUSSIAN_SIGMA2);
    ((z - x).powf_scalar(2.0) / sigma2 + (2.0 * std::f64::consts::PI * sigma2).ln())
        .mul_scalar(-0.5)
        .squeeze_dim::<2>(2)
}

/// A deliberately imperfect q(z | x) = N(0.4, 0.6) for the linear-Gaussian model.
fn imperfect_q(device: &burn::tensor::Device<F64>) -> DiagonalGaussian<F64> {
    DiagonalGaussian {
        mean: Tensor::from_data([[0.4]], device),
        log_var: Tensor::from_data([[(0.6f64).ln()]], device),
    }
}

/// With the imperfect q, the IW bound must lie between the ELBO and log p(x), and rise with S.
#[test]
fn iw_bound_is_above_the_elbo_and_rises_with_samples() {
    let device = Default::default();
    let _rng = seeded(2024);
    let exact = linear_gaussian_log_px();
    let q = imperfect_q(&device);
    let prior = DiagonalGaussian::<F64>::standard(1, 1, &device);
    let estimate = |s: usize, reps: usize| -> f64 {
        let mut total = 0.0;
        for _ in 0..reps {
            let z = q.sample(s); // [S, 1, 1]
            let log_px = linear_gaussian_log_px_given(z.clone());
            let b = iw_log_likelihood(log_px, prior.log_prob(z.clone()), q.log_prob(z));
            total += to_vec(b)[0];
        }
        total / reps as f64
    };
    let (b1, b10, b100) = (estimate(1, 4000), estimate(10, 1000), estimate(100, 200));
    assert!(b1 < b10 && b10 < b100, "{b1} {b10} {b100}");
    assert!(b100 <= exact + 1e-3, "{b100} > log p(x) = {exact}");
    assert!(exact - b100 < exact - b1);
}

/// The same model with q the exact posterior p(z | x) = N(x / (1 + σ²), σ² / (1 + σ²)): every
/// importance weight p(x | z) p(z) / q(z) is p(x), so the bound is log p(x) for every draw and
/// every S (the zero-variance case); and with one sample of any q it is
/// log p(x | z) + log p(z) − log q(z) itself. Both fail if a term enters with the wrong sign,
/// which the ordering checks above do not see.
#[test]
fn iw_bound_is_log_p_x_under_the_exact_posterior() {
    let device = Default::default();
    let _rng = seeded(7);
    let (x, sigma2) = (LINEAR_GAUSSIAN_X, LINEAR_GAUSSIAN_SIGMA2);
    let exact = linear_gaussian_log_px();
    let log_px_given = linear_gaussian_log_px_given;
    let prior = DiagonalGaussian::<F64>::standard(1, 1, &device);
    let posterior = DiagonalGaussian::<F64> {
        mean: Tensor::from_data([[x / (1.0 + sigma2)]], &device),
        log_var: Tensor::from_data([[(sigma2 / (1.0 + sigma2)).ln()]], &device),
    };
    for s in [1, 7] {
        for _ in 0..5 {
            let z = posterior.sample(s); // [S, 1, 1]
            let bound = iw_log_likelihood(
                log_px_given(z.clone()),
                prior.log_prob(z.clone()),
                posterior.log_prob(z),
            );
            let bound = to_vec(bound)[0];
            assert!((bound - exact).abs() < 1e-12, "S = {s}: {bound} vs {exact}");
        }
    }
    let q = imperfect_q(&device);
    let z = q.sample(1);
    let (log_px, log_pz, log_qz) = (
        to_vec(log_px_given(z.clone()))[0],
        to_vec(prior.log_prob(z.clone()))[0],
        to_vec(q.log_prob(z.clone()))[0],
    );
    let bound = to_vec(iw_log_likelihood(
        log_px_given(z.clone()),
        prior.log_prob(z.clone()),
        q.log_prob(z),
    ))[0];
    assert!(
        (bound - (log_px + log_pz - log_qz)).abs() < 1e-12,
        "{bound} vs {}",
        log_px + log_pz - log_qz
    );
}

#[test]
fn mutual_information_and_active_units() {
    let device = Default::default();
    let _rng = seeded(5);
    // Posteriors that ignore x (all equal): MI ≈ 0 (the estimate's standard error is ≈ 1.2/√n),
    // no active units.
    let same = DiagonalGaussian::<F64> {
        mean: Tensor::zeros([1024, 3], &device),
        log_var: Tensor::zeros([1024, 3], &device),
    };
    let noise = |m: usize, n: usize| {
        Tensor::<F64, 3>::random([m, n, 3], Distribution::Normal(0.0, 1.0), &device)
    };
    let mi = mutual_information(&same, noise(1, 1024));
    assert!(mi.abs() < 0.15, "{mi}");
    assert_eq!(active_units(same.mean.clone(), 0.01), 0);
    // Sharp posteriors spread over dimension 0 only: high MI, one active unit.
    let means: Vec<f64> = (0..64)
        .flat_map(|i| [i as f64 / 8.0, 0.0, 0.001 * (i % 2) as f64])
        .collect();
    let informative = DiagonalGaussian::<F64> {
        mean: Tensor::from_data(TensorData::new(means, [64, 3]), &device),
        log_var: Tensor::ones([64, 3], &device) * -6.0,
    };
    let mi = mutual_information(&informative, noise(1, 64));
    // The estimator saturates near log N (here 4.16) when posteriors do not overlap.
    assert!(mi > 2.0 && mi < (64f64).ln() + 0.5, "{mi}");
    assert_eq!(active_units(informative.mean.clone(), 0.01), 1);
    // Moments merged over chunks equal those of all rows at once, whatever the cut.
    let all = MeanMoments::of(informative.mean.clone());
    for cut in [1, 17, 32, 63] {
        let mut merged = MeanMoments::of(informative.mean.clone().slice([0..cut, 0..3]));
        merged.merge(&MeanMoments::of(
            informative.mean.clone().slice([cut..64, 0..3]),
        ));
        assert_eq!(merged.n, 64);
        for d in 0..3 {
            assert!(
                (merged.mean[d] - all.mean[d]).abs() < 1e-12,
                "{cut} {merged:?}"
            );
            assert!(
                (merged.m2[d] - all.m2[d]).abs() < 1e-9,
                "{cut} {merged:?} {all:?}"
            );
        }
        assert_eq!(merged.active_units(0.01), 1);
    }
    // Dimension 0 by hand: the sample variance of i/8, i = 0..63, is Var(i)/64 with
    // Var(i) = 64·65/12 (the sample variance of 0..N−1 is N(N+1)/12).
    let by_hand = 64.0 * 65.0 / 12.0 / 64.0;
    assert!((all.m2[0] / 63.0 - by_hand).abs() < 1e-12, "{all:?}");
}

/// Active units at their threshold, on means whose sample variances are exact in binary: a unit
/// counts when `M2 / (n − 1)` strictly exceeds the threshold, and fewer than two examples have no
/// variance. (The test above has variances far from its threshold, so it could not tell `n − 1`
/// from `n` or `>` from `≥`; `cargo mutants` found both unguarded.)
#[test]
fn active_units_count_sample_variances_strictly_above_the_threshold() {
    let device = Default::default();
    let means = |values: &[f64]| {
        Tensor::<F64, 2>::from_data(TensorData::new(values.to_vec(), [values.len(), 1]), &device)
    };
    // 0, 1, 2: M2 = 2, sample variance 1 (2/3 with n, 4 with n − 1 as a factor).
    let three = MeanMoments::of(means(&[0.0, 1.0, 2.0]));
    assert_eq!((three.n, three.m2.clone()), (3, vec![2.0]));
    for (threshold, active) in [(0.99, 1), (1.0, 0), (1.01, 0)] {
        assert_eq!(
            three.active_units(threshold),
            active,
            "threshold {threshold}"
        );
    }
    // Two examples, 0 and 2: sample variance 2; one example: none.
    assert_eq!(MeanMoments::of(means(&[0.0, 2.0])).active_units(1.99), 1);
    assert_eq!(MeanMoments::of(means(&[5.0])).active_units(0.0), 0);
    assert_eq!(MeanMoments::default().active_units(0.0), 0);
}

/// The bag-of-words term by hand: per row, Σ over the masked-in target positions of
/// log softmax(ℓ)[x_t], with a repeated token counted at each of its positions; and the loss it
/// adds to, `mean(−reconstruction + β · KL) − α · mean(log p_bow)`.
#[test]
fn bag_of_words_log_likelihood_by_hand_and_in_the_loss() {
    let device = Default::default();
    let logits = [[0.5, -1.0, 2.0, 0.0], [1.5, 1.5, -0.5, 3.0]];
    let targets = [[2i64, 2, 0, 3], [1, 3, 0, 0]];
    let mask = [[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0]];
    let got = to_vec(bag_of_words_log_likelihood(
        Tensor::<F64, 2>::from_data(logits, &device),
        Tensor::<F64, 2, Int>::from_data(targets, &device),
        Tensor::<F64, 2>::from_data(mask, &device),
    ));
    for r in 0..2 {
        let log_z = logits[r].iter().map(|l: &f64| l.exp()).sum::<f64>().ln();
        let by_hand: f64 = (0..4)
            .map(|t| mask[r][t] * (logits[r][targets[r][t] as usize] - log_z))
            .sum();
        assert!(
            (got[r] - by_hand).abs() < 1e-12,
            "row {r}: {} vs {by_hand}",
            got[r]
        );
    }
    let terms = elbo_terms(
        Tensor::<F64, 2>::from_data([[-10.0, -20.0]], &device),
        Tensor::<F64, 2>::from_data([[0.5, 0.25], [1.0, 0.0]], &device),
        0.5,
        0.0,
    );
    let plain = terms.loss.clone().into_scalar();
    let log_bow = Tensor::<F64, 1>::from_data([-3.0, -5.0], &device);
    let with = with_bag_of_words(terms, log_bow, 0.25);
    assert!((plain - (15.0 + 0.5 * 0.875)).abs() < 1e-12, "{plain}");
    assert!((with.loss.into_scalar() - (plain + 0.25 * 4.0)).abs() < 1e-12);
    assert_eq!(to_vec(with.bag_of_words.unwrap()), [-3.0, -5.0]);
}

/// He et al.'s estimator against the formula evaluated by hand in f64 on the host, on a case whose
/// 1,024 × 1,024 densities take several blocks (each of about 2^22 elements); then its two limits:
/// posteriors that ignore x give ≈ 0, posteriors that never overlap give ≈ log N, the error
/// shrinking with the draws per posterior; and the same noise gives the same estimate.
#[test]
fn mutual_information_equals_the_formula_by_hand_and_its_limits() {
    let device = Default::default();
    let _rng = seeded(9);
    let (m, n, d) = (3, 1024, 5);
    let q = DiagonalGaussian::<F64> {
        mean: Tensor::random([n, d], Distribution::Normal(0.0, 1.0), &device),
        log_var: Tensor::random([n, d], Distribution::Uniform(-2.0, 0.5), &device),
    };
    let eps = Tensor::<F64, 3>::random([m, n, d], Distribution::Normal(0.0, 1.0), &device);
    let (mu, lv, e) = (
        to_vec(q.mean.clone()),
        to_vec(q.log_var.clone()),
        to_vec(eps.clone()),
    );
    let ln_2pi = (2.0 * std::f64::consts::PI).ln();
    let neg_entropy = -(0..n * d)
        .map(|k| 0.5 * (ln_2pi + 1.0 + lv[k]))
        .sum::<f64>()
        / n as f64;
    let mut sum_log_qz = 0.0;
    for s in 0..m {
        for i in 0..n {
            let z: Vec<f64> = (0..d)
                .map(|k| mu[i * d + k] + (0.5 * lv[i * d + k]).exp() * e[(s * n + i) * d + k])
                .collect();
            let log_q: Vec<f64> = (0..n)
                .map(|j| {
                    -0.5 * (0..d)
                        .map(|k| {
                            let (mean, log_var) = (mu[j * d + k], lv[j * d + k]);
                            ln_2pi + log_var + (z[k] - mean).powi(2) / log_var.exp()
                        })
                        .sum::<f64>()
                })
                .collect();
            let max = log_q.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + log_q.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
            sum_log_qz += lse - (n as f64).ln();
        }
    }
    let by_hand = neg_entropy - sum_log_qz / (m * n) as f64;
    let estimate = mutual_information(&q, eps.clone());
    assert!(
        (estimate - by_hand).abs() < 1e-9,
        "{estimate} against {by_hand} by hand"
    );
    assert_eq!(mutual_information(&q, eps), estimate, "same noise, same MI");

    // The limits, with the Monte Carlo error falling as draws per posterior grow.
    let n = 16;
    let apart = DiagonalGaussian::<F64> {
        mean: Tensor::<F64, 1, Int>::arange(0..n as i64, &device)
            .float()
            .reshape([n, 1])
            .repeat_dim(1, 2)
            * 100.0,
        log_var: Tensor::zeros([n, 2], &device),
    };
    let same = DiagonalGaussian::<F64> {
        mean: Tensor::zeros([n, 2], &device),
        log_var: Tensor::zeros([n, 2], &device),
    };
    let error = |q: &DiagonalGaussian<F64>, m: usize, limit: f64| {
        let eps = Tensor::<F64, 3>::random([m, n, 2], Distribution::Normal(0.0, 1.0), &device);
        (mutual_information(q, eps) - limit).abs()
    };
    let ln_n = (n as f64).ln();
    for (q, limit) in [(&apart, ln_n), (&same, 0.0)] {
        let (few, many) = (error(q, 4, limit), error(q, 4096, limit));
        assert!(
            many < 0.03,
            "{many} from {limit} with 4,096 draws per posterior"
        );
        assert!(few > many, "{few} with 4 draws, {many} with 4,096");
    }
}

/// Labels by hand: t0 the base is best; t1 an assistant ties the base (the base keeps it); t2 the
/// second assistant is best; t3 is masked. Two classes occur among n = 3 tokens, the base's twice
/// and the second assistant's once: loss = −((log π_0(t0) + log π_0(t1)) / 2 + log π_2(t2)) / 2.
#[test]
fn pseudo_label_loss_matches_hand_labels_and_only_trains_the_selector() {
    type A = Autodiff<F64>;
    let device = Default::default();
    let log_p = Tensor::<A, 3>::from_data(
        [[
            [-1.0, -2.0, -3.0],
            [-2.0, -2.0, -3.0],
            [-3.0, -2.0, -1.0],
            [-5.0, -1.0, -1.0],
        ]],
        &device,
    )
    .require_grad();
    let log_pi = Tensor::<A, 3>::from_data(
        [[
            [-0.1, -2.0, -3.0],
            [-0.5, -1.0, -2.0],
            [-1.2, -0.9, -0.7],
            [-9.0, -9.0, -9.0],
        ]],
        &device,
    )
    .require_grad();
    let mask = Tensor::<A, 2>::from_data([[1.0, 1.0, 1.0, 0.0]], &device);
    let (loss, share) = pseudo_label_loss(log_pi.clone(), log_p.clone(), mask);
    let expected = -((-0.1 + -0.5) / 2.0 + -0.7) / 2.0;
    assert!((loss.clone().into_scalar() - expected).abs() < 1e-12);
    assert!((share - 1.0 / 3.0).abs() < 1e-12);
    let grads = loss.backward();
    let g = log_pi
        .grad(&grads)
        .unwrap()
        .into_data()
        .to_vec::<f64>()
        .unwrap();
    let mut want = vec![0.0; 12];
    want[0] = -1.0 / 4.0; // t0, base: 1 / (n_present · n_0)
    want[3] = -1.0 / 4.0; // t1, base
    want[8] = -1.0 / 2.0; // t2, second assistant: 1 / (n_present · n_2)
    for (a, b) in g.iter().zip(&want) {
        assert!((a - b).abs() < 1e-12, "{g:?}");
    }
    assert!(log_p.grad(&grads).is_none(), "log P must be a constant");
    // A batch with every target masked out: no labels, a loss of 0 and no share (not 0/0).
    let none = Tensor::<A, 2>::zeros([1, 4], &device);
    let (loss, share) = pseudo_label_loss(log_pi, log_p, none);
    assert_eq!((loss.into_scalar(), share), (0.0, 0.0));
}

#[test]
fn posterior_deferral_sums_one_minus_the_base_share_over_scored_tokens() {
    let device = Default::default();
    let router = Tensor::<F64, 3>::from_data(
        [[
            [0.7, 0.2, 0.1],
            [0.1, 0.5, 0.4],
            [0.5, 0.25, 0.25],
            [0.0, 1.0, 0.0],
        ]],
        &device,
    );
    let mask = Tensor::<F64, 2>::from_data([[1.0, 1.0, 1.0, 0.0]], &device);
    let got = posterior_deferral(router, mask).into_scalar();
    assert!((got - (0.3 + 0.9 + 0.5)).abs() < 1e-12);
}

/// Top-1 probabilities by hand (softmax of (ln 3, ln 1) is (3/4, 1/4)); the confidence rule at
/// τ = 0.5: t0 the base is confident, t1 it is not and the second assistant is the more
/// confident, t2 it is not and the assistants tie (the first writes).
#[test]
fn confidence_routing_follows_the_rule_by_hand() {
    let device = Default::default();
    let logits = Tensor::<F64, 3>::from_data([[[3f64.ln(), 0.0], [0.0, 0.0]]], &device);
    let top1 = top1_probability(logits)
        .into_data()
        .to_vec::<f64>()
        .unwrap();
    assert!((top1[0] - 0.75).abs() < 1e-12 && (top1[1] - 0.5).abs() < 1e-12);
    let top1 = Tensor::<F64, 3>::from_data(
        [[[0.6, 0.9, 0.2], [0.4, 0.3, 0.8], [0.1, 0.7, 0.7]]],
        &device,
    );
    let log_p = Tensor::<F64, 3>::from_data(
        [[[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0], [-7.0, -8.0, -9.0]]],
        &device,
    );
    let (lp, writer) = confidence_routing(top1.clone(), log_p.clone(), 0.5);
    assert_eq!(writer.into_data().to_vec::<i64>().unwrap(), vec![0, 2, 1]);
    assert_eq!(
        lp.into_data().to_vec::<f64>().unwrap(),
        vec![-1.0, -6.0, -8.0]
    );
    // τ = 0 never defers; τ = 1 always does.
    let (_, never) = confidence_routing(top1.clone(), log_p.clone(), 0.0);
    assert_eq!(never.into_data().to_vec::<i64>().unwrap(), vec![0, 0, 0]);
    let (_, always) = confidence_routing(top1, log_p, 1.0);
    assert_eq!(always.into_data().to_vec::<i64>().unwrap(), vec![1, 2, 1]);
}
