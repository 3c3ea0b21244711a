//! Pre-training of single LMs, assistant scoring, joint training (AdamW, schedules, accumulation, clipping, atomic checkpoints, resume), and evaluation (IW-NLL, KL, MI, AU, deferral rate).
//!
//! Not implemented yet: see README.md.
