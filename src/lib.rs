//! pid-server's command line and configuration file, as a library for its
//! fuzz targets (`fuzz/`) and tests, which check them without running the
//! binary. Not a stable API: the binary (`src/main.rs`) is the product.
//!
//! # Layout
//!
//! - [`cli`]: the flags, their parsers, and which settings they gave.
//! - [`config_file`]: the configuration file, each value checked by its
//!   flag's parser.
//!
//! The rest of pid-server (its routes, `/metrics`, logging, serving) is
//! the binary's own and stays in it.

pub mod cli;
pub mod config_file;
