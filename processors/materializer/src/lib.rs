//! The materializer: folds patch events into workflow versions.
