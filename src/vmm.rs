//! placeholder until the module lands in this commit series
