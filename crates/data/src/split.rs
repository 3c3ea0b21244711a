//! Deterministic document-level splits.

use crate::rng::{fnv1a, mix64};

/// Which part of a corpus a document belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Training documents.
    Train,
    /// Validation documents.
    Valid,
    /// Test documents.
    Test,
}

/// The split of document `id`: `u = mix64(fnv1a(id)) / 2⁶⁴`; test if `u < test`, valid if
/// `u < test + valid`, else train. A pure function of the id, so every document lands in exactly one
/// split on every machine, and adding documents never moves existing ones.
pub fn split_of(id: &str, valid: f64, test: f64) -> Split {
    // mix64 spreads FNV's weak high bits (ids like `doc-1`, `doc-2` differ in their last bytes).
    let u = mix64(fnv1a(id.as_bytes())) as f64 / 2f64.powi(64);
    if u < test {
        Split::Test
    } else if u < test + valid {
        Split::Valid
    } else {
        Split::Train
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_are_deterministic_disjoint_and_near_their_fractions() {
        let ids: Vec<String> = (0..20_000).map(|i| format!("doc-{i}")).collect();
        let first: Vec<Split> = ids.iter().map(|id| split_of(id, 0.05, 0.05)).collect();
        let again: Vec<Split> = ids.iter().map(|id| split_of(id, 0.05, 0.05)).collect();
        assert_eq!(first, again);
        let count = |s: Split| first.iter().filter(|&&x| x == s).count() as f64 / ids.len() as f64;
        assert!((count(Split::Test) - 0.05).abs() < 0.01);
        assert!((count(Split::Valid) - 0.05).abs() < 0.01);
        // Known values pin the hash: a change would silently reshuffle every corpus.
        assert_eq!(mix64(fnv1a(b"doc-1")), 0xf013_4868_2ab2_8e14);
    }

    #[test]
    fn a_document_at_a_fractions_edge_falls_in_the_split_above_it() {
        // Test is u ∈ [0, test), valid u ∈ [test, test + valid), train the rest.
        let u = mix64(fnv1a(b"doc-1")) as f64 / 2f64.powi(64);
        let above = u * (1.0 + 1e-12);
        assert_eq!(split_of("doc-1", 0.0, u), Split::Train);
        assert_eq!(split_of("doc-1", 0.0, above), Split::Test);
        assert_eq!(split_of("doc-1", u, 0.0), Split::Train);
        assert_eq!(split_of("doc-1", above, 0.0), Split::Valid);
    }
}
