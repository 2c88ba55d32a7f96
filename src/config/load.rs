//! Loading and validation (docs/configuration.md, docs/guarantees.md).
//!
//! The `config` crate merges the TOML text with `PLANTGATE__SECTION__KEY`
//! environment overrides; the merged tree is then walked by hand instead of
//! deserialized with serde, because serde stops at the first error while an
//! operator fixing a config wants every problem at once, each with its key
//! path. Secrets are resolved here so the rest of the program only ever sees
//! a `Secret`.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ::config::{Map, Source, Value, ValueKind};

use super::keys::{
    self, AGENT_KEYS, BUFFER_KEYS, HEALTH_KEYS, MQTT_KEYS, TAG_KEYS, TOP_KEYS, UNIT_KEYS,
    WORK_CENTER_KEYS,
};
use super::model::*;
use super::units::{parse_duration, parse_size};
use crate::nodeid::NodeRef;
use crate::record::EventType;
use crate::secret::Secret;

/// EX_CONFIG from sysexits.h; systemd's `RestartPreventExitStatus=78` keys on it.
pub const EXIT_CONFIG: i32 = 78;

const ENV_PREFIX: &str = "PLANTGATE";
/// The origin the `config` crate stamps on values from environment variables.
const ENV_ORIGIN: &str = "the environment";

/// Loss is never silent by default (docs/guarantees.md): `source.dropped` is on.
const DEFAULT_EVENTS: [EventType; 6] = [
    EventType::ConnectionStatusChanged,
    EventType::ConnectionAuthRequired,
    EventType::SyncCompleted,
    EventType::SystemError,
    EventType::SourceDropped,
    EventType::BackfillCompleted,
];

const PASSWORD_KEYS: [&str; 4] = [
    "password",
    "password_env",
    "password_file",
    "password_credential",
];

/// A successfully loaded configuration plus things worth a log line at start
/// (inline secrets, trust-on-first-use, plaintext MQTT).
#[derive(Clone, Debug)]
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<String>,
}

/// One thing wrong with the configuration, named by its key path
/// (`connections[1].endpoint`). Messages never contain secret values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found, not just the first; `plantgate` prints them one per
/// line and exits with [`EXIT_CONFIG`].
#[derive(Clone, Debug)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl ConfigError {
    fn single(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            problems: vec![Problem {
                path: path.into(),
                message: message.into(),
            }],
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.problems.is_empty() {
            return f.write_str("invalid configuration");
        }
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// What a load resolves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Everything, secrets and TLS files included (`run`, `check`).
    Full,
    /// Everything but secrets and TLS files, which are checked for form
    /// only and left out (`password` is `None`): for commands that only
    /// read the buffer, run by an operator outside the service, where
    /// `$CREDENTIALS_DIRECTORY` or the service's key files are not at hand.
    WithoutSecrets,
}

/// Reads the TOML file plus `PLANTGATE__SECTION__KEY` overrides from the
/// process environment; secrets come from the process environment, files or
/// `$CREDENTIALS_DIRECTORY`.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    load_mode(path, Mode::Full)
}

/// Like [`load`], but neither reads secrets nor opens the TLS files: every
/// password is `None`. For `plantgate buffer ...`, which needs only
/// `agent.data_dir` and `[buffer]`.
pub fn load_without_secrets(path: &Path) -> Result<Loaded, ConfigError> {
    load_mode(path, Mode::WithoutSecrets)
}

fn load_mode(path: &Path, mode: Mode) -> Result<Loaded, ConfigError> {
    let label = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        let message = if e.kind() == std::io::ErrorKind::NotFound {
            "config file not found (pass -c FILE or set PLANTGATE_CONFIG)".to_string()
        } else {
            format!("cannot read config file: {e}")
        };
        ConfigError::single(label.clone(), message)
    })?;
    let mut env = HashMap::new();
    let mut problems = Vec::new();
    for (key, value) in std::env::vars_os() {
        let Ok(key) = key.into_string() else { continue };
        match value.into_string() {
            Ok(value) => {
                env.insert(key, value);
            }
            // Only our own overrides matter enough to refuse; the value is
            // not shown, it could be a secret.
            Err(_) if is_override_var(&key) => problems.push(Problem {
                path: key,
                message: "environment variable is not valid UTF-8".into(),
            }),
            Err(_) => {}
        }
    }
    if !problems.is_empty() {
        return Err(ConfigError { problems });
    }
    load_text(&text, &label, &env, mode)
}

/// Like [`load`], fully injected: `env` serves the `PLANTGATE__` overrides,
/// `password_env` look-ups and `CREDENTIALS_DIRECTORY`.
pub fn load_from(toml_text: &str, env: &HashMap<String, String>) -> Result<Loaded, ConfigError> {
    load_text(toml_text, "config", env, Mode::Full)
}

fn is_override_var(key: &str) -> bool {
    let prefix = format!("{ENV_PREFIX}__");
    key.len() > prefix.len() && key.to_ascii_uppercase().starts_with(&prefix)
}

/// `PLANTGATE__CONNECTIONS__0__ENDPOINT` -> `PLANTGATE__CONNECTIONS[0]__ENDPOINT`:
/// the `config` crate only understands the bracket form, which shells cannot
/// export, and would otherwise replace the whole array with a table.
fn index_segments(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 4);
    for (i, segment) in key.split("__").enumerate() {
        let is_index = i > 1 && !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit());
        if is_index {
            out.push('[');
            out.push_str(segment);
            out.push(']');
        } else {
            if i > 0 {
                out.push_str("__");
            }
            out.push_str(segment);
        }
    }
    out
}

/// The variable that sets `path`, for messages about overrides.
fn env_var_for(path: &str) -> String {
    let mut name = format!("{ENV_PREFIX}__");
    for c in path.chars() {
        match c {
            '.' | '[' => name.push_str("__"),
            ']' => {}
            c => name.push(c.to_ascii_uppercase()),
        }
    }
    name
}

