//! chatmask: chat conversations to training arrays, exactly as transformers and the atropos
//! reference would make them, rendered and encoded in Rust.

pub mod batch;
pub mod chat;
pub mod core;
pub mod demo;
pub mod encode;
pub mod error;
pub mod label;
pub mod pack;
pub mod policy;
mod python;
pub mod rollout;
pub mod rows;
pub mod sanitize;
pub mod spans;
pub mod template;
pub mod truth;

// Tokenization and rendering allocate many small strings; mimalloc is markedly faster than
// glibc malloc for that pattern, especially across rayon threads.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
