//! Command-line front ends that more than one binary shares.
#![forbid(unsafe_code)]

pub mod sandbox;