fn load_text(
    text: &str,
    label: &str,
    env: &HashMap<String, String>,
    mode: Mode,
) -> Result<Loaded, ConfigError> {
    // Collected into `config::Map` rather than passed as a HashMap so this
    // keeps compiling if anything enables the crate's `preserve_order`.
    let env_map: Map<String, String> = env
        .iter()
        .filter(|(k, _)| is_override_var(k))
        .map(|(k, v)| (index_segments(k), v.clone()))
        .collect();
    let built = ::config::Config::builder()
        .add_source(::config::File::from_str(text, ::config::FileFormat::Toml))
        // No `try_parsing`: it would turn `PLANTGATE__AGENT__ID=007` into the
        // integer 7. Values from the environment stay strings and the walker
        // converts them where a bool or number is expected.
        .add_source(
            ::config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .ignore_empty(true)
                .source(Some(env_map)),
        )
        .build()
        .and_then(|c| c.collect());
    let root = match built {
        Ok(root) => root,
        Err(::config::ConfigError::FileParse { cause, .. }) => {
            return Err(ConfigError::single(
                label,
                format!("invalid TOML: {}", scrub_toml_error(&cause.to_string())),
            ))
        }
        Err(e) => return Err(ConfigError::single(label, e.to_string())),
    };

    let mut w = Walker {
        env,
        mode,
        suggested: HashSet::new(),
        problems: Vec::new(),
        warnings: Vec::new(),
    };
    let config = w.root(&root);
    if w.problems.is_empty() {
        Ok(Loaded {
            config,
            warnings: w.warnings,
        })
    } else {
        Err(ConfigError {
            problems: w.problems,
        })
    }
}

/// The TOML parser quotes the offending source line, which may hold a
/// password; keep only its position and its explanation.
fn scrub_toml_error(message: &str) -> String {
    let is_snippet = |line: &str| {
        let t = line.trim_start();
        let t = t
            .trim_start_matches(|c: char| c.is_ascii_digit())
            .trim_start();
        t.starts_with('|') || t.is_empty()
    };
    message
        .lines()
        .filter(|l| !is_snippet(l))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("; ")
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

fn describe(v: &Value) -> &'static str {
    match v.kind {
        ValueKind::Nil => "nothing",
        ValueKind::Boolean(_) => "a boolean",
        ValueKind::I64(_) | ValueKind::I128(_) | ValueKind::U64(_) | ValueKind::U128(_) => {
            "an integer"
        }
        ValueKind::Float(_) => "a float",
        ValueKind::String(_) => "a string",
        ValueKind::Table(_) => "a table",
        ValueKind::Array(_) => "an array",
    }
}

fn from_env(v: &Value) -> bool {
    v.origin() == Some(ENV_ORIGIN)
}

fn get<'t>(t: Option<&'t Map<String, Value>>, key: &str) -> Option<&'t Value> {
    t.and_then(|t| t.get(key))
        .filter(|v| !matches!(v.kind, ValueKind::Nil))
}

