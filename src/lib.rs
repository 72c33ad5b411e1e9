//! chatmask: chat conversations to training arrays, exactly as transformers and the atropos
//! reference would make them, rendered and encoded in Rust.

pub mod batch;
pub mod chat;
pub mod core;
pub mod demo;
pub mod encode;
pub mod error;
pub mod label;
mod python;
pub mod template;
