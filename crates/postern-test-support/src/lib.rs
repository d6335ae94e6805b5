//! postern-test-support