fn is_ident(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

fn suggest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    let lower = key.to_lowercase();
    known
        .iter()
        .map(|k| (levenshtein(&lower, k), *k))
        .filter(|(d, _)| *d <= 2 && *d < lower.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

type Table = Map<String, Value>;

struct Walker<'e> {
    env: &'e HashMap<String, String>,
    mode: Mode,
    /// Paths offered as "did you mean"; their absence is not reported again.
    suggested: HashSet<String>,
    problems: Vec<Problem>,
    warnings: Vec<String>,
}

impl Walker<'_> {
    fn problem(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    fn check_keys(&mut self, table: &Table, prefix: &str, known: &[&str]) {
        let mut unknown: Vec<(&String, &Value)> = table
            .iter()
            .filter(|(k, _)| !known.contains(&k.as_str()))
            .collect();
        // The map is unordered; sorted output keeps runs reproducible.
        unknown.sort_by(|a, b| a.0.cmp(b.0));
        for (key, value) in unknown {
            let mut message = "unknown key".to_string();
            if from_env(value) {
                message.push_str(&format!(
                    " (set by environment variable {})",
                    env_var_for(&join(prefix, key))
                ));
            }
            if let Some(s) = suggest(key, known) {
                message.push_str(&format!(", did you mean \"{s}\"?"));
                if !table.contains_key(s) {
                    self.suggested.insert(join(prefix, s));
                }
            }
            self.problem(join(prefix, key), message);
        }
    }

    /// A sub-table; absent is fine (defaults apply), anything else is reported.
    fn section<'t>(&mut self, t: Option<&'t Table>, prefix: &str, key: &str) -> Option<&'t Table> {
        match get(t, key) {
            None => None,
            Some(Value {
                kind: ValueKind::Table(inner),
                ..
            }) => Some(inner),
            Some(v) => {
                let found = describe(v);
                self.problem(
                    join(prefix, key),
                    format!("expected a table, found {found}"),
                );
                None
            }
        }
    }

    /// Elements of an array of tables, each with its indexed path.
    fn table_array<'t>(
        &mut self,
        t: Option<&'t Table>,
        prefix: &str,
        key: &str,
    ) -> Vec<(String, &'t Table)> {
        let path = join(prefix, key);
        match get(t, key) {
            None => Vec::new(),
            Some(Value {
                kind: ValueKind::Array(items),
                ..
            }) => {
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    let item_path = format!("{path}[{i}]");
                    match &item.kind {
                        ValueKind::Table(inner) => out.push((item_path, inner)),
                        _ => {
                            let found = describe(item);
                            self.problem(item_path, format!("expected a table, found {found}"));
                        }
                    }
                }
                out
            }
            Some(v) => {
                let found = describe(v);
                self.problem(
                    path,
                    format!("expected an array of tables ([[{key}]]), found {found}"),
                );
                Vec::new()
            }
        }
    }

    fn string(&mut self, t: Option<&Table>, prefix: &str, key: &str) -> Option<String> {
        let v = get(t, key)?;
        match &v.kind {
            ValueKind::String(s) => Some(s.clone()),
            _ => {
                let found = describe(v);
                self.problem(
                    join(prefix, key),
                    format!("expected a string, found {found}"),
                );
                None
            }
        }
    }

    /// A string that must be present and not blank.
    fn required(
        &mut self,
        t: Option<&Table>,
        prefix: &str,
        key: &str,
        hint: &str,
    ) -> Option<String> {
        match get(t, key) {
            // `urll` already said "did you mean url": one typo, one problem.
            None if self.suggested.contains(&join(prefix, key))
                || self.suggested.contains(prefix) =>
            {
                None
            }
            None => {
                self.problem(join(prefix, key), format!("required{hint}"));
                None
            }
            Some(_) => {
                let s = self.string(t, prefix, key)?;
                if s.trim().is_empty() {
                    self.problem(join(prefix, key), "must not be empty");
                    return None;
                }
                Some(s)
            }
        }
    }

    /// An optional string that, when given, must not be blank.
    fn optional(&mut self, t: Option<&Table>, prefix: &str, key: &str) -> Option<String> {
        let s = self.string(t, prefix, key)?;
        if s.trim().is_empty() {
            self.problem(
                join(prefix, key),
                "must not be empty (leave the key out instead)",
            );
            return None;
        }
        Some(s)
    }

    /// `[A-Za-z0-9_-]+`, required: ids and names that end up in MQTT topics.
    fn ident(&mut self, t: Option<&Table>, prefix: &str, key: &str) -> Option<String> {
        let s = self.required(t, prefix, key, "")?;
        if !is_ident(&s) {
            self.problem(
                join(prefix, key),
                format!("{s:?} may only contain letters, digits, '_' and '-' (it is used in MQTT topics)"),
            );
            return None;
        }
        Some(s)
    }

    fn bool(&mut self, t: Option<&Table>, prefix: &str, key: &str, default: bool) -> bool {
        let Some(v) = get(t, key) else {
            return default;
        };
        match &v.kind {
            ValueKind::Boolean(b) => *b,
            // Environment variables are always text.
            ValueKind::String(s) if from_env(v) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => true,
                "false" | "0" | "no" | "off" => false,
                _ => {
                    self.problem(
                        join(prefix, key),
                        format!("expected true or false, found {s:?}"),
                    );
                    default
                }
            },
            _ => {
                let found = describe(v);
                self.problem(
                    join(prefix, key),
                    format!("expected true or false, found {found}"),
                );
                default
            }
        }
    }

    fn duration(&mut self, t: Option<&Table>, prefix: &str, key: &str) -> Option<Duration> {
        let v = get(t, key)?;
        match &v.kind {
            ValueKind::String(s) => match parse_duration(s) {
                Ok(d) => Some(d),
                Err(e) => {
                    self.problem(join(prefix, key), e);
                    None
                }
            },
            _ => {
                let found = describe(v);
                self.problem(
                    join(prefix, key),
                    format!(
                        "expected a duration string such as \"30s\" or \"500ms\", found {found}"
                    ),
                );
                None
            }
        }
    }

    /// A duration with a default and a lower bound (inclusive).
    fn duration_at_least(
        &mut self,
        t: Option<&Table>,
        prefix: &str,
        key: &str,
        default: Duration,
        min: Duration,
    ) -> Duration {
        match self.duration(t, prefix, key) {
            None => default,
            Some(d) if d < min => {
                let message = if min == Duration::from_millis(1) {
                    "must be greater than zero".to_string()
                } else {
                    format!("must be at least {}", human_duration::format(min))
                };
                self.problem(join(prefix, key), message);
                default
            }
            Some(d) => d,
        }
    }

    fn size(&mut self, t: Option<&Table>, prefix: &str, key: &str) -> Option<u64> {
        let v = get(t, key)?;
        let parsed = match &v.kind {
            ValueKind::String(s) => parse_size(s),
            ValueKind::I64(n) => u64::try_from(*n).map_err(|_| format!("size {n} is negative")),
            ValueKind::U64(n) => Ok(*n),
            _ => Err(format!(
                "expected a size such as \"128KiB\" or \"1GiB\", found {}",
                describe(v)
            )),
        };
        match parsed {
            Ok(n) => Some(n),
            Err(e) => {
                self.problem(join(prefix, key), e);
                None
            }
        }
    }

    /// A whole number >= 0. TOML integers only (not `"100"`, not `1e5`): a
    /// count written as a string or a float is more likely a mistake than a
    /// choice; environment variables are text and parsed.
    fn unsigned(&mut self, t: Option<&Table>, prefix: &str, key: &str) -> Option<u64> {
        let v = get(t, key)?;
        let parsed = match &v.kind {
            ValueKind::I64(n) => u64::try_from(*n).map_err(|_| format!("{n} is negative")),
            ValueKind::U64(n) => Ok(*n),
            ValueKind::String(s) if from_env(v) => s
                .trim()
                .parse::<u64>()
                .map_err(|_| format!("expected a whole number, found {s:?}")),
            _ => Err(format!("expected a whole number, found {}", describe(v))),
        };
        match parsed {
            Ok(n) => Some(n),
            Err(e) => {
                self.problem(join(prefix, key), e);
                None
            }
        }
    }

    fn number(&mut self, t: Option<&Table>, prefix: &str, key: &str) -> Option<f64> {
        let v = get(t, key)?;
        let n = match &v.kind {
            ValueKind::Float(f) => Some(*f),
            ValueKind::I64(i) => Some(*i as f64),
            ValueKind::U64(i) => Some(*i as f64),
            ValueKind::String(s) if from_env(v) => s.trim().parse::<f64>().ok(),
            _ => None,
        };
        if n.is_none() {
            let found = describe(v);
            self.problem(
                join(prefix, key),
                format!("expected a number, found {found}"),
            );
        }
        n
    }

    fn string_array(&mut self, t: Option<&Table>, prefix: &str, key: &str) -> Option<Vec<String>> {
        let v = get(t, key)?;
        let path = join(prefix, key);
        match &v.kind {
            ValueKind::Array(items) => {
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    match &item.kind {
                        ValueKind::String(s) => out.push(s.clone()),
                        _ => {
                            let found = describe(item);
                            self.problem(
                                format!("{path}[{i}]"),
                                format!("expected a string, found {found}"),
                            );
                        }
                    }
                }
                Some(out)
            }
            // An environment variable can only carry a comma-separated list.
            ValueKind::String(s) if from_env(v) => Some(
                s.split(',')
                    .map(|p| p.trim().to_string())
                    .filter(|p| !p.is_empty())
                    .collect(),
            ),
            _ => {
                let found = describe(v);
                self.problem(path, format!("expected an array of strings, found {found}"));
                None
            }
        }
    }

    /// A path to a file that must exist and be readable now, not at first use
    /// hours later.
    fn readable_file(&mut self, t: Option<&Table>, prefix: &str, key: &str) -> Option<PathBuf> {
        let s = self.optional(t, prefix, key)?;
        let path = PathBuf::from(&s);
        if self.mode == Mode::WithoutSecrets {
            return Some(path);
        }
        match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => {
                self.problem(
                    join(prefix, key),
                    format!("{s} is a directory, expected a file"),
                );
                return None;
            }
            Ok(_) => {}
            Err(e) => {
                self.problem(join(prefix, key), format!("cannot read {s}: {e}"));
                return None;
            }
        }
        if let Err(e) = std::fs::File::open(&path) {
            self.problem(join(prefix, key), format!("cannot read {s}: {e}"));
            return None;
        }
        Some(path)
    }

    /// Resolves at most one of `password`, `password_env`, `password_file`,
    /// `password_credential`. Messages name variables and files, never values.
    fn password(&mut self, t: Option<&Table>, prefix: &str) -> Option<Secret> {
        let given: Vec<&str> = PASSWORD_KEYS
            .iter()
            .copied()
            .filter(|k| get(t, k).is_some())
            .collect();
        if given.len() > 1 {
            let list = given.join(", ");
            for key in &given[1..] {
                self.problem(
                    join(prefix, key),
                    format!("give only one password source (found {list})"),
                );
            }
            return None;
        }
        let key = *given.first()?;
        let path = join(prefix, key);
        let value = self.string(t, prefix, key)?;
        if value.is_empty() {
            self.problem(path, "must not be empty");
            return None;
        }
        if self.mode == Mode::WithoutSecrets {
            if key == "password_credential" && !is_credential_name(&value) {
                self.problem(
                    path,
                    format!("{value:?} must be a credential name, not a path"),
                );
            }
            return None;
        }
        match key {
            "password" => {
                self.warnings.push(format!(
                    "{path}: inline secret in the config file; use password_env, password_file or password_credential"
                ));
                Some(Secret::new(value))
            }
            "password_env" => match self.env.get(&value) {
                Some(secret) if !secret.is_empty() => Some(Secret::new(secret.clone())),
                Some(_) => {
                    self.problem(path, format!("environment variable {value} is empty"));
                    None
                }
                None => {
                    self.problem(path, format!("environment variable {value} is not set"));
                    None
                }
            },
            "password_file" => {
                self.warn_if_exposed(&path, Path::new(&value), "password file");
                self.secret_file(&path, Path::new(&value))
            }
            _ => {
                if !is_credential_name(&value) {
                    self.problem(
                        path,
                        format!("{value:?} must be a credential name, not a path"),
                    );
                    return None;
                }
                match self.env.get("CREDENTIALS_DIRECTORY") {
                    Some(dir) if !dir.is_empty() => {
                        let file = Path::new(dir).join(&value);
                        self.secret_file(&path, &file)
                    }
                    _ => {
                        self.problem(
                            path,
                            format!(
                                "CREDENTIALS_DIRECTORY is not set, so credential {value:?} cannot be read \
                                 (systemd sets it for LoadCredential=)"
                            ),
                        );
                        None
                    }
                }
            }
        }
    }

    /// ssh's rule for private keys, as a warning: a secret file anyone but
    /// its owner may read has leaked already, or will. Names the file and
    /// its mode, never its content.
    fn warn_if_exposed(&mut self, path: &str, file: &Path, what: &str) {
        if self.mode != Mode::Full {
            return;
        }
        if let Some(mode) = crate::secret::exposed_mode(file) {
            self.warnings.push(format!(
                "{path}: {file} is accessible by group or others (mode {mode:04o}); a {what} should be \
                 readable by its owner only: chmod 600 {file} (or pass it as a systemd credential)",
                file = file.display()
            ));
        }
    }

    fn secret_file(&mut self, path: &str, file: &Path) -> Option<Secret> {
        match std::fs::read_to_string(file) {
            Ok(text) => {
                // Editors and `echo` add a final newline that is not part of
                // the password.
                let trimmed = text
                    .strip_suffix("\r\n")
                    .or_else(|| text.strip_suffix('\n'))
                    .unwrap_or(&text);
                if trimmed.is_empty() {
                    self.problem(path, format!("{} is empty", file.display()));
                    return None;
                }
                Some(Secret::new(trimmed))
            }
            Err(e) => {
                self.problem(path, format!("cannot read {}: {e}", file.display()));
                None
            }
        }
    }

    fn root(&mut self, root: &Table) -> Config {
        self.check_keys(root, "", TOP_KEYS);
        let top = Some(root);
        let agent_t = self.section(top, "", "agent");
        let health_t = self.section(top, "", "health");
        let mqtt_t = self.section(top, "", "mqtt");
        let buffer_t = self.section(top, "", "buffer");

        let agent = self.agent(agent_t);
        let health = self.health(health_t);
        let mqtt = self.mqtt(mqtt_t);
        let buffer = self.buffer(buffer_t);

        let mut connections = Vec::new();
        let mut ids: HashMap<String, String> = HashMap::new();
        for (path, t) in self.table_array(top, "", "connections") {
            let c = self.connection(t, &path);
            if !c.id.is_empty() {
                if let Some(first) = ids.get(&c.id) {
                    self.problem(
                        join(&path, "id"),
                        format!(
                            "duplicate connection id {:?} (already used by {first})",
                            c.id
                        ),
                    );
                } else {
                    ids.insert(c.id.clone(), path.clone());
                }
            }
            connections.push(c);
        }

        if mqtt.format == MqttFormat::SparkplugB {
            self.sparkplug_names(&connections);
        }

        Config {
            agent,
            health,
            mqtt,
            buffer,
            connections,
        }
    }

    /// In Sparkplug B a device's metrics share one name space: a tag may
    /// not take the name of the derived records' metrics
    /// (docs/sparkplug.md).
    fn sparkplug_names(&mut self, connections: &[ConnectionConfig]) {
        const DERIVED: [&str; 4] = ["batch", "recipe", "oee", "downtime"];
        for (i, c) in connections.iter().enumerate() {
            for (j, tag) in c.tags.iter().enumerate() {
                if DERIVED.contains(&tag.name.as_str()) {
                    self.problem(
                        format!("connections[{i}].tags[{j}].name"),
                        format!(
                            "{:?} is the name of a derived record's metric with mqtt.format = \"sparkplug_b\"; rename the tag",
                            tag.name
                        ),
                    );
                }
            }
        }
    }

    fn agent(&mut self, t: Option<&Table>) -> AgentConfig {
        let p = "agent";
        if let Some(t) = t {
            self.check_keys(t, p, AGENT_KEYS);
        }
        let id = self.ident(t, p, "id").unwrap_or_default();
        let site = self.ident(t, p, "site").unwrap_or_default();
        let data_dir = self
            .optional(t, p, "data_dir")
            .unwrap_or_else(|| "/var/lib/plantgate".into());
        AgentConfig {
            id,
            site,
            data_dir: PathBuf::from(data_dir),
        }
    }

    fn health(&mut self, t: Option<&Table>) -> HealthConfig {
        let p = "health";
        if let Some(t) = t {
            self.check_keys(t, p, HEALTH_KEYS);
        }
        let default: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 9870));
        let listen = match self.string(t, p, "listen") {
            None => default,
            Some(s) => match s.trim().parse::<SocketAddr>() {
                Ok(a) => a,
                Err(_) => {
                    self.problem(
                        join(p, "listen"),
                        format!("{s:?} is not an IP:port address (e.g. \"127.0.0.1:9870\" or \"[::1]:9870\")"),
                    );
                    default
                }
            },
        };
        if !listen.ip().is_loopback() {
            self.warnings.push(format!(
                "{}: {listen} is not a loopback address; /status and /metrics answer without \
                 authentication to anyone who can reach it",
                join(p, "listen")
            ));
        }
        HealthConfig { listen }
    }

    fn mqtt(&mut self, t: Option<&Table>) -> MqttConfig {
        let p = "mqtt";
        if let Some(t) = t {
            self.check_keys(t, p, MQTT_KEYS);
        }
        let allow_plaintext = self.bool(t, p, "allow_plaintext", false);
        let (url, host, port, tls) = self.mqtt_url(t, p, allow_plaintext);
        let (ca_file, client_cert_file, client_key_file) = self.mqtt_tls_files(t, p);
        let username = self.optional(t, p, "username");
        let password = self.password(t, p);
        let protocol = self.mqtt_protocol(t, p, username.is_some());

        let topic_prefix = match self.string(t, p, "topic_prefix") {
            None => "plantgate".to_string(),
            Some(s) => {
                if let Err(e) = check_topic_prefix(&s) {
                    self.problem(join(p, "topic_prefix"), e);
                }
                s
            }
        };
        let keep_alive = match self.duration(t, p, "keep_alive") {
            None => Duration::from_secs(30),
            // MQTT carries keep-alive as whole seconds in a u16.
            Some(d) if d < Duration::from_secs(1) || d > Duration::from_secs(65_535) => {
                self.problem(join(p, "keep_alive"), "must be between 1s and 65535s");
                Duration::from_secs(30)
            }
            Some(d) => d,
        };
        let heartbeat_interval = self.duration_at_least(
            t,
            p,
            "heartbeat_interval",
            Duration::from_secs(30),
            Duration::from_millis(1),
        );
        let max_message_bytes = self.max_message_bytes(t, p);
        let (reconnect_initial, reconnect_max) = self.backoff(t, p);
        let replay_max_records = match self.unsigned(t, p, "replay_max_records") {
            None => 100_000,
            Some(0) => {
                self.problem(
                    join(p, "replay_max_records"),
                    "must be at least 1 (a replay request asks for one record or more)",
                );
                100_000
            }
            Some(n) => n,
        };

        let format = match self.string(t, p, "format") {
            None => MqttFormat::Json,
            Some(s) => match s.trim() {
                "json" => MqttFormat::Json,
                "sparkplug_b" => MqttFormat::SparkplugB,
                _ => {
                    self.problem(
                        join(p, "format"),
                        format!("{s:?} is not \"json\" or \"sparkplug_b\""),
                    );
                    MqttFormat::Json
                }
            },
        };

        MqttConfig {
            url: url.unwrap_or_default(),
            host,
            port,
            tls,
            allow_plaintext,
            ca_file,
            client_cert_file,
            client_key_file,
            username,
            password,
            protocol,
            topic_prefix,
            keep_alive,
            heartbeat_interval,
            max_message_bytes,
            reconnect_initial,
            reconnect_max,
            replay_max_records,
            format,
        }
    }

    /// `url` as given plus its host, port and TLS flag; plaintext only with
    /// `allow_plaintext` (docs/configuration.md, "[mqtt]").
    fn mqtt_url(
        &mut self,
        t: Option<&Table>,
        p: &str,
        allow_plaintext: bool,
    ) -> (Option<String>, String, u16, bool) {
        let url = self.required(t, p, "url", " (e.g. \"mqtts://broker.example.com:8883\")");
        let (host, port, tls) = match url.as_deref().map(parse_mqtt_url) {
            Some(Ok(parsed)) => parsed,
            Some(Err(e)) => {
                self.problem(join(p, "url"), e);
                (String::new(), 8883, true)
            }
            None => (String::new(), 8883, true),
        };
        if url.is_some() && !host.is_empty() && !tls {
            if allow_plaintext {
                self.warnings.push(
                    "mqtt.url: plaintext MQTT (allow_plaintext = true): credentials and data are not encrypted"
                        .into(),
                );
            } else {
                self.problem(
                    join(p, "url"),
                    "mqtt:// is plaintext and refused; use mqtts:// or set mqtt.allow_plaintext = true",
                );
            }
        }
        (url, host, port, tls)
    }

    /// `ca_file`, `client_cert_file`, `client_key_file`; mutual TLS needs
    /// both of the client's.
    fn mqtt_tls_files(
        &mut self,
        t: Option<&Table>,
        p: &str,
    ) -> (Option<PathBuf>, Option<PathBuf>, Option<PathBuf>) {
        let ca_file = self.readable_file(t, p, "ca_file");
        let client_cert_file = self.readable_file(t, p, "client_cert_file");
        let client_key_file = self.readable_file(t, p, "client_key_file");
        if let Some(key) = &client_key_file {
            self.warn_if_exposed(&join(p, "client_key_file"), key, "private key");
        }
        match (get(t, "client_cert_file"), get(t, "client_key_file")) {
            (Some(_), None) => self.problem(
                join(p, "client_key_file"),
                "required when client_cert_file is set (mutual TLS needs both)",
            ),
            (None, Some(_)) => self.problem(
                join(p, "client_cert_file"),
                "required when client_key_file is set (mutual TLS needs both)",
            ),
            _ => {}
        }
        (ca_file, client_cert_file, client_key_file)
    }

    fn mqtt_protocol(&mut self, t: Option<&Table>, p: &str, has_username: bool) -> MqttProtocol {
        let protocol = match self.string(t, p, "protocol") {
            None => MqttProtocol::V5,
            Some(s) => match s.trim().to_ascii_lowercase().as_str() {
                "v5" => MqttProtocol::V5,
                "v311" => MqttProtocol::V311,
                _ => {
                    self.problem(
                        join(p, "protocol"),
                        format!("{s:?} is not \"v5\" or \"v311\""),
                    );
                    MqttProtocol::V5
                }
            },
        };
        // MQTT 3.1.1 (3.1.2.9) forbids a password without a user name.
        if protocol == MqttProtocol::V311 && !has_username && get(t, "username").is_none() {
            if let Some(key) = PASSWORD_KEYS.iter().find(|k| get(t, k).is_some()) {
                let key = *key;
                self.problem(
                    join(p, "username"),
                    format!("required with {key} when protocol = \"v311\""),
                );
            }
        }
        protocol
    }

    fn max_message_bytes(&mut self, t: Option<&Table>, p: &str) -> usize {
        const DEFAULT: usize = 128 * 1024;
        const MIN_MSG: u64 = 1024;
        const MAX_MSG: u64 = 256 * 1024 * 1024;
        match self.size(t, p, "max_message_bytes") {
            None => DEFAULT,
            Some(n) if !(MIN_MSG..=MAX_MSG).contains(&n) => {
                self.problem(
                    join(p, "max_message_bytes"),
                    format!("{n} bytes is outside 1KiB..256MiB"),
                );
                DEFAULT
            }
            Some(n) => usize::try_from(n).unwrap_or(DEFAULT),
        }
    }

    fn backoff(&mut self, t: Option<&Table>, p: &str) -> (Duration, Duration) {
        let one_ms = Duration::from_millis(1);
        let before = self.problems.len();
        let initial =
            self.duration_at_least(t, p, "reconnect_initial", Duration::from_secs(1), one_ms);
        let max = self.duration_at_least(t, p, "reconnect_max", Duration::from_secs(60), one_ms);
        // A value already reported as unparsable is not compared again.
        let both_valid = self.problems.len() == before;
        if !both_valid || max >= initial {
            return (initial, max);
        }
        if get(t, "reconnect_max").is_some() {
            self.problem(
                join(p, "reconnect_max"),
                format!(
                    "must be at least reconnect_initial ({})",
                    human_duration::format(initial)
                ),
            );
        } else {
            self.problem(
                join(p, "reconnect_initial"),
                format!(
                    "must not exceed reconnect_max ({})",
                    human_duration::format(max)
                ),
            );
        }
        (initial, max)
    }

    fn buffer(&mut self, t: Option<&Table>) -> BufferConfig {
        let p = "buffer";
        if let Some(t) = t {
            self.check_keys(t, p, BUFFER_KEYS);
        }
        let default_size = 1u64 << 30;
        let max_size = match self.size(t, p, "max_size") {
            None => default_size,
            Some(0) => {
                self.problem(join(p, "max_size"), "must be greater than zero");
                default_size
            }
            Some(n) => n,
        };
        let max_age = self.duration_at_least(
            t,
            p,
            "max_age",
            Duration::from_secs(7 * 86_400),
            Duration::from_millis(1),
        );
        let synchronous = match self.string(t, p, "synchronous") {
            None => Synchronous::Normal,
            Some(s) => match s.trim().to_ascii_lowercase().as_str() {
                "normal" => Synchronous::Normal,
                "full" => Synchronous::Full,
                _ => {
                    self.problem(
                        join(p, "synchronous"),
                        format!("{s:?} is not \"normal\" or \"full\""),
                    );
                    Synchronous::Normal
                }
            },
        };
        let headroom_warning = self
            .duration(t, p, "headroom_warning")
            .unwrap_or(Duration::from_secs(3_600));
        // Zero is allowed: acknowledged records are deleted on PUBACK.
        let retain_delivered = self
            .duration(t, p, "retain_delivered")
            .unwrap_or(Duration::from_secs(86_400));
        BufferConfig {
            max_size,
            max_age,
            synchronous,
            headroom_warning,
            retain_delivered,
        }
    }

    fn connection(&mut self, table: &Table, p: &str) -> ConnectionConfig {
        self.check_keys(table, p, &keys::connection_key_names());
        let t = Some(table);
        let id = self.ident(t, p, "id").unwrap_or_default();
        let kind = self.connection_kind(table, p);

        let endpoint = self.required(t, p, "endpoint", " (e.g. \"opc.tcp://10.1.2.3:4840\")");
        if let Some(e) = &endpoint {
            if let Err(message) = check_opc_endpoint(e) {
                self.problem(join(p, "endpoint"), message);
            }
        }

        let (security_policy, security_mode) = self.security(t, p);
        let (username, password) = self.opc_identity(t, p);

        let trust_unknown_server_cert = self.bool(t, p, "trust_unknown_server_cert", false);
        if trust_unknown_server_cert {
            self.warnings.push(format!(
                "{}: the first certificate each endpoint presents is trusted and pinned (pki/pinned/); a different one later is refused. For trials only: the first contact is not verified",
                join(p, "trust_unknown_server_cert")
            ));
        }

        let publishing_interval = self.duration_at_least(
            t,
            p,
            "publishing_interval",
            Duration::from_millis(500),
            Duration::from_millis(1),
        );
        // OPC UA reads a sampling interval of 0 as "as fast as practical".
        let sampling_interval = self
            .duration(t, p, "sampling_interval")
            .unwrap_or(Duration::from_millis(250));
        let (reconnect_initial, reconnect_max) = self.backoff(t, p);
        let events = self.events(t, p);
        let backfill = match self.string(t, p, "backfill") {
            None => Backfill::Off,
            Some(s) => match s.trim() {
                "off" => Backfill::Off,
                "history" => Backfill::History,
                _ => {
                    self.problem(
                        join(p, "backfill"),
                        format!("{s:?} is not \"off\" or \"history\""),
                    );
                    Backfill::Off
                }
            },
        };
        let backfill_max = self.duration_at_least(
            t,
            p,
            "backfill_max",
            Duration::from_secs(3_600),
            Duration::from_millis(1),
        );
        let profile = self.profile(t, p, kind);

        let mut tags = Vec::new();
        let mut tag_names = HashSet::new();
        for (tp, tt) in self.table_array(t, p, "tags") {
            tags.push(self.tag(tt, &tp, &mut tag_names));
        }

        ConnectionConfig {
            id,
            endpoint: endpoint.unwrap_or_default(),
            security_policy,
            security_mode,
            username,
            password,
            trust_unknown_server_cert,
            publishing_interval,
            sampling_interval,
            reconnect_initial,
            reconnect_max,
            events,
            backfill,
            backfill_max,
            tags,
            profile,
        }
    }

    /// `kind`, and every key set here that this kind does not accept
    /// (docs/configuration.md: a key of another kind is an error). None when
    /// `kind` is missing or unknown, which is reported.
    fn connection_kind(&mut self, table: &Table, p: &str) -> Option<ConnectionKind> {
        let s = self.required(Some(table), p, "kind", " (deltav, optomes or generic)")?;
        let Some(kind) = ConnectionKind::parse(&s) else {
            let known: Vec<&str> = ConnectionKind::ALL.iter().map(|k| k.as_str()).collect();
            self.problem(
                join(p, "kind"),
                format!("{s:?} is not one of {}", known.join(", ")),
            );
            return None;
        };
        for entry in keys::CONNECTION_KEYS {
            if !table.contains_key(entry.name) {
                continue;
            }
            if let Some(message) = keys::kind_mismatch(entry.name, kind) {
                self.problem(join(p, entry.name), message);
            }
        }
        Some(kind)
    }

    /// `username` and the password; OPC UA sends a password only inside a
    /// UserName identity token, so a password needs a user name.
    fn opc_identity(&mut self, t: Option<&Table>, p: &str) -> (Option<String>, Option<Secret>) {
        let username = self.optional(t, p, "username");
        let password = self.password(t, p);
        if get(t, "username").is_none() {
            if let Some(key) = PASSWORD_KEYS.iter().find(|k| get(t, k).is_some()) {
                let key = *key;
                self.problem(join(p, "username"), format!("required with {key}"));
            }
        }
        (username, password)
    }

    /// The connection's `events`, de-duplicated in the order given.
    fn events(&mut self, t: Option<&Table>, p: &str) -> Vec<EventType> {
        let Some(list) = self.string_array(t, p, "events") else {
            return DEFAULT_EVENTS.to_vec();
        };
        let mut out: Vec<EventType> = Vec::new();
        for (i, e) in list.into_iter().enumerate() {
            match EventType::parse(&e) {
                None => {
                    let known: Vec<&str> = EventType::ALL.iter().map(|e| e.as_str()).collect();
                    self.problem(
                        format!("{}[{i}]", join(p, "events")),
                        format!("unknown event type {e:?} (known: {})", known.join(", ")),
                    );
                }
                Some(e) if !out.contains(&e) => out.push(e),
                Some(_) => {}
            }
        }
        out
    }

    /// The kind's own keys. Every profile key is read whatever the kind, so a
    /// key of another kind with a bad value reports both problems at once;
    /// the result keeps only this kind's. An unknown kind yields `Generic`
    /// (the load fails anyway, its problem was reported).
    fn profile(
        &mut self,
        t: Option<&Table>,
        p: &str,
        kind: Option<ConnectionKind>,
    ) -> ProfileConfig {
        let node_template = self.optional(t, p, "node_template");
        if let Some(tpl) = &node_template {
            if let Err(e) = check_node_template(tpl, kind) {
                self.problem(join(p, "node_template"), e);
            }
        }
        let oee_window = self.duration_at_least(
            t,
            p,
            "oee_window",
            Duration::from_secs(60),
            Duration::from_secs(1),
        );
        let units = self.units(t, p);
        let work_centers = self.work_centers(t, p);
        match kind {
            Some(ConnectionKind::Deltav) => ProfileConfig::Deltav(DeltavConfig {
                node_template,
                units,
            }),
            Some(ConnectionKind::Optomes) => ProfileConfig::Optomes(OptomesConfig {
                node_template,
                oee_window,
                work_centers,
            }),
            Some(ConnectionKind::Generic) | None => ProfileConfig::Generic,
        }
    }

    fn units(&mut self, t: Option<&Table>, p: &str) -> Vec<UnitConfig> {
        let mut units = Vec::new();
        let mut unit_names = HashSet::new();
        for (up, ut) in self.table_array(t, p, "units") {
            self.check_keys(ut, &up, UNIT_KEYS);
            let name = self.required(Some(ut), &up, "name", "");
            if let Some(n) = &name {
                if !unit_names.insert(n.clone()) {
                    self.problem(join(&up, "name"), format!("duplicate unit {n:?}"));
                }
            }
            let recipe_parameters = self.recipe_parameters(ut, &up);
            units.push(UnitConfig {
                name: name.unwrap_or_default(),
                recipe_parameters,
            });
        }
        units
    }

    fn recipe_parameters(&mut self, unit: &Table, up: &str) -> Vec<String> {
        let mut params: Vec<String> = Vec::new();
        let list = self
            .string_array(Some(unit), up, "recipe_parameters")
            .unwrap_or_default();
        for (j, param) in list.into_iter().enumerate() {
            let pp = format!("{}[{j}]", join(up, "recipe_parameters"));
            if param.trim().is_empty() {
                self.problem(pp, "must not be empty");
            } else if params.contains(&param) {
                self.problem(pp, format!("duplicate recipe parameter {param:?}"));
            } else {
                params.push(param);
            }
        }
        params
    }

    fn work_centers(&mut self, t: Option<&Table>, p: &str) -> Vec<WorkCenterConfig> {
        let mut work_centers = Vec::new();
        let mut wc_names = HashSet::new();
        for (wp, wt) in self.table_array(t, p, "work_centers") {
            self.check_keys(wt, &wp, WORK_CENTER_KEYS);
            let name = self.required(Some(wt), &wp, "name", "");
            if let Some(n) = &name {
                if !wc_names.insert(n.clone()) {
                    self.problem(join(&wp, "name"), format!("duplicate work center {n:?}"));
                }
            }
            work_centers.push(WorkCenterConfig {
                name: name.unwrap_or_default(),
            });
        }
        work_centers
    }

    /// Secure by default (Basic256Sha256 + SignAndEncrypt). Setting only one
    /// side to None implies None for the other; an explicit contradiction is
    /// an error.
    fn security(&mut self, t: Option<&Table>, p: &str) -> (SecurityPolicy, SecurityMode) {
        let policy = self.string(t, p, "security_policy").and_then(|s| {
            let parsed = match s.trim().to_ascii_lowercase().as_str() {
                "none" => Some(SecurityPolicy::None),
                "basic256sha256" => Some(SecurityPolicy::Basic256Sha256),
                "aes128sha256rsaoaep" => Some(SecurityPolicy::Aes128Sha256RsaOaep),
                "aes256sha256rsapss" => Some(SecurityPolicy::Aes256Sha256RsaPss),
                _ => None,
            };
            if parsed.is_none() {
                self.problem(
                    join(p, "security_policy"),
                    format!("{s:?} is not one of None, Basic256Sha256, Aes128Sha256RsaOaep, Aes256Sha256RsaPss"),
                );
            }
            parsed
        });
        let mode = self.string(t, p, "security_mode").and_then(|s| {
            let parsed = match s.trim().to_ascii_lowercase().as_str() {
                "none" => Some(SecurityMode::None),
                "sign" => Some(SecurityMode::Sign),
                "signandencrypt" => Some(SecurityMode::SignAndEncrypt),
                _ => None,
            };
            if parsed.is_none() {
                self.problem(
                    join(p, "security_mode"),
                    format!("{s:?} is not one of None, Sign, SignAndEncrypt"),
                );
            }
            parsed
        });
        let (policy, mode) = match (policy, mode) {
            (None, None) => (SecurityPolicy::Basic256Sha256, SecurityMode::SignAndEncrypt),
            (Some(SecurityPolicy::None), None) => (SecurityPolicy::None, SecurityMode::None),
            (Some(pol), None) => (pol, SecurityMode::SignAndEncrypt),
            (None, Some(SecurityMode::None)) => (SecurityPolicy::None, SecurityMode::None),
            (None, Some(m)) => (SecurityPolicy::Basic256Sha256, m),
            (Some(pol), Some(m)) => (pol, m),
        };
        let policy_none = policy == SecurityPolicy::None;
        let mode_none = mode == SecurityMode::None;
        // Only complain when both were parsed: a bad value was reported already.
        if policy_none != mode_none
            && get(t, "security_policy").is_some()
            && get(t, "security_mode").is_some()
        {
            let message = if policy_none {
                "security_policy = \"None\" requires security_mode = \"None\""
            } else {
                "security_mode = \"None\" requires security_policy = \"None\""
            };
            self.problem(join(p, "security_mode"), message);
        } else if policy_none && mode_none {
            let extra = if get(t, "username").is_some() {
                ", and the password travels in cleartext unless the server's user token policy encrypts it"
            } else {
                ""
            };
            self.warnings.push(format!(
                "{}: None; OPC UA traffic is neither signed nor encrypted{extra}",
                join(p, "security_policy")
            ));
        }
        (policy, mode)
    }

    fn tag(&mut self, table: &Table, p: &str, names: &mut HashSet<String>) -> TagConfig {
        self.check_keys(table, p, TAG_KEYS);
        let t = Some(table);
        let name = self.required(t, p, "name", "");
        if let Some(n) = &name {
            if !names.insert(n.clone()) {
                self.problem(
                    join(p, "name"),
                    format!("duplicate tag name {n:?} in this connection"),
                );
            }
        }
        let node = self.required(t, p, "node", " (e.g. \"ns=2;s=FIC-101/PV.CV\")");
        if let Some(n) = &node {
            if let Err(e) = NodeRef::parse(n) {
                self.problem(join(p, "node"), format!("invalid node id {n:?}: {e}"));
            }
        }
        let sampling_interval = self.duration(t, p, "sampling_interval");
        let deadband = self.number(t, p, "deadband");
        if let Some(d) = deadband {
            if !d.is_finite() || d < 0.0 {
                self.problem(
                    join(p, "deadband"),
                    format!("must be a number >= 0, found {d}"),
                );
            }
        }
        TagConfig {
            name: name.unwrap_or_default(),
            node: node.unwrap_or_default(),
            sampling_interval,
            deadband,
        }
    }
}

