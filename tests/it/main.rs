//! Multi-process tests: the real `distributed-cache` binary on free loopback ports, driven by
//! real gRPC clients (tonic, and grpcurl). One binary keeps link time down.

mod api;
mod batching;
mod cli;
mod cluster;
mod config;
mod degraded;
mod grpcurl;
mod h2client;
mod h2conformance;
mod histories;
mod interop;
mod limits;
mod memory;
mod metrics;
mod movement;
mod security;
mod shutdown;
mod smart_client;
mod steering;
mod support;
mod taskset;
