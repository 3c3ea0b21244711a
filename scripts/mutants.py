#!/usr/bin/env python3
"""Deliberately broken builds: apply each mutation, run the tests that guard it, expect a failure.

    python3 scripts/mutants.py            # every mutation (≈ 1–2 min each on 2 cores)
    python3 scripts/mutants.py resume     # those whose name contains "resume"

Each mutation is (name, file, original text, broken text, cargo test arguments). The script first
runs the guarding tests on the unbroken code (they must pass), then on the broken code (they must
fail); it restores every file afterwards (also on Ctrl-C) and prints a table for docs/reliability.md; it
exits non-zero if a mutation survives (its tests still pass) or no longer applies.
"""
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MUTANTS = [
    (
        "host step: memory slots ignored",
        "crates/lm/src/host_step.rs",
        "    let memory = memory.filter(|m| m.n_slots > 0);",
        "    let memory = memory.filter(|m| m.n_slots > 0 && false);",
        ["-p", "chorus-lm", "--lib", "host_steps_equal"],
    ),
    (
        "host step: every sequence reads the first sequence's memory slots",
        "crates/lm/src/host_step.rs",
        "            let rows = b * m.n_slots * kv..(b + 1) * m.n_slots * kv;",
        "            let rows = 0..m.n_slots * kv;",
        ["-p", "chorus-lm", "--lib", "host_steps_equal"],
    ),
    (
        "host step: memory slots read from the next key/value head",
        "crates/lm/src/host_step.rs",
        "            let (kv, head) = (n_kv_heads * hd, (h / group) * hd..(h / group + 1) * hd);",
        "            let g = (h / group + 1) % n_kv_heads;\n            let (kv, head) = (n_kv_heads * hd, g * hd..(g + 1) * hd);",
        ["-p", "chorus-lm", "--lib", "host_steps_equal"],
    ),
    (
        "host step: every layer reads the first layer's memory slots",
        "crates/lm/src/llama.rs",
        "                let memory = memory.as_ref().map(|m| &m[i]);",
        "                let memory = memory.as_ref().map(|m| &m[0]);",
        ["-p", "chorus-lm", "--lib", "host_steps_equal"],
    ),
    (
        "checkpoint blocks: each member is given the next member's source",
        "crates/model/src/saved.rs",
        "members.zip(&self.manifest.sources)",
        "members.zip(self.manifest.sources.iter().skip(1))",
        ["-p", "chorus-model", "--lib", "only_frozen_members"],
    ),
    (
        "checkpoint blocks: members that train are given blocks too",
        "crates/model/src/saved.rs",
        "            if frozen\n",
        "            if (frozen || true)\n",
        ["-p", "chorus-model", "--lib", "only_frozen_members"],
    ),
    (
        "checkpoint blocks: a `.GGUF` source is not recognised",
        "crates/model/src/saved.rs",
        ".is_some_and(|e| e.eq_ignore_ascii_case(\"gguf\"));",
        ".is_some_and(|e| e == \"gguf\");",
        ["-p", "chorus-model", "--lib", "only_frozen_members"],
    ),
    (
        "attached blocks: the matrices are not compared with the model's weights",
        "crates/lm/src/llama.rs",
        "            if !blocks.equals(&values) {",
        "            if false && !blocks.equals(&values) {",
        ["-p", "chorus-lm", "--lib", "blocks_attach_only"],
    ),
    (
        "attached blocks: a file of another shape is reported as other values",
        "crates/lm/src/llama.rs",
        "            if model != file {",
        "            if false && model != file {",
        ["-p", "chorus-lm", "--lib", "blocks_attach_only"],
    ),
    (
        "attached blocks: the MLP's matrices are not compared",
        "crates/lm/src/llama.rs",
        "                .zip(blocks.mlp.iter().flat_map(|b| b.iter())),",
        "                .zip(blocks.mlp.iter().flat_map(|b| b.iter())).take(0),",
        ["-p", "chorus-lm", "--lib", "blocks_attach_only"],
    ),
    (
        "attached blocks: the output layer is not compared",
        "crates/lm/src/llama.rs",
        "        if let Some(blocks) = output.as_deref() {\n            pairs.push(",
        "        if let Some(blocks) = output.as_deref().filter(|_| false) {\n            pairs.push(",
        ["-p", "chorus-lm", "--lib", "blocks_attach_only"],
    ),
    (
        "lazy freeze: assistants frozen by burn's no_grad (draws their weights)",
        "crates/model/src/chorus.rs",
        "            assistants.into_iter().map(frozen).collect()",
        "            assistants.into_iter().map(|a| a.no_grad()).collect()",
        ["-p", "chorus-model", "--lib", "a_skeleton_draws_no_weights"],
    ),
    (
        "lazy freeze: Chorus::new leaves parameters lazy (clones draw their own values)",
        "crates/model/src/chorus.rs",
        "        Ok(Self::skeleton(config, base, assistants, device)?.number_parameters())",
        "        Ok(Self::skeleton(config, base, assistants, device)?)",
        ["-p", "chorus-model", "--lib", "a_skeleton_draws_no_weights"],
    ),
    (
        "lazy freeze: a frozen model's weights still require a gradient",
        "crates/model/src/chorus.rs",
        "            param.set_require_grad(false)",
        "            param",
        ["-p", "chorus-model", "--lib", "a_skeleton_draws_no_weights"],
    ),
    (
        "host step: a padded step runs on the host, padding ignored",
        "crates/lm/src/llama.rs",
        "                && step.padding.is_none()\n",
        "                && (step.padding.is_none() || true)\n",
        ["-p", "chorus-lm", "--lib", "host_steps_equal"],
    ),
    (
        "weight transpose: the last band of a ragged matrix is left at zero",
        "crates/lm/src/names.rs",
        "            let band_cols = chunk.len() / rows;",
        "            let band_cols = if chunk.len() < 32 * rows { 0 } else { 32 };",
        ["-p", "chorus-lm", "--lib", "transpose_moves_every_value"],
    ),
    (
        "weight transpose: a tile's rows stop at the tile of the first band",
        "crates/lm/src/names.rs",
        "                    for r in r0..(r0 + TILE).min(rows) {",
        "                    for r in r0..(r0 + TILE).min(rows).min(TILE) {",
        ["-p", "chorus-lm", "--lib", "transpose_moves_every_value"],
    ),
    (
        "host step: RoPE rotates the second half the wrong way",
        "crates/lm/src/host_step.rs",
        "                head[i + half] = x2 * cos[i + half] + x1 * sin[i + half];",
        "                head[i + half] = x2 * cos[i + half] - x1 * sin[i + half];",
        ["-p", "chorus-lm", "--lib", "host_steps_equal"],
    ),
    (
        "host step: each query attends to the whole step, future positions included",
        "crates/lm/src/host_step.rs",
        "        let n_keys = start + s + 1;",
        "        let n_keys = start + seq;",
        ["-p", "chorus-lm", "--lib", "host_steps_equal"],
    ),
    (
        "host step: growing the cache forgets the past",
        "crates/lm/src/host_step.rs",
        "                        .copy_from_slice(&old[bg * self.capacity * hd..][..start * hd]);",
        "                        .copy_from_slice(&vec![0.0; start * hd]);",
        ["-p", "chorus-lm", "--lib", "host_steps_equal"],
    ),
    (
        "host step: query heads read the key/value head of the next group",
        "crates/lm/src/host_step.rs",
        "        let base = (b * n_kv_heads + h / group) * cache.capacity * hd;",
        "        let base = (b * n_kv_heads + (h + 1) % n_heads / group) * cache.capacity * hd;",
        ["-p", "chorus-lm", "--lib", "host_steps_equal"],
    ),
    (
        "host step: the MLP's norm reads the attention norm's weights",
        "crates/lm/src/host_step.rs",
        "    let h = rms_norm(x, d_model, &block.norms[1], shape.norm_eps);",
        "    let h = rms_norm(x, d_model, &block.norms[0], shape.norm_eps);",
        ["-p", "chorus-lm", "--lib", "host_steps_equal"],
    ),
    (
        "host step: a cache moved from the backend reads its keys as its values",
        "crates/lm/src/cache.rs",
        "                HostKv::from_buffers(shape, values(key)?, values(value)?)",
        "                HostKv::from_buffers(shape, values(key.clone())?, values(key)?)",
        ["-p", "chorus-lm", "--lib", "host_steps_equal"],
    ),
    (
        "eval --routing: each example's first posterior dropped",
        "crates/cli/src/train.rs",
        "            .zip(posteriors)",
        "            .zip(posteriors.iter().skip(1))",
        ["-p", "chorus-cli", "--test", "bad_input", "router_posteriors"],
    ),
    (
        "eval --routing without a joint model writes nothing, silently",
        "crates/cli/src/train.rs",
        "    if let (Some(path), None) = (args.routing, routed) {",
        "    if let (Some(path), None, false) = (args.routing, routed, true) {",
        ["-p", "chorus-cli", "--test", "bad_input", "router_posteriors"],
    ),
    (
        "eval --composition scores each token with the other model than the rule picks",
        "crates/train/src/eval.rs",
        "        for j in 0..model.n_models() {\n            let input = LmInput::new(batch.tokens.clone()).with_padding(batch.padding.clone());",
        "        for j in (0..model.n_models()).rev() {\n            let input = LmInput::new(batch.tokens.clone()).with_padding(batch.padding.clone());",
        ["-p", "chorus-cli", "--test", "bad_input", "compositions_evaluate"],
    ),
    (
        "bench: the ratio range pairs each run with another pair's twin",
        "xtask/src/bench.rs",
        "        .zip(peers)\n",
        "        .zip(peers.iter().rev())\n",
        ["-p", "xtask", "the_median_run"],
    ),
    (
        "bench: the median of an even count is the upper middle run",
        "xtask/src/bench.rs",
        "        .get((sorted.len().max(1) - 1) / 2)",
        "        .get(sorted.len() / 2)",
        ["-p", "xtask", "the_median_run"],
    ),
    (
        "z at the prior mean: sampled from the prior instead of at its mean",
        "crates/model/src/chorus.rs",
        "        } else if self.config.z_at_prior_mean {",
        "        } else if self.config.z_at_prior_mean && false {",
        ["-p", "chorus-model", "--lib", "z_fixed_at_the_prior_mean"],
    ),
    (
        "z at the prior mean: the posterior kept",
        "crates/model/src/chorus.rs",
        "            posterior: if self.config.z_at_prior_mean {",
        "            posterior: if self.config.z_at_prior_mean && false {",
        ["-p", "chorus-model", "--lib", "z_fixed_at_the_prior_mean"],
    ),
    (
        "z at the prior mean: decoding reads the requested source",
        "crates/model/src/decode.rs",
        "        if self.config.z_at_prior_mean {",
        "        if self.config.z_at_prior_mean && false {",
        ["-p", "chorus-model", "--lib", "z_fixed_at_the_prior_mean"],
    ),
    (
        "seed means: the first evaluation's scores only (the others not added)",
        "crates/train/src/eval.rs",
        "                    *sum += e.log_p;",
        "                    *sum += e.log_p * 0.0;",
        ["-p", "chorus-train", "--lib", "the_mean_of_seed_evaluations"],
    ),
    (
        "seed means: divided by one evaluation too few",
        "crates/train/src/eval.rs",
        "            let count = sources.len() as f64;",
        "            let count = (sources.len() - 1) as f64;",
        ["-p", "chorus-train", "--lib", "the_mean_of_seed_evaluations"],
    ),
    (
        "seed means: rows of other tokens averaged without complaint",
        "crates/train/src/eval.rs",
        "                        .all(|(a, b)| a.index == b.index && a.tokens == b.tokens);",
        "                        .all(|(a, b)| a.index == b.index);",
        ["-p", "chorus-train", "--lib", "the_mean_of_seed_evaluations"],
    ),
    (
        "seeded IW draws: an example's seed depends on its batch",
        "crates/train/src/eval.rs",
        "        let seeds: Vec<u64> = chunk.iter().map(|&i| iw_seed(&set.data[i])).collect();",
        "        let seeds: Vec<u64> = chunk.iter().map(|&i| iw_seed(&set.data[i]) ^ chunk.len() as u64).collect();",
        ["-p", "chorus-train", "--lib", "an_examples_iw_bound"],
    ),
    (
        "seeded IW draws: every row of a batch draws from the first row's generator",
        "crates/model/src/chorus.rs",
        "        let mut rng = SplitMix64(seed);",
        "        let mut rng = SplitMix64(row_seeds[0] ^ seed.min(0));",
        ["-p", "chorus-train", "--lib", "an_examples_iw_bound"],
    ),
    (
        "GQA without copies: query heads grouped with the wrong key/value head",
        "crates/lm/src/attention.rs",
        "        let q = grouped(q);",
        "        let q = grouped(q.reshape([batch, group, n_kv_heads, seq, head_dim]).swap_dims(1, 2).reshape([batch, n_heads, seq, head_dim]));",
        ["-p", "chorus-lm", "--lib", "gqa_equals_mha"],
    ),
    (
        "quantised decode: blocks used for a product that needs a gradient",
        "crates/lm/src/quantised.rs",
        "    if batch * seq > MAX_BLOCK_ROWS || x.is_require_grad() || weights_need_grad {",
        "    if batch * seq > MAX_BLOCK_ROWS {",
        ["-p", "chorus-lm", "--lib", "a_gguf_model_that_trains"],
    ),
    (
        "quantised decode: one pass over several matrices restarts each chunk at row 0",
        "crates/lm/src/quantised.rs",
        "            .for_each(|(m, c, chunk)| rows(m, c * chunk_rows, chunk));",
        "            .for_each(|(m, _c, chunk)| rows(m, 0, chunk));",
        ["-p", "chorus-lm", "--lib", "block_products_equal"],
    ),
    (
        "quantised decode: the AVX2 Q4 kernel drops the min term (one row)",
        "crates/lm/src/quantised.rs",
        "        horizontal_sum(acc) + min_acc",
        "        horizontal_sum(acc)",
        ["-p", "chorus-lm", "--lib", "block_products_equal"],
    ),
    (
        "quantised decode: the AVX2 Q4 tile dequantises without the min",
        "crates/lm/src/quantised.rs",
        "                let weights = |q: __m256i| _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(q), m);",
        "                let weights = |q: __m256i| _mm256_mul_ps(d, _mm256_cvtepi32_ps(q));",
        ["-p", "chorus-lm", "--lib", "block_products_equal"],
    ),
    (
        "quantised decode: a tile's sums forget the odd accumulators",
        "crates/lm/src/quantised.rs",
        "            unsafe { *out.add(i) = horizontal_sum(_mm256_add_ps(even[i], odd[i])) };",
        "            unsafe { *out.add(i) = horizontal_sum(even[i]) };",
        ["-p", "chorus-lm", "--lib", "block_products_equal"],
    ),
    (
        "quantised decode: the last tile of an uneven split is left out",
        "crates/lm/src/quantised.rs",
        "    for t in 0..count {",
        "    for t in 0..count.min(1) {",
        ["-p", "chorus-lm", "--lib", "block_products_equal"],
    ),
    (
        "quantised decode: the AVX-512 Q4 tile dequantises without the min",
        "crates/lm/src/quantised.rs",
        "                let w = [_mm512_fmadd_ps(d, low, m), _mm512_fmadd_ps(d, high, m)];",
        "                let w = [_mm512_mul_ps(d, low), _mm512_mul_ps(d, high)];",
        ["-p", "chorus-lm", "--lib", "block_products_equal"],
    ),
    (
        "quantised decode: the AVX-512 Q8 tile reads the first half twice",
        "crates/lm/src/quantised.rs",
        "                let w = [sixteen(0), sixteen(1)];",
        "                let w = [sixteen(0), sixteen(0)];",
        ["-p", "chorus-lm", "--lib", "block_products_equal"],
    ),
    (
        "quantised decode: the portable Q4 kernel swaps the nibbles",
        "crates/lm/src/quantised.rs",
        "                .map(|(&q, &v)| (q & 0x0f) as f32 * v)",
        "                .map(|(&q, &v)| (q >> 4) as f32 * v)",
        ["-p", "chorus-lm", "--lib", "block_products_equal"],
    ),
    (
        "quantised decode: Q/K blocks keep llama.cpp's row order",
        "crates/lm/src/quantised.rs",
        "    BlockMatrix::from_gguf(gguf, info, sources.as_deref())",
        "    BlockMatrix::from_gguf(gguf, info, sources.as_deref().filter(|_| false))",
        ["-p", "chorus-lm", "--lib", "a_gguf_model_decodes_from_its_blocks"],
    ),
    (
        "quantised decode: the few-row path ignores the blocks",
        "crates/lm/src/quantised.rs",
        "    let blocks = blocks?;",
        "    let blocks = blocks.filter(|_| false)?;",
        ["-p", "chorus-lm", "--lib", "a_gguf_model_decodes_from_its_blocks"],
    ),
    (
        "train_base = false does not freeze the base",
        "crates/model/src/chorus.rs",
        "            base.no_grad()\n",
        "            base\n",
        ["-p", "chorus-model", "--lib", "a_frozen_base_gets_no_gradient"],
    ),
    (
        "chunked eval: a text file's chunks keep chunk-local example indices",
        "crates/cli/src/train.rs",
        "        rows.add(chunk_rows, offset);",
        "        rows.add(chunk_rows, 0);",
        ["-p", "chorus-cli", "--test", "bad_input", "a_long_text_file_is_evaluated_in_chunks"],
    ),
    (
        "chunked eval: the passage count restarts the open-ended context parity per paragraph",
        "crates/data/src/tasks.rs",
        "                Ok(paragraph) => self.pending.extend(crate::sentences(&paragraph)),",
        "                Ok(paragraph) => { self.index = 0; self.passage.clear(); self.pending.extend(crate::sentences(&paragraph)) }",
        ["-p", "chorus-data", "--lib", "text_file_passages_stream"],
    ),
    (
        "chunked eval: merged KL averaged over tokens instead of examples",
        "crates/train/src/eval.rs",
        "        self.kl = by_examples(self.kl, other.kl);",
        "        self.kl = self.kl.zip(other.kl).map(|(a, b)| (a * t_a + b * t_b) / (t_a + t_b));",
        ["-p", "chorus-train", "--lib", "a_chunked_evaluation_merges"],
    ),
    (
        "chunked eval: merged moments forget the between-chunk term",
        "crates/elbo/src/objective.rs",
        "            self.m2[d] += other.m2[d] + delta * delta * n_a * n_b / n;",
        "            self.m2[d] += other.m2[d];",
        ["-p", "chorus-elbo", "--lib", "mutual_information_and_active_units"],
    ),
    (
        "evaluation scores assistants that read z once, as if z-blind",
        "crates/model/src/chorus.rs",
        "            && self.assistant_adapters.is_empty()\n            && batch.assistant_log_probs.is_none()",
        "            && batch.assistant_log_probs.is_none()",
        ["-p", "chorus-train", "--lib", "the_mi_estimate_are_the_same"],
    ),
    (
        "bag-of-words term added to the loss with the wrong sign",
        "crates/elbo/src/objective.rs",
        "    let loss = terms.loss - log_bow.clone().mean() * weight;",
        "    let loss = terms.loss + log_bow.clone().mean() * weight;",
        ["-p", "chorus-model", "--lib", "the_bag_of_words_term"],
    ),
    (
        "bag-of-words term counts the context and padding positions too",
        "crates/elbo/src/objective.rs",
        "    let per_token = log_probs.gather(1, targets) * mask; // [b, seq]",
        "    let per_token = log_probs.gather(1, targets) + mask * 0.0; // [b, seq]",
        ["-p", "chorus-model", "--lib", "the_bag_of_words_term"],
    ),
    (
        "training rows do not log the bag-of-words term",
        "crates/train/src/step.rs",
        "                    *window.bag_of_words.get_or_insert(0.0) +=",
        "                    *window.bag_of_words.get_or_insert(0.0) += 0.0 *",
        ["-p", "chorus-train", "--lib", "the_bag_of_words_term_is_logged"],
    ),
    (
        "MI estimate: draws that change from run to run instead of the examples' seeds",
        "crates/train/src/eval.rs",
        "                let eps = seeded_noise(MI_DRAWS, &s.seeds, model",
        "                let eps = seeded_noise(MI_DRAWS, &s.seeds.iter().map(|&x| x ^ std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64).collect::<Vec<u64>>(), model",
        ["-p", "chorus-train", "--lib", "the_mi_estimate_are_the_same"],
    ),
    (
        "MI estimate: log q(z) averaged over the N posteriors' draws of one sample only",
        "crates/elbo/src/objective.rs",
        "    neg_entropy - sum_log_qz / (m * n) as f64",
        "    neg_entropy - sum_log_qz / n as f64",
        ["-p", "chorus-elbo", "--lib", "mutual_information_equals_the_formula"],
    ),
    (
        "MI estimate: each block's draws start at the first draw",
        "crates/elbo/src/objective.rs",
        "        let z = z.clone().narrow(0, start, rows).expand([rows, n, d_latent]); // [i, j, d]",
        "        let z = z.clone().narrow(0, 0, rows).expand([rows, n, d_latent]); // [i, j, d]",
        ["-p", "chorus-elbo", "--lib", "mutual_information_equals_the_formula"],
    ),
    (
        "chunked eval: merged deferral weighted by examples",
        "crates/train/src/eval.rs",
        "            .map(|(a, b)| (a * t_a + b * t_b) / (t_a + t_b).max(1.0));",
        "            .map(|(a, b)| (a * n_a + b * n_b) / (n_a + n_b).max(1.0));",
        ["-p", "chorus-train", "--lib", "a_chunked_evaluation_merges"],
    ),
    (
        "the selector's learning-rate scale is ignored",
        "crates/train/src/step.rs",
        "    if settings.selector_lr_scale != 1.0",
        "    if false && settings.selector_lr_scale != 1.0",
        ["-p", "chorus-train", "--lib", "the_selector_steps_at_its_own"],
    ),
    (
        "concurrent writers of one score cache do not take turns",
        "crates/train/src/scores.rs",
        "    lock.lock().map_err(|e| TrainError::io(&lock_path, e))?;",
        "    drop(lock);",
        ["-p", "chorus-train", "--lib", "concurrent_writers_of_one_score_cache"],
    ),
    (
        "the oracle takes the worst model at each token",
        "crates/train/src/eval.rs",
        "                    .fold(f64::NEG_INFINITY, f64::max)",
        "                    .fold(f64::INFINITY, f64::min)",
        ["-p", "chorus-train", "--lib", "the_oracle_takes_the_best_model"],
    ),
    (
        "evaluation's assistant score cache is filled from the base instead of the assistants",
        "crates/train/src/eval.rs",
        "        (1..model.n_models()).map(|j| model.member(j)).collect();",
        "        (1..model.n_models()).map(|_| model.member(0)).collect();",
        ["-p", "chorus-train", "--lib", "the_oracle_takes_the_best_model"],
    ),
    (
        "router posteriors recorded one position early",
        "crates/train/src/eval.rs",
        "                    .map(|t| values[(r * seq + t) * k..(r * seq + t + 1) * k].to_vec())",
        "                    .map(|t| values[(r * seq + t - 1) * k..(r * seq + t) * k].to_vec())",
        ["-p", "chorus-train", "--lib", "evaluation_matches_a_joint_model"],
    ),
    (
        "a static selector reads the hidden state",
        "crates/latent/src/selector.rs",
        "                log_softmax(bias.reshape([1, 1, k]), 2).expand([batch, seq, k])",
        "                log_softmax(self.proj.forward(hidden), 2) + (0 * (batch + seq + k)) as f32",
        ["-p", "chorus-latent", "--lib", "a_static_selector"],
    ),
    (
        "continued pre-training ignores its init weights",
        "crates/train/src/run.rs",
        "            (lm, path.display().to_string())",
        "            (config.model.init::<B>(device)?, path.display().to_string() + &format!(\"{:?}\", lm.dims().d_model))",
        ["-p", "chorus-cli", "--test", "bad_input", "continued_pre_training_starts"],
    ),
    (
        "a saved tokenizer drops its BOS",
        "crates/lm/src/tokenizer.rs",
        "        if let Some(bos) = self.bos {",
        "        if let Some(bos) = self.bos.filter(|_| false) {",
        ["-p", "chorus-lm", "--lib", "a_saved_gguf_tokenizer_keeps_its_bos"],
    ),
    (
        "a server assistant is accepted without a score cache",
        "crates/train/src/config.rs",
        "            if self.scores.is_none() {",
        "            if false && self.scores.is_none() {",
        ["-p", "chorus-train", "--lib", "bad_configs_are_clear_errors"],
    ),
    (
        "chorus eval pairs the first model with itself",
        "crates/train/src/eval.rs",
        "paired.push(paired_difference(first, other, resamples, seed)?);",
        "paired.push(paired_difference(first, first, resamples, seed + 0 * other.examples as u64)?);",
        ["-p", "chorus-cli", "--test", "bad_input", "flags_that_cannot_apply"],
    ),
    (
        "the paired bootstrap does not resample",
        "crates/train/src/eval.rs",
        ".map(|_| ratio(&mut (0..n).map(|_| &pairs[rng.index(n)])))",
        ".map(|_| ratio(&mut pairs.iter().take(n + 0 * rng.index(1))))",
        ["-p", "chorus-train", "--lib", "paired_bootstrap_intervals"],
    ),
    (
        "bits per byte computed in nats",
        "crates/train/src/eval.rs",
        "bits_per_byte: -log_p / (std::f64::consts::LN_2 * s.bytes.max(1) as f64),",
        "bits_per_byte: -log_p / (s.bytes.max(1) as f64),",
        ["-p", "chorus-train", "--lib", "evaluation_matches_a_joint_model"],
    ),
    (
        "a remote assistant's log-probs taken from a local model instead of its server",
        "crates/model/src/chorus.rs",
        ".chain(remotes.iter().map(|r| r.token_log_probs(&rows, None)))",
        ".chain(remotes.iter().map(|_| self.member(1).token_log_probs(&rows, None)))",
        ["-p", "chorus-model", "--lib", "a_remote_assistant_stands_in"],
    ),
    (
        "GPT-2's fused c_attn split into the wrong thirds",
        "crates/lm/src/names.rs",
        "                    .flat_map(|row| &row[part * width..(part + 1) * width])",
        "                    .flat_map(|row| &row[(2 - part) * width..(3 - part) * width])",
        ["-p", "chorus-lm", "--lib", "hugging_face_round_trip"],
    ),
    (
        "GGUF Q/K rows not un-permuted",
        "crates/lm/src/names.rs",
        "        Ok(unpermute_rows(&values, n, *rows, *cols))",
        "        Ok(unpermute_rows(&values, 1, *rows, *cols))",
        ["-p", "chorus-lm", "--lib", "a_llama_written_as_gguf"],
    ),
    (
        "a loaded model keeps its fresh initialisation",
        "crates/model/src/saved.rs",
        "            skeleton.load_record(record)",
        "            {\n                let _loaded = skeleton.clone().load_record(record);\n                skeleton\n            }",
        ["-p", "chorus-model", "--lib", "a_saved_model_loads"],
    ),
    (
        "interpolated z weighs the references the wrong way round",
        "crates/model/src/decode.rs",
        "posterior_mean(from)?.mul_scalar(1.0 - alpha)",
        "posterior_mean(from)?.mul_scalar(alpha)",
        ["-p", "chorus-model", "--lib", "decoding_z_comes_from"],
    ),
    (
        "a saved model's checksums are not checked on load",
        "crates/model/src/saved.rs",
        "            if &actual != expected {",
        "            if false && &actual != expected {",
        ["-p", "chorus-model", "--lib", "a_saved_model_loads"],
    ),
    (
        "remote scores read one echoed log-prob too late",
        "crates/model/src/remote.rs",
        "let first = 1;",
        "let first = 2;",
        ["-p", "chorus-train", "--test", "remote_scores", "healthy"],
    ),
    (
        "a half-written score cache is started over instead of continued",
        "crates/train/src/scores.rs",
        ".filter(|p| p.fingerprint == fingerprint && p.n_assistants == k)",
        ".filter(|_| false)",
        ["-p", "chorus-train", "--test", "remote_scores", "failures"],
    ),
    (
        "the remote tokenizer probe is skipped",
        "crates/model/src/remote.rs",
        "        if served != local {",
        "        if false && served != local {",
        ["-p", "chorus-train", "--test", "remote_scores", "tokenizes_differently"],
    ),
    (
        "remote requests are not retried",
        "crates/model/src/remote.rs",
        "        for attempt in 0..=self.settings.retries {",
        "        for attempt in 0..1 {",
        ["-p", "chorus-train", "--test", "remote_scores", "retried"],
    ),
    (
        "resume ignores the checkpoint's parameters",
        "crates/train/src/checkpoint.rs",
        "        model: loaded.model,\n",
        "        model: fresh.clone(),\n",
        ["-p", "chorus-train", "--lib", "resume_is_bit_identical"],
    ),
    (
        "resume restarts from step 0",
        "crates/train/src/run.rs",
        "(state.step, state.best, state.tokens_seen, state.window)",
        "(0, state.best, state.tokens_seen, state.window)",
        ["-p", "chorus-train", "--lib", "resume_is_bit_identical"],
    ),
    (
        "metric sums restart with the process",
        "crates/train/src/run.rs",
        "(state.step, state.best, state.tokens_seen, state.window)",
        "(state.step, state.best, state.tokens_seen, MetricWindow::default())",
        ["-p", "chorus-train", "--lib", "resume_is_bit_identical"],
    ),
    (
        "a torn metrics line is kept",
        "crates/train/src/metrics.rs",
        "            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())",
        "            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap_or(serde_json::json!({\"step\": 0})))",
        ["-p", "chorus-train", "--lib", "resume_is_bit_identical"],
    ),
    (
        "random parameter ids (checkpoint bytes differ between equal runs)",
        "crates/model/src/chorus.rs",
        "        }\n        .number_parameters())",
        "        })",
        ["-p", "chorus-train", "--lib", "resume_is_bit_identical"],
    ),
    (
        "JSON floats parsed without float_roundtrip (one ulp off after resume)",
        "Cargo.toml",
        'serde_json = { version = "1", features = ["float_roundtrip"] }',
        'serde_json = { version = "1" }',
        ["-p", "chorus-train", "--lib", "checkpoint_state_round_trips"],
    ),
    (
        "accumulated losses not divided by the number of micro-batches",
        "crates/train/src/step.rs",
        "let grads = loss.div_scalar(n_micro).backward();",
        "let grads = loss.backward();",
        ["-p", "chorus-train", "--lib", "accumulating_two_batches"],
    ),
    (
        "clipping scales by max_norm / ‖g‖²",
        "crates/train/src/grads.rs",
        "scale(module, grads, max_norm / (norm + 1e-6));",
        "scale(module, grads, max_norm / (norm * norm + 1e-6));",
        ["-p", "chorus-train", "--lib", "clipping_scales"],
    ),
    (
        "keep_last keeps one checkpoint too many",
        "crates/train/src/checkpoint.rs",
        "all.len().saturating_sub(keep_last)",
        "all.len().saturating_sub(keep_last + 1)",
        ["-p", "chorus-train", "--lib", "keep_last_prunes"],
    ),
    (
        "best/ follows the latest validation, not the lowest",
        "crates/train/src/run.rs",
        "let is_best = valid_nll.is_some_and(|v| best.is_none_or(|(_, b)| v < b));",
        "let is_best = valid_nll.is_some();",
        ["-p", "chorus-train", "--lib", "keep_last_prunes"],
    ),
    (
        "no check of the gradient norm",
        "crates/train/src/step.rs",
        "    if !norm.is_finite() {\n",
        "    if false && !norm.is_finite() {\n",
        ["-p", "chorus-train", "--lib", "every_non_finite_branch"],
    ),
    (
        "no check of the validation NLL",
        "crates/train/src/run.rs",
        "            if !nll.is_finite() {\n",
        "            if false && !nll.is_finite() {\n",
        ["-p", "chorus-train", "--lib", "every_non_finite_branch"],
    ),
    (
        "score cache rows shifted by one example",
        "crates/train/src/batch.rs",
        "            let values = scores.example(id)?;",
        "            let values = scores.example(id ^ 1)?;",
        ["-p", "chorus-train", "--lib", "training_on_the_score_cache"],
    ),
    (
        "selector reads a negated hidden state",
        "crates/model/src/chorus.rs",
        "            Some(selector) => selector.forward(base.hidden),",
        "            Some(selector) => selector.forward(base.hidden.neg()),",
        ["-p", "chorus-model", "--lib", "without_z_k2_is_co_llm"],
    ),
    (
        "no gradient through the base LM's logits",
        "crates/model/src/chorus.rs",
        "let mut log_p = vec![token_log_probs(base.logits, targets.clone())];",
        "let mut log_p = vec![token_log_probs(base.logits.detach(), targets.clone())];",
        ["-p", "chorus-model", "--lib", "elbo_gradients_match_finite_differences"],
    ),
    (
        "no gradient through memory keys",
        "crates/lm-adapters/src/lib.rs",
        "let keys = split(key.forward(z.clone()));",
        "let keys = split(key.forward(z.clone()).detach());",
        ["-p", "chorus-model", "--lib", "elbo_gradients_match_finite_differences"],
    ),
    (
        "free bits pass gradient through clamped dimensions (straight-through)",
        "crates/elbo/src/objective.rs",
        "        kl.clamp_min(lambda)\n",
        "        kl.clone().detach().clamp_min(lambda) + kl.clone() - kl.detach()\n",
        ["-p", "chorus-model", "--lib", "with_free_bits"],
    ),
    (
        "lazy catch-up decodes assistants without z",
        "crates/model/src/assistant.rs",
        "            let (logits, _) = self.model.step(tokens, self.z.clone(), cache)?;",
        "            let (logits, _) = self.model.step(tokens, None, cache)?;",
        ["-p", "chorus-model", "--lib", "cached_decoding_equals_full_recomputation"],
    ),
    (
        "a stopped row keeps being sampled",
        "crates/model/src/decode.rs",
        "                if config.eos == Some(token) || !keep_going {",
        "                if config.eos == Some(token) && !keep_going {",
        ["-p", "chorus-model", "--lib", "cached_decoding_equals_full_recomputation"],
    ),
    (
        "top-p keeps one token too few",
        "crates/model/src/decode.rs",
        "(kept < top_p * total || rank == 0)",
        "(kept + p[i] < top_p * total || rank == 0)",
        ["-p", "chorus-model", "--lib", "truncation_keeps_the_top_k_and_the_smallest_nucleus"],
    ),
    (
        "tokenizer identity ignores the pre-tokenizer",
        "crates/lm/src/tokenizer.rs",
        '            "pre_tokenizer",\n',
        "",
        ["-p", "chorus-lm", "--lib", "tokenizers_of_one_chorus_must_match"],
    ),
    (
        "tokenizer identity ignores the normaliser",
        "crates/lm/src/tokenizer.rs",
        '            "normalizer",\n',
        "",
        ["-p", "chorus-train", "--lib", "vocab_mismatch_and_missing_corpus"],
    ),
    (
        "evaluation's deferral counts the base's share",
        "crates/elbo/src/routing.rs",
        "    (base.neg().add_scalar(1.0) * mask).sum()",
        "    (base * mask).sum()",
        ["-p", "chorus-train", "--lib", "evaluation_matches_a_joint_model"],
    ),
    (
        "evaluation's NLL divided by examples, not tokens",
        "crates/train/src/eval.rs",
        "let nll = -log_p / s.tokens.max(1) as f64;",
        "let nll = -log_p / s.examples.max(1) as f64;",
        ["-p", "chorus-train", "--lib", "evaluation_matches_a_joint_model"],
    ),
    (
        "calibration without the always-defer candidate",
        "crates/model/src/calibrate.rs",
        "        let (nll, deferral) = score(0.0);",
        "        let (nll, deferral) = score(1.0);",
        ["-p", "chorus-train", "--lib", "calibration_finds_the_known_optimum"],
    ),
    (
        "calibration keeps the worst candidate",
        "crates/model/src/calibrate.rs",
        "            .min_by(|a, b| a.nll.total_cmp(&b.nll))",
        "            .max_by(|a, b| a.nll.total_cmp(&b.nll))",
        ["-p", "chorus-train", "--lib", "calibration_finds_the_known_optimum"],
    ),
    (
        "an interrupted download is kept (pip takes it as downloaded)",
        "crates/data/src/fetch.rs",
        "        std::fs::remove_file(&path).map_err(|e| DataError::io(&path, e))?;\n",
        "",
        ["-p", "chorus-data", "--lib", "an_interrupted_download"],
    ),
    (
        "GGUF Q/K rows left in llama.cpp's permuted order",
        "crates/lm/src/names.rs",
        "        let Layout::RopeLinear { kv } = self else {",
        "        let Layout::RopeLinear { kv } = Layout::Same else {",
        ["-p", "chorus-cli", "--test", "smollm2_reference", "smollm2_matches"],
    ),
    (
        "smollm pre-tokenizer does not split digits",
        "crates/lm/src/tokenizer.rs",
        "Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()",
        "Sequence::new(vec![byte_level.into()]).into()",
        # (SmolLM2's own vocabulary has no multi-digit tokens, so its fixture cannot tell.)
        ["-p", "chorus-lm", "--lib", "gguf_tokenizer_keeps_control_tokens_digits"],
    ),
    (
        "eval ignores --max-examples for text files",
        "crates/cli/src/train.rs",
        "                Some(n) if n > 0 && n < total => {",
        "                Some(n) if false && n > 0 && n < total => {",
        ["-p", "chorus-cli", "--test", "bad_input", "flags_that_cannot_apply"],
    ),
    (
        "few-row matmul adds a stray term (row-major weights)",
        "vendor/burn-ndarray/src/ops/matmul.rs",
        "                        *y = *y + a * w;",
        "                        *y = *y + a * w + a;",
        ["-p", "chorus-lm", "--lib", "few_row_strided_and_folded_matmuls"],
    ),
    (
        "few-row matmul drops the last product (transposed weights)",
        "vendor/burn-ndarray/src/ops/matmul.rs",
        "                    *y = dot(x, &self.rhs[j * k..(j + 1) * k]);",
        "                    *y = dot(x, &self.rhs[j * k..(j + 1) * k - 1]);",
        ["-p", "chorus-lm", "--lib", "few_row_strided_and_folded_matmuls"],
    ),
    (
        "recip through burn-ndarray's approximate SIMD kernel again",
        "vendor/burn-ndarray/src/ops/base.rs",
        "        let array = tensor.map(|x| 1.elem::<E>() / *x);",
        "        let tensor = dispatch_unary_simd!(E, crate::ops::simd::unary::RecipVec, tensor, f32);\n        let array = tensor.map(|x| 1.elem::<E>() / *x);",
        ["-p", "chorus-train", "--lib", "gradients_are_bitwise_reproducible"],
    ),
    (
        "element-wise ranges over threads leave out the uneven last range",
        "vendor/burn-ndarray/src/parallel.rs",
        "        (0..len.div_ceil(PAR_CHUNK))",
        "        (0..len / PAR_CHUNK)",
        ["-p", "chorus-lm", "--lib", "large_element_wise"],
    ),
    (
        "a threaded map of a shared input copies instead of applying the function",
        "vendor/burn-ndarray/src/parallel.rs",
        "                *y = f(*x);",
        "                *y = *x;",
        ["-p", "chorus-lm", "--lib", "large_element_wise"],
    ),
    (
        "a threaded binary operation reads every range's right operand from the start",
        "vendor/burn-ndarray/src/ops/simd/binary.rs",
        "            rhs.range(start, end),",
        "            rhs.range(0, end - start),",
        ["-p", "chorus-lm", "--lib", "large_element_wise"],
    ),
    (
        "a threaded in-place operation with a scalar rewrites the first range only",
        "vendor/burn-ndarray/src/ops/simd/binary_elemwise.rs",
        "        binary_scalar_slice_inplace::<T, Out, Op>(slice.range_mut(start, end), elem, PhantomData)",
        "        binary_scalar_slice_inplace::<T, Out, Op>(slice.range_mut(0, end - start), elem, PhantomData)",
        ["-p", "chorus-lm", "--lib", "large_element_wise"],
    ),
    (
        "slices lose their steps (a view over every position in the range)",
        "vendor/burn-ndarray/src/ops/base.rs",
        "        tensor.slice_move(slices.as_slice())",
        "        let slices: Vec<SliceInfoElem> = slices.into_iter().map(|s| match s { SliceInfoElem::Slice { start, end, .. } => SliceInfoElem::Slice { start, end, step: 1 }, other => other }).collect();\n        tensor.slice_move(slices.as_slice())",
        ["-p", "chorus-lm", "--lib", "slices_are_views"],
    ),
    (
        "batched products fold the right operand's batches in column-major order",
        "vendor/burn-ndarray/src/ops/matmul.rs",
        "        .to_shape((num_r_batches, k, n))",
        "        .to_shape(((num_r_batches, k, n), ndarray::Order::ColumnMajor))",
        ["-p", "chorus-lm", "--lib", "slices_are_views"],
    ),
    (
        "the GEMM (gemm crate) scales its product by 2",
        "vendor/burn-ndarray/src/ops/matmul.rs",
        "            1.0.elem::<E>(),\n            false,",
        "            2.0.elem::<E>(),\n            false,",
        ["-p", "chorus-lm", "--lib", "few_row_strided_and_folded_matmuls"],
    ),
    (
        "the GEMM reads the left operand's strides swapped",
        "vendor/burn-ndarray/src/ops/matmul.rs",
        "            ls[1],\n            ls[0],",
        "            ls[0],\n            ls[1],",
        ["-p", "chorus-lm", "--lib", "few_row_strided_and_folded_matmuls"],
    ),
    (
        "batched GEMM multiplies every batch by the first batch's right operand",
        "vendor/burn-ndarray/src/ops/matmul.rs",
        "            let r_batch = strides_rhs.flatten(&out_index);",
        "            let r_batch = strides_rhs.flatten(&out_index) * 0;",
        ["-p", "chorus-lm", "--lib", "few_row_strided_and_folded_matmuls"],
    ),
    (
        "a GEMM split over threads skips its parallel split's work (threads > 1 computes nothing)",
        "vendor/burn-ndarray/src/ops/matmul.rs",
        "        t if t > 1 && m * n * k >= 1 << 18 => gemm::Parallelism::Rayon(t),",
        "        t if t > 1 && m * n * k >= 1 << 18 => return,",
        ["-p", "chorus-lm", "--lib", "few_row_strided_and_folded_matmuls"],
    ),
    (
        "xtask reruns steps whose output exists",
        "xtask/src/main.rs",
        "            if step.output.exists() {",
        "            if false && step.output.exists() {",
        ["-p", "xtask", "run_lanes_skips_done_steps"],
    ),
    (
        "xtask report: the run's time sums overlapping steps",
        "xtask/src/report.rs",
        "            busy += end - start.max(covered_to);",
        "            busy += end - start;",
        ["-p", "xtask", "busy_seconds_counts"],
    ),
    (
        "xtask report: the cpu preset trains every live variant",
        "xtask/src/report.rs",
        "        ReportPreset::Cpu => &LIVE_VARIANTS[..1],",
        "        ReportPreset::Cpu => &LIVE_VARIANTS,",
        ["-p", "xtask", "the_cpu_preset_trains_one_live_variant"],
    ),
    (
        "xtask gives a step that runs alone one thread",
        "xtask/src/main.rs",
        "            if workers > 1 && others > 0 {",
        "            if workers > 1 {",
        ["-p", "xtask", "run_lanes_skips_done_steps"],
    ),
    (
        "a growing KV cache forgets the past",
        "crates/lm/src/cache.rs",
        "                        Some(old) if start > 0 => grown.slice_assign(",
        "                        Some(old) if start > usize::MAX / 2 => grown.slice_assign(",
        ["-p", "chorus-lm", "--lib", "cached_decoding_across_buffer_growth"],
    ),
    (
        "the confidence rule always defers to the first assistant",
        "crates/model/src/decode.rs",
        "*w = Some(1 + argmax(&confidence));",
        "*w = Some(1 + 0 * argmax(&confidence));",
        ["-p", "chorus-model", "--lib", "a_composition_with_the_confidence_rule"],
    ),
    (
        "pseudo-labels give ties to the assistant",
        "crates/elbo/src/routing.rs",
        "best_j.mask_fill(best.lower_equal(lp0), 0)",
        "best_j.mask_fill(best.lower(lp0), 0)",
        ["-p", "chorus-elbo", "--lib", "pseudo_label_loss_matches"],
    ),
    (
        "posterior deferral reads model 1's share",
        "crates/elbo/src/routing.rs",
        "    let base = router.narrow(2, 0, 1).squeeze_dim::<2>(2);",
        "    let base = router.narrow(2, 1, 1).squeeze_dim::<2>(2);",
        ["-p", "chorus-elbo", "--lib", "posterior_deferral_sums"],
    ),
]