/// `password_credential` names a file in `$CREDENTIALS_DIRECTORY`, no path.
fn is_credential_name(value: &str) -> bool {
    !value.contains('/') && value != "." && value != ".."
}

/// `opc.tcp://host[:port][/path]`. Credentials in the URL are refused rather
/// than redacted wherever the endpoint shows (logs, `/status`, events,
/// `check`, the OPC UA library's own errors): the connection's `username`
/// and password keys exist for them, and a refused URL cannot leak later.
/// Messages show the URL with user info and query masked.
fn check_opc_endpoint(e: &str) -> Result<(), String> {
    let shown = crate::secret::redact_url(e);
    let rest = e
        .get(..10)
        .filter(|s| s.eq_ignore_ascii_case("opc.tcp://"))
        .map(|_| &e[10..])
        .ok_or_else(|| format!("{shown:?} must start with opc.tcp://"))?;
    // Anywhere, not only before the first '/': a password may hold one.
    if rest.contains('@') {
        return Err(format!(
            "{shown:?}: credentials in the endpoint URL are not supported (the URL shows in logs and \
             status); use this connection's username and password_env/password_file/password_credential"
        ));
    }
    if rest.contains(['?', '#']) {
        return Err(format!(
            "{shown:?} has a query or fragment; an OPC UA endpoint URL is opc.tcp://host[:port][/path] \
             (credentials go in username and password_env/password_file/password_credential)"
        ));
    }
    if rest.is_empty() || rest.starts_with(['/', ':']) {
        return Err(format!("{shown:?} has no host"));
    }
    Ok(())
}

