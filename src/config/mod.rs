//! Configuration (docs/configuration.md): TOML file + `PLANTGATE__SECTION__KEY` environment
//! overrides, validated in full (every problem reported with its key path),
//! secrets resolved into [`crate::secret::Secret`].

mod keys;
mod load;
pub mod model;
mod render;
mod units;

pub use load::{load, load_from, load_without_secrets, ConfigError, Loaded, Problem, EXIT_CONFIG};
pub use model::*;
pub use render::{render, toml_string};
pub use units::{parse_duration, parse_size};

#[cfg(test)]
mod tests;
