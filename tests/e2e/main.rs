//! Kiln's end-to-end tests: the real `kiln` binary started as separate
//! processes (dispatcher, observer, runners) talking QUIC with mutual TLS on
//! 127.0.0.1, over real git repositories and real Python.
//!
//! One test binary for all of them keeps build times down; each test gets
//! its own temporary directory, certificates and dispatcher port.

#![allow(clippy::unwrap_used, reason = "a test fails loudly on any unexpected error")]

mod harness;

mod attack;
mod auth;
mod certs;
mod cli;
mod clock;
mod crash;
mod envs;
mod faults;
mod flaky;
mod https;
mod large;
mod limits;
mod links;
mod matrix;
mod output;
mod peers;
mod pipeline;
mod plugin;
mod repo_config;
mod split;
mod status;
mod tap;
mod web;
