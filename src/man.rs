//! The man page, `packaging/pid-server.1`, rendered from the command line's
//! own definitions (clap's, in `cli.rs`): the flags, their environment
//! variables and defaults are written once, so the page cannot drift from
//! `--help` (a hand-written page had: a default that did not exist, a flag
//! missing). The packaged file is committed so that packaging needs no
//! generator; the test here fails when it differs from what the code would
//! render, and `PID_SERVER_WRITE_MAN=1 cargo test --bin pid-server man`
//! writes it anew.

use std::io::Write;

use clap::CommandFactory;
use clap_mangen::Man;

use crate::cli::{Cli, EXIT_STATUS};

/// Where the packaged page lives (`[package.metadata.deb]` installs it).
const PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/pid-server.1");

/// The sections only a man page has, in roff.
const FILES: &str = r#".SH FILES
.TP
.I /etc/pid-server/pid-server.toml
The configuration file the service reads (every key commented out, with its
default); check it with
.BR "pid-server check-config" ,
apply it with
.BR "systemctl reload pid-server" .
.TP
.I /usr/lib/systemd/system/pid-server.socket
The listening socket (port 8080); change it with
.BR "systemctl edit pid-server.socket" .
.TP
.I /usr/lib/systemd/system/pid-server.service
The service; its log is in
.BR "journalctl \-u pid-server" .
.SH SEE ALSO
.BR systemctl (1),
.BR systemd.socket (5),
.BR systemd.service (5)
"#;

/// Escapes text for roff: a leading `.` or `'` would be a request, `-` a
/// hyphen rather than the minus of a flag, `\` an escape.
fn roff_text(s: &str) -> String {
    let s = s.replace('\\', "\\e").replace('-', "\\-");
    match s.chars().next() {
        Some('.' | '\'') => format!("\\&{s}"),
        _ => s,
    }
}

fn render() -> Vec<u8> {
    let cmd = Cli::command();
    // The version, not a date: the page changes when the flags do.
    let man = Man::new(cmd.clone())
        .title("PID-SERVER")
        .date(concat!("version ", env!("CARGO_PKG_VERSION")))
        .source("pid-server")
        .manual("User Commands");
    let mut out = Vec::new();
    man.render_title(&mut out).unwrap();
    man.render_name_section(&mut out).unwrap();
    man.render_synopsis_section(&mut out).unwrap();
    man.render_description_section(&mut out).unwrap();
    man.render_options_section(&mut out).unwrap();
    // Each other command, what it does and its options (serve's are the
    // ones above: they are accepted without the command too).
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "serve") {
        let name = format!("{} {}", cmd.get_name(), sub.get_name());
        let mut section = Vec::new();
        Man::new(sub.clone())
            .render_options_section(&mut section)
            .unwrap();
        let section = String::from_utf8(section).unwrap();
        let about = sub.get_long_about().or(sub.get_about()).unwrap();
        let heading = format!(
            ".SH \"{}\"\n{}",
            name.to_uppercase(),
            roff_text(&about.to_string())
        );
        out.extend_from_slice(section.replacen(".SH OPTIONS", &heading, 1).as_bytes());
    }
    writeln!(out, ".SH \"EXIT STATUS\"").unwrap();
    for (code, meaning) in EXIT_STATUS {
        writeln!(out, ".TP\n.B {code}\n{}", roff_text(meaning)).unwrap();
    }
    out.extend_from_slice(FILES.as_bytes());
    man.render_version_section(&mut out).unwrap();
    out
}

#[test]
fn man_page_is_rendered_from_the_flags() {
    let page = render();
    if std::env::var_os("PID_SERVER_WRITE_MAN").is_some() {
        std::fs::write(PATH, &page).unwrap();
    }
    let committed = std::fs::read(PATH).unwrap_or_default();
    assert!(
        committed == page,
        "{PATH} is not what the command line renders: \
         PID_SERVER_WRITE_MAN=1 cargo test --bin pid-server man writes it anew"
    );
}
