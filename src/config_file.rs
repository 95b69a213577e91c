//! The configuration file: `serve --config PATH` (or `PID_SERVER_CONFIG`).
//!
//! TOML whose keys are the `serve` flags' long names with `_` for `-`
//! (`listen`, a string or an array of strings; `drain_timeout = 30`; …).
//! Each value is checked by the very parser its flag uses. What is wrong is
//! one line, `PATH:LINE: what`, and exit 78 (`EX_CONFIG`), before any
//! socket is taken: a reload to a broken file fails and the old process
//! keeps serving.
//!
//! Every generation reads the file when it starts, and a reload starts a new
//! generation with the same arguments, so a reload applies a changed file.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use axum_handover::ListenAddr;
use sha2::{Digest, Sha256};
use toml::{Spanned, Value};

use crate::cli;

/// Where the Debian package installs the file (a conffile), and what
/// `check-config` checks without `--config`.
pub const PACKAGED_PATH: &str = "/etc/pid-server/pid-server.toml";

/// sysexits.h's `EX_CONFIG`: the configuration file is wrong.
pub const EX_CONFIG: u8 = 78;

/// The keys a file may set: the `serve` flags' long names, `_` for `-`
/// (and, unlisted, the old spellings in [`cli::RENAMED`]).
pub const KEYS: [&str; 15] = [
    "listen",
    "drain_timeout",
    "reload_timeout",
    "reload_probation_ms",
    "header_timeout",
    "keep_alive_timeout",
    "idle_grace_ms",
    "close_spread_ms",
    "max_connections",
    "http2_stall_timeout",
    "http2_max_held_responses",
    "fd_store_connections",
    "fd_store_while_idle",
    "tls_cert",
    "tls_key",
];

/// A larger file is refused: it is not a pid-server configuration (a full
/// one is under 1 KB). The read (the library's, the one that reads the
/// certificate and key) also refuses what is not a regular file: a FIFO
/// would hang the start, and with it a reload, and `/dev/zero` never ends.
const MAX_BYTES: u64 = 1 << 20;

/// A configuration file as this process read it.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    /// As given on the command line or in the environment.
    pub path: PathBuf,
    /// Of the bytes read, in lower-case hex: which version of the file the
    /// process runs (`/healthz`).
    pub sha256: String,
    pub settings: FileSettings,
    /// One warning line for each old key the file used (see
    /// [`cli::RENAMED`]), to log once at start.
    pub old_keys: Vec<String>,
}

/// What a file sets; `None` where it leaves a setting out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FileSettings {
    pub listen: Option<Vec<ListenAddr>>,
    pub drain_timeout: Option<Duration>,
    pub reload_timeout: Option<Duration>,
    pub reload_probation: Option<Duration>,
    pub header_timeout: Option<Duration>,
    pub keep_alive_timeout: Option<Duration>,
    pub idle_grace: Option<Duration>,
    pub close_spread: Option<Duration>,
    pub max_connections: Option<u32>,
    pub http2_stall_timeout: Option<Duration>,
    pub http2_max_held_responses: Option<u32>,
    pub fd_store_connections: Option<u32>,
    pub fd_store_while_idle: Option<u32>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

/// What is wrong in a file's text, and on which line (from 1).
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub line: usize,
    pub what: String,
}

/// Why a file cannot be used: prints as the one line an operator reads,
/// `PATH:LINE: what`, or `PATH: what` when it could not be read at all.
#[derive(Debug)]
pub struct Error {
    path: PathBuf,
    line: Option<usize>,
    what: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: {}", self.path.display(), self.what),
            None => write!(f, "{}: {}", self.path.display(), self.what),
        }
    }
}

impl std::error::Error for Error {}

