//! postern-net
