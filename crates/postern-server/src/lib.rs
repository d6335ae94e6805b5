//! postern-server