/// `pid-server check-config`: `PATH: ok` and 0, or the error line and 78.
pub fn check(path: &Path) -> ExitCode {
    match read(path) {
        Ok(file) => {
            for warning in &file.old_keys {
                eprintln!("{warning}");
            }
            println!("{}: ok", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(EX_CONFIG)
        }
    }
}

/// Reads and checks the file at `path`.
pub fn read(path: &Path) -> Result<ConfigFile, Error> {
    let fail = |line, what| Error {
        path: path.to_path_buf(),
        line,
        what,
    };
    let bytes = axum_handover::file::read_regular(path, MAX_BYTES).map_err(|e| match e.kind() {
        std::io::ErrorKind::FileTooLarge => fail(None, e.to_string()),
        _ => fail(None, format!("cannot read it: {e}")),
    })?;
    let (settings, old_keys) =
        parse_noting_old_keys(&bytes).map_err(|p| fail(Some(p.line), p.what))?;
    let old_keys = old_keys
        .into_iter()
        .map(|(line, r)| {
            let warning = cli::old_spelling_warning(r.old_key, r.key);
            format!("{}:{line}: {warning}", path.display())
        })
        .collect();
    Ok(ConfigFile {
        path: path.to_path_buf(),
        sha256: hex(&Sha256::digest(&bytes)),
        settings,
        old_keys,
    })
}

/// Parses a file's bytes. The first problem, in the file's order, is the
/// error.
// The tests' and the fuzz target's entry; the binary reads through `read`.
#[cfg_attr(not(test), allow(dead_code))]
pub fn parse(bytes: &[u8]) -> Result<FileSettings, Problem> {
    parse_noting_old_keys(bytes).map(|(settings, _)| settings)
}

/// The old keys a file used (see [`cli::RENAMED`]), each with its line.
type OldKeys = Vec<(usize, &'static cli::Renamed)>;

/// Like [`parse`], and says which old keys the file used.
fn parse_noting_old_keys(bytes: &[u8]) -> Result<(FileSettings, OldKeys), Problem> {
    let text = std::str::from_utf8(bytes).map_err(|e| Problem {
        line: line_of(bytes, e.valid_up_to()),
        what: "not UTF-8 text".into(),
    })?;
    // The parser rejects a key given twice; the map gives every key its
    // place in the text.
    let table: BTreeMap<Spanned<String>, Value> =
        toml::from_str(text).map_err(|e| toml_problem(text, &e))?;
    let mut entries: Vec<_> = table.iter().collect();
    entries.sort_by_key(|(key, _)| key.span().start);
    let mut settings = FileSettings::default();
    let mut old_keys = Vec::new();
    for (key, value) in entries {
        let line = line_of(bytes, key.span().start);
        let problem = |what| Problem { line, what };
        let key = key.get_ref();
        let renamed = cli::RENAMED.iter().find(|r| r.old_key == key);
        if let Some(r) = renamed {
            if table.keys().any(|k| k.get_ref() == r.key) {
                return Err(problem(format!(
                    "`{}` and `{}` are one setting: keep only `{}`",
                    r.old_key, r.key, r.key
                )));
            }
            old_keys.push((line, r));
        }
        let canonical = renamed.map_or(key.as_str(), |r| r.key);
        set(&mut settings, key, canonical, value).map_err(problem)?;
    }
    Ok((settings, old_keys))
}

/// Checks one key's value and sets it: `key` as written, `canonical` its
/// current spelling (they differ for an old key).
fn set(s: &mut FileSettings, key: &str, canonical: &str, value: &Value) -> Result<(), String> {
    let named = |what: String| format!("`{key}`: {what}");
    match canonical {
        "listen" => s.listen = Some(addresses(value).map_err(named)?),
        "drain_timeout" => s.drain_timeout = Some(secs(value).map_err(named)?),
        "reload_timeout" => s.reload_timeout = Some(secs(value).map_err(named)?),
        "reload_probation_ms" => s.reload_probation = Some(ms(value).map_err(named)?),
        "header_timeout" => s.header_timeout = Some(secs(value).map_err(named)?),
        "keep_alive_timeout" => s.keep_alive_timeout = Some(secs(value).map_err(named)?),
        "idle_grace_ms" => s.idle_grace = Some(ms(value).map_err(named)?),
        "close_spread_ms" => s.close_spread = Some(ms(value).map_err(named)?),
        "max_connections" => {
            s.max_connections = Some(integer(value, "", cli::parse_max_connections).map_err(named)?)
        }
        "http2_stall_timeout" => s.http2_stall_timeout = Some(secs(value).map_err(named)?),
        "http2_max_held_responses" => {
            s.http2_max_held_responses =
                Some(integer(value, "", cli::parse_max_connections).map_err(named)?)
        }
        "fd_store_connections" => {
            s.fd_store_connections = Some(integer(value, "", cli::parse_count).map_err(named)?)
        }
        "fd_store_while_idle" => {
            s.fd_store_while_idle = Some(integer(value, "", cli::parse_count).map_err(named)?)
        }
        "tls_cert" => s.tls_cert = Some(path(value).map_err(named)?),
        "tls_key" => s.tls_key = Some(path(value).map_err(named)?),
        _ => {
            return Err(format!(
                "unknown key `{key}` (the keys are {})",
                KEYS.join(", ")
            ));
        }
    }
    Ok(())
}

fn secs(value: &Value) -> Result<Duration, String> {
    integer(value, " of seconds", cli::parse_secs)
}

fn ms(value: &Value) -> Result<Duration, String> {
    integer(value, " of milliseconds", cli::parse_ms)
}

/// An integer, checked by its flag's parser (so the file takes exactly what
/// the flag takes, with the flag's words for what it does not).
fn integer<T>(
    value: &Value,
    unit: &str,
    parse: fn(&str) -> Result<T, String>,
) -> Result<T, String> {
    match value {
        Value::Integer(n) => parse(&n.to_string()),
        other => Err(format!("expected a whole number{unit}, found {}", a(other))),
    }
}

/// A file's path (as given: relative to the working directory).
fn path(value: &Value) -> Result<PathBuf, String> {
    match value {
        Value::String(s) if !s.is_empty() => Ok(PathBuf::from(s)),
        Value::String(_) => Err("an empty path".into()),
        other => Err(format!("expected a path (a string), found {}", a(other))),
    }
}

/// One address, or an array of them.
fn addresses(value: &Value) -> Result<Vec<ListenAddr>, String> {
    let one = |v: &Value| match v {
        Value::String(s) => cli::parse_listen(s),
        other => Err(format!(
            "expected an address (a string), found {}",
            a(other)
        )),
    };
    match value {
        Value::String(_) => Ok(vec![one(value)?]),
        Value::Array(items) if items.is_empty() => {
            Err("an empty array: give at least one address".into())
        }
        Value::Array(items) => items.iter().map(one).collect(),
        other => Err(format!(
            "expected an address or an array of addresses, found {}",
            a(other)
        )),
    }
}

/// "a string", "an integer", …
fn a(value: &Value) -> String {
    let t = value.type_str();
    let article = if t.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {t}")
}

/// The parser's error as one line. A duplicate key is named (the parser's
/// span covers it); everything else keeps the parser's words.
fn toml_problem(text: &str, e: &toml::de::Error) -> Problem {
    let span = e.span().unwrap_or(0..0);
    let start = span.start.min(text.len());
    let message = e.message().replace('\n', " ");
    let what = match text.get(span) {
        Some(key) if message == "duplicate key" => format!("duplicate key `{}`", key.trim()),
        _ => format!("not valid TOML: {message}"),
    };
    Problem {
        line: line_of(text.as_bytes(), start),
        what,
    }
}

/// The line (from 1) that byte `offset` is on.
fn line_of(bytes: &[u8], offset: usize) -> usize {
    let offset = offset.min(bytes.len());
    bytes[..offset].iter().filter(|b| **b == b'\n').count() + 1
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A generation that cannot start with its file: one line, exit 78, and
/// the reason to the old process when a reload started this one, so the
/// reload fails with `PATH:LINE: …` rather than only "status 78".
pub fn cannot_start(why: &str) -> std::process::ExitCode {
    axum_handover::refuse_start(&crate::cli::config(), why);
    crate::cli::fail(why, EX_CONFIG)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    fn problem(text: &str) -> (usize, String) {
        let p = parse(text.as_bytes()).expect_err(text);
        (p.line, p.what)
    }

    #[test]
    fn every_key_parses_as_its_flag_does() {
        let s = parse(
            br#"
listen = ["127.0.0.1:1", "unix:/run/x.sock"]
drain_timeout = 5
reload_timeout = 6
reload_probation_ms = 0
header_timeout = 7
keep_alive_timeout = 3
idle_grace_ms = 200
close_spread_ms = 1500
max_connections = 9
http2_stall_timeout = 4
http2_max_held_responses = 8
fd_store_connections = 0
fd_store_while_idle = 64
tls_cert = "/etc/x/fullchain.pem"
tls_key = "key.pem"
"#,
        )
        .unwrap();
        assert_eq!(
            s,
            FileSettings {
                listen: Some(vec![
                    "127.0.0.1:1".parse().unwrap(),
                    "unix:/run/x.sock".parse().unwrap()
                ]),
                drain_timeout: Some(Duration::from_secs(5)),
                reload_timeout: Some(Duration::from_secs(6)),
                reload_probation: Some(Duration::ZERO),
                header_timeout: Some(Duration::from_secs(7)),
                keep_alive_timeout: Some(Duration::from_secs(3)),
                idle_grace: Some(Duration::from_millis(200)),
                close_spread: Some(Duration::from_millis(1500)),
                max_connections: Some(9),
                http2_stall_timeout: Some(Duration::from_secs(4)),
                http2_max_held_responses: Some(8),
                fd_store_connections: Some(0),
                fd_store_while_idle: Some(64),
                tls_cert: Some("/etc/x/fullchain.pem".into()),
                tls_key: Some("key.pem".into()),
            }
        );
        let one = parse(b"listen = \"[::1]:80\"").unwrap();
        assert_eq!(one.listen, Some(vec!["[::1]:80".parse().unwrap()]));
        assert_eq!(parse(b"# nothing set\n").unwrap(), FileSettings::default());
    }

    #[test]
    fn each_problem_is_one_line_naming_the_line_and_the_key() {
        let cases: &[(&str, usize, &str)] = &[
            (
                "\n\nlisten_on = 1\n",
                3,
                "unknown key `listen_on` (the keys are listen, ",
            ),
            (
                "drain_timeout = 1\n\ndrain_timeout = 2\n",
                3,
                "duplicate key `drain_timeout`",
            ),
            (
                "drain_timeout = \"30\"\n",
                1,
                "`drain_timeout`: expected a whole number of seconds, found a string",
            ),
            (
                "idle_grace_ms = 1.5\n",
                1,
                "`idle_grace_ms`: expected a whole number of milliseconds, found a float",
            ),
            ("x = 1\nmax_connections = true\n", 1, "unknown key `x`"),
            (
                "max_connections = true\n",
                1,
                "`max_connections`: expected a whole number, found a boolean",
            ),
            (
                "listen = 8080\n",
                1,
                "`listen`: expected an address or an array of addresses, found an integer",
            ),
            (
                "listen = [\"127.0.0.1:1\", 2]\n",
                1,
                "`listen`: expected an address (a string), found an integer",
            ),
            ("listen = []\n", 1, "`listen`: an empty array"),
            (
                "[listen]\n",
                1,
                "`listen`: expected an address or an array of addresses, found a table",
            ),
            (
                "\nlisten = \"localhost:80\"\n",
                2,
                "`listen`: `localhost:80` is not HOST:PORT",
            ),
            (
                "drain_timeout = 0\n",
                1,
                "`drain_timeout`: must be at least 1 second",
            ),
            (
                "reload_timeout = -3\n",
                1,
                "`reload_timeout`: `-3` is not a whole number of seconds",
            ),
            (
                "header_timeout = 86401\n",
                1,
                "`header_timeout`: must be at most 86400 seconds",
            ),
            (
                "upgrade_probation_ms = 60001\n",
                1,
                "`upgrade_probation_ms`: must be at most 60000 ms",
            ),
            (
                "max_connections = 0\n",
                1,
                "`max_connections`: must be at least 1",
            ),
            (
                "max_connections = 4294967296\n",
                1,
                "`max_connections`: must be at most 4294967295",
            ),
            (
                "drain_timeout = 5\nkeep_alive_timeout = \n",
                2,
                "not valid TOML: ",
            ),
            ("{\"json\": true}\n", 1, "not valid TOML: "),
        ];
        for (text, line, what) in cases {
            let (l, w) = problem(text);
            assert_eq!(l, *line, "{text:?}: {w}");
            assert!(
                w.starts_with(what),
                "{text:?}: {w:?} does not start with {what:?}"
            );
            assert!(!w.contains('\n'), "{w:?}");
        }
        assert_eq!(
            parse(b"drain_timeout = 5\n# caf\xe9\n").unwrap_err(),
            Problem {
                line: 2,
                what: "not UTF-8 text".into()
            }
        );
    }

    #[test]
    fn the_keys_are_the_serve_flags() {
        let cmd = cli::Cli::command();
        let serve = cmd.find_subcommand("serve").unwrap();
        let flags: Vec<String> = serve
            .get_arguments()
            .filter(|a| !a.is_hide_set())
            .filter_map(|a| a.get_long())
            .filter(|l| *l != "config")
            .map(|l| l.replace('-', "_"))
            .collect();
        let mut keys = KEYS.map(String::from).to_vec();
        let mut flags = flags;
        keys.sort();
        flags.sort();
        assert_eq!(keys, flags);
    }

    #[test]
    fn the_hidden_flags_are_the_old_spellings_and_their_keys_still_work() {
        let cmd = cli::Cli::command();
        let mut hidden: Vec<&str> = cmd
            .get_arguments()
            .filter(|a| a.is_hide_set())
            .filter_map(|a| a.get_long())
            .collect();
        let mut old: Vec<&str> = cli::RENAMED.iter().map(|r| &r.old_flag[2..]).collect();
        hidden.sort();
        old.sort();
        assert_eq!(hidden, old);
        for r in &cli::RENAMED {
            assert_eq!(r.old_key, r.old_flag[2..].replace('-', "_"));
            assert_eq!(r.key, r.flag[2..].replace('-', "_"));
            assert!(KEYS.contains(&r.key) && !KEYS.contains(&r.old_key));
        }
    }

    #[test]
    fn an_old_key_sets_its_setting_and_is_noted_once() {
        let text = "drain_timeout = 5\nupgrade_timeout = 6\nupgrade_probation_ms = 7\n";
        let (s, old) = parse_noting_old_keys(text.as_bytes()).unwrap();
        assert_eq!(s.reload_timeout, Some(Duration::from_secs(6)));
        assert_eq!(s.reload_probation, Some(Duration::from_millis(7)));
        let old: Vec<_> = old.iter().map(|(line, r)| (*line, r.old_key)).collect();
        assert_eq!(old, [(2, "upgrade_timeout"), (3, "upgrade_probation_ms")]);
        // A bad value is named as written.
        assert_eq!(
            problem("upgrade_timeout = 0\n").1,
            "`upgrade_timeout`: must be at least 1 second"
        );
        // The new key alone is noted as nothing.
        let (_, old) = parse_noting_old_keys(b"reload_timeout = 6\n").unwrap();
        assert!(old.is_empty());

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, "\nupgrade_timeout = 6\n").unwrap();
        let f = read(&path).unwrap();
        assert_eq!(f.settings.reload_timeout, Some(Duration::from_secs(6)));
        assert_eq!(f.old_keys.len(), 1, "{:?}", f.old_keys);
        let warning = &f.old_keys[0];
        assert!(
            warning.starts_with(&format!(
                "{}:2: `upgrade_timeout` is now `reload_timeout`; the old name still works",
                path.display()
            )),
            "{warning}"
        );
    }

    #[test]
    fn an_old_key_beside_its_new_one_is_a_problem() {
        for text in [
            "reload_timeout = 5\nupgrade_timeout = 6\n",
            "upgrade_timeout = 6\nreload_timeout = 5\n",
        ] {
            let line = 1 + text.lines().position(|l| l.starts_with("upgrade")).unwrap();
            assert_eq!(
                problem(text),
                (
                    line,
                    "`upgrade_timeout` and `reload_timeout` are one setting: keep only \
                     `reload_timeout`"
                        .to_string()
                ),
                "{text}"
            );
        }
    }

    #[test]
    fn the_packaged_file_shows_the_defaults() {
        let packaged = include_str!("../packaging/pid-server.toml");
        assert_eq!(parse(packaged.as_bytes()).unwrap(), FileSettings::default());
        // Every key is there, commented out, with the flag's default.
        let uncommented: String = packaged
            .lines()
            .filter_map(|l| l.strip_prefix('#'))
            .filter(|l| KEYS.iter().any(|k| l.starts_with(&format!("{k} = "))))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(uncommented.lines().count(), KEYS.len(), "{uncommented}");
        let s = parse(uncommented.as_bytes()).unwrap();
        let defaults = cli::Cli::try_parse_from(["pid-server"]).unwrap().serve;
        assert_eq!(s.listen.as_ref(), Some(&defaults.listen));
        assert_eq!(s.drain_timeout, Some(defaults.drain_timeout));
        assert_eq!(s.reload_timeout, Some(defaults.reload_timeout));
        assert_eq!(s.reload_probation, Some(defaults.reload_probation));
        assert_eq!(s.header_timeout, Some(defaults.header_timeout));
        assert_eq!(s.keep_alive_timeout, Some(defaults.keep_alive_timeout));
        assert_eq!(s.close_spread, Some(defaults.close_spread));
        assert_eq!(s.max_connections, Some(defaults.max_connections));
        assert_eq!(s.http2_stall_timeout, Some(defaults.http2_stall_timeout));
        assert_eq!(
            s.http2_max_held_responses,
            Some(defaults.http2_max_held_responses)
        );
        assert_eq!(s.fd_store_connections, Some(defaults.fd_store_connections));
        assert_eq!(s.fd_store_while_idle, Some(defaults.fd_store_while_idle));
        // No default: an example value.
        assert_eq!(defaults.idle_grace, None);
        assert!(s.idle_grace.is_some());
        assert_eq!((&defaults.tls_cert, &defaults.tls_key), (&None, &None));
        assert!(s.tls_cert.is_some() && s.tls_key.is_some());
    }

    #[test]
    fn errors_print_as_path_line_what() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, "drain_timeout = 5\nnope = 1\n").unwrap();
        let e = read(&path).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{}:2: unknown key `nope`", path.display())),
            "{e}"
        );
        let e = read(&dir.path().join("missing.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.toml: cannot read it: "), "{e}");
        std::fs::write(&path, "drain_timeout = 5\n").unwrap();
        let f = read(&path).unwrap();
        // `printf 'drain_timeout = 5\n' | sha256sum`
        assert_eq!(
            f.sha256,
            "a1a788c6d039828917e430a2b5c3badd55bd79988423f77a128446d7b6f41a98"
        );
    }
}
