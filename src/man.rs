//! The man page, `packaging/pid-server.1`, and the book's command-line
//! reference, `docs/src/reference/command-line.md`, rendered from the
//! command line's own definitions (clap's, in `cli.rs`): the flags, their
//! environment variables and defaults are written once, so neither page can
//! drift from `--help` (a hand-written page had: a default that did not
//! exist, a flag missing; README's flag table lacked `--close-spread-ms`).
//! Both files are committed so that packaging and the book need no
//! generator; the tests here fail when one differs from what the code would
//! render, and `PID_SERVER_WRITE_MAN=1 cargo test --bin pid-server man`
//! writes both anew.

use std::io::Write;

use clap::{Arg, Command, CommandFactory};
use clap_mangen::Man;

use crate::cli::{Cli, EXIT_STATUS};

/// Where the packaged page lives (`[package.metadata.deb]` installs it).
const PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/pid-server.1");

/// Where the book's reference page lives (`docs/src/SUMMARY.md` lists it).
const MARKDOWN_PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/docs/src/reference/command-line.md"
);

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

/// Escapes text for Markdown outside code spans (between backticks, which
/// clap's help texts use for literal values, text stays as written): `<`
/// would open an HTML tag, `[` a link, `*` and `_` emphasis, `|` a table
/// cell.
fn markdown_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut in_code = false;
    for c in s.chars() {
        match c {
            '`' => in_code = !in_code,
            '<' if !in_code => {
                out.push_str("&lt;");
                continue;
            }
            '>' if !in_code => {
                out.push_str("&gt;");
                continue;
            }
            '\\' | '[' | ']' | '*' | '_' | '|' if !in_code => out.push('\\'),
            _ => {}
        }
        out.push(c);
    }
    out
}

/// One flag as a Markdown list item: its spelling, then its environment
/// variable, default and whether it repeats, then its help, indented under
/// the item.
fn markdown_arg(out: &mut String, arg: &Arg) {
    let mut spelling = Vec::new();
    if let Some(short) = arg.get_short() {
        spelling.push(format!("-{short}"));
    }
    if let Some(long) = arg.get_long() {
        spelling.push(format!("--{long}"));
    }
    let mut spelling = spelling.join(", ");
    if arg.get_action().takes_values() {
        for name in arg.get_value_names().unwrap_or_default() {
            spelling.push_str(&format!(" <{name}>"));
        }
    }
    let mut facts = Vec::new();
    if let Some(env) = arg.get_env() {
        let mut fact = format!("environment `{}`", env.to_string_lossy());
        match arg.get_value_delimiter() {
            Some(',') => fact.push_str(", comma-separated"),
            Some(delimiter) => fact.push_str(&format!(", `{delimiter}`-separated")),
            None => {}
        }
        facts.push(fact);
    }
    let defaults: Vec<String> = arg
        .get_default_values()
        .iter()
        .map(|v| format!("`{}`", v.to_string_lossy()))
        .collect();
    if !defaults.is_empty() {
        facts.push(format!("default {}", defaults.join(", ")));
    }
    if matches!(arg.get_action(), clap::ArgAction::Append) {
        facts.push("repeatable".to_string());
    }
    out.push_str(&format!("- **`{spelling}`**"));
    if !facts.is_empty() {
        out.push_str(&format!(" ({})", facts.join("; ")));
    }
    out.push('\n');
    if let Some(help) = arg.get_long_help().or(arg.get_help()) {
        for paragraph in help.to_string().split("\n\n") {
            out.push_str(&format!(
                "\n  {}\n",
                markdown_text(&paragraph.replace('\n', " "))
            ));
        }
    }
    out.push('\n');
}

/// The arguments a reader looks up: every visible one; a subcommand's
/// `--help` is left out, since every command has it.
fn markdown_args(out: &mut String, cmd: &Command, with_help: bool) {
    for arg in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
        if !with_help && arg.get_id() == "help" {
            continue;
        }
        markdown_arg(out, arg);
    }
}

fn render_markdown() -> String {
    let mut cmd = Cli::command();
    cmd.build();
    let mut out = String::new();
    out.push_str(
        "<!-- Rendered from the command line's definitions by src/man.rs: do not edit. \
         PID_SERVER_WRITE_MAN=1 cargo test --bin pid-server man writes it anew. -->\n\n",
    );
    out.push_str("# Command-line reference\n\n");
    let about = cmd.get_long_about().or(cmd.get_about()).unwrap();
    for paragraph in about.to_string().split("\n\n") {
        out.push_str(&format!(
            "{}\n\n",
            markdown_text(&paragraph.replace('\n', " "))
        ));
    }
    out.push_str(&format!("```text\n{}\n```\n\n", cmd.clone().render_usage()));
    if let Some(after) = cmd.get_after_help() {
        out.push_str(&format!("{}\n\n", markdown_text(&after.to_string())));
    }
    out.push_str("## Options of `serve`\n\n");
    markdown_args(&mut out, &cmd, true);
    // Each other command, what it does and its options (serve's are the
    // ones above: they are accepted without the command too).
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "serve") {
        out.push_str(&format!("## `{} {}`\n\n", cmd.get_name(), sub.get_name()));
        let about = sub.get_long_about().or(sub.get_about()).unwrap();
        out.push_str(&format!(
            "{}\n\n",
            markdown_text(&about.to_string().replace('\n', " "))
        ));
        out.push_str(&format!("```text\n{}\n```\n\n", sub.clone().render_usage()));
        markdown_args(&mut out, sub, false);
    }
    out.push_str("## Exit status\n\n| code | meaning |\n|--:|---|\n");
    for (code, meaning) in EXIT_STATUS {
        out.push_str(&format!("| {code} | {} |\n", markdown_text(meaning)));
    }
    out
}

/// Writes `page` to `path` when asked to (`PID_SERVER_WRITE_MAN`), then
/// fails unless the committed file is `page`.
fn check_committed(path: &str, page: &[u8]) {
    if std::env::var_os("PID_SERVER_WRITE_MAN").is_some() {
        std::fs::write(path, page).unwrap();
    }
    let committed = std::fs::read(path).unwrap_or_default();
    assert!(
        committed == page,
        "{path} is not what the command line renders: \
         PID_SERVER_WRITE_MAN=1 cargo test --bin pid-server man writes it anew"
    );
}

#[test]
fn man_page_is_rendered_from_the_flags() {
    check_committed(PATH, &render());
}

#[test]
fn command_line_reference_is_rendered_from_the_flags() {
    check_committed(MARKDOWN_PATH, render_markdown().as_bytes());
}

#[test]
fn markdown_text_escapes_outside_code_spans_only() {
    assert_eq!(
        markdown_text("[IPV6]:PORT, <pid>, a_b `a_b <c>`"),
        "\\[IPV6\\]:PORT, &lt;pid&gt;, a\\_b `a_b <c>`"
    );
}
