//! Classifiers: map what went wrong to the contract's reasons.

pub mod token;