def run(name, file, original, broken, args):
    path = ROOT / file
    text = path.read_text()
    if text.count(original) != 1:
        return "does not apply"
    # The guarding tests must pass on the unbroken code, or "caught" would mean nothing (a test
    # that failed for another reason once counted a mutation as caught).
    baseline = subprocess.run(
        ["cargo", "test", *args[:-1], "--", args[-1]],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if baseline.returncode != 0 or "test result: ok" not in baseline.stdout:
        return "FAILS WITHOUT THE MUTATION"
    path.write_text(text.replace(original, broken))
    try:
        started = time.time()
        result = subprocess.run(
            ["cargo", "test", *args[:-1], "--", args[-1]],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        took = time.time() - started
        if result.returncode == 0:
            return f"SURVIVED ({took:.0f} s)"
        if "error[" in result.stderr and "could not compile" in result.stderr:
            return "does not compile"
        # Only a failing test counts: a build that dies for another reason (a full disk, a
        # linker crash) says nothing about the mutation.
        if "test result: FAILED" in result.stdout + result.stderr:
            return f"caught ({took:.0f} s)"
        return f"NO TEST RAN (exit {result.returncode}): {result.stderr.strip().splitlines()[-1:]}"
    finally:
        path.write_text(text)


def main():
    only = sys.argv[1] if len(sys.argv) > 1 else ""
    bad = 0
    print("| mutation | file | test | result |\n|---|---|---|---|")
    for name, file, original, broken, args in MUTANTS:
        if only not in name:
            continue
        outcome = run(name, file, original, broken, args)
        bad += not outcome.startswith("caught")
        print(f"| {name} | `{file}` | `{args[-1]}` | {outcome} |", flush=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