/// `mqtts://host[:port]` or `mqtt://host[:port]` -> (host, port, tls).
/// Credentials in the URL are refused (see [`check_opc_endpoint`]); messages
/// never show user info or a query.
fn parse_mqtt_url(url: &str) -> Result<(String, u16, bool), String> {
    let url = url.trim();
    let (scheme, rest) = url.split_once("://").ok_or_else(|| {
        "expected mqtts://host[:port] (or mqtt:// with allow_plaintext)".to_string()
    })?;
    let (tls, default_port) = match scheme.to_ascii_lowercase().as_str() {
        "mqtts" => (true, 8883),
        "mqtt" => (false, 1883),
        _ => {
            return Err(format!(
                "unsupported scheme {scheme:?}; use mqtts:// (or mqtt:// with allow_plaintext)"
            ))
        }
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains('@') {
        // Do not echo the URL: the part before '@' may be a password.
        return Err("credentials in the URL are not supported; use mqtt.username and mqtt.password_env/password_file/password_credential".into());
    }
    if authority.contains(['/', '?', '#']) {
        return Err(format!(
            "{:?} has a path or query; give only scheme, host and port (credentials go in \
             mqtt.username and mqtt.password_env/password_file/password_credential)",
            crate::secret::redact_url(url)
        ));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("{url:?} has an unterminated IPv6 address"))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| format!("{url:?}: unexpected text after the IPv6 address"))?,
            ),
        };
        (host.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    let port = match port {
        None => default_port,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => return Err(format!("{url:?} has an invalid port {p:?}")),
        },
    };
    Ok((host, port, tls))
}

fn check_topic_prefix(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.contains(['+', '#']) {
        return Err(format!("{s:?} must not contain MQTT wildcards '+' or '#'"));
    }
    if s.contains('\0') {
        return Err("must not contain NUL characters".into());
    }
    if s.starts_with('$') {
        return Err(format!(
            "{s:?} must not start with '$' (reserved for broker topics)"
        ));
    }
    if s.starts_with('/') || s.ends_with('/') || s.contains("//") {
        return Err(format!(
            "{s:?} must not have empty topic levels (leading, trailing or double '/')"
        ));
    }
    Ok(())
}

/// `{param}` plus the kind's `{unit}`/`{work_center}`; a sample substitution
/// must be a valid NodeId so mistakes show at load, not at first connect.
fn check_node_template(tpl: &str, kind: Option<ConnectionKind>) -> Result<(), String> {
    let subject = match kind {
        Some(ConnectionKind::Deltav) => Some("unit"),
        Some(ConnectionKind::Optomes) => Some("work_center"),
        _ => None,
    };
    let mut rest = tpl;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| format!("{tpl:?} has an unclosed '{{'"))?;
        let name = &after[..close];
        let known = name == "param"
            || Some(name) == subject
            || (subject.is_none() && (name == "unit" || name == "work_center"));
        if !known {
            let allowed = match subject {
                Some(s) => format!("{{{s}}} and {{param}}"),
                None => "{unit}/{work_center} and {param}".into(),
            };
            return Err(format!(
                "unknown placeholder {{{name}}} in {tpl:?} (allowed: {allowed})"
            ));
        }
        rest = &after[close + 1..];
    }
    if !tpl.contains("{param}") {
        return Err(format!("{tpl:?} must contain {{param}}"));
    }
    if let Some(s) = subject {
        if !tpl.contains(&format!("{{{s}}}")) {
            return Err(format!("{tpl:?} must contain {{{s}}}"));
        }
    }
    let sample = tpl
        .replace("{param}", "PARAM")
        .replace("{unit}", "UNIT")
        .replace("{work_center}", "WC");
    NodeRef::parse(&sample)
        .map(|_| ())
        .map_err(|e| format!("{tpl:?} does not give a valid node id: {e}"))
}
