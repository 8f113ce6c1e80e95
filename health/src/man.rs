//! Man pages, written from the CLI definitions so they cannot drift from
//! `--help`: one page for the program and one per subcommand
//! (`halo-lb-check.1`), as git and cargo do.
//!
//! clap_mangen renders what clap knows (synopsis, description, options,
//! subcommands). What a man page has beyond `--help` (the files a program
//! reads, its environment, its signals, its exit status) lives here as
//! [`Sections`], which each binary fills in for its main page. Every
//! subcommand's page points back to the main one.
//!
//! The packages install the pages (`packaging/build.sh` runs the hidden
//! `generate-man` subcommand of each binary); nothing here runs in a
//! service.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The sections of a program's main page that clap does not know.
#[derive(Debug)]
pub struct Sections<'a> {
    /// `EXIT STATUS`: (status, meaning).
    pub exit_status: &'a [(&'a str, &'a str)],
    /// `ENVIRONMENT`: (variable, meaning).
    pub environment: &'a [(&'a str, &'a str)],
    /// `FILES`: (path, meaning).
    pub files: &'a [(&'a str, &'a str)],
    /// `SIGNALS`: (signal, what the program does).
    pub signals: &'a [(&'a str, &'a str)],
    /// `SEE ALSO`: other pages, e.g. `halo-sidecar(1)`.
    pub see_also: &'a [&'a str],
}

/// Writes the pages of `cmd` (section 1) into `dir`, with `sections` on the
/// main page, and returns the files written.
pub fn write_pages(cmd: clap::Command, sections: &Sections<'_>, dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut cmd = cmd.disable_help_subcommand(true);
    // Building gives each subcommand its display name (`halo-lb-check`).
    cmd.build();
    let name = cmd.get_name().to_owned();
    let version = cmd.get_version().unwrap_or_default().to_owned();
    let mut written = Vec::new();
    let page = |c: clap::Command| {
        clap_mangen::Man::new(c)
            .section("1")
            .source(format!("halo {version}"))
            .manual("halo")
    };

    let main = page(cmd.clone());
    let path = dir.join(main.get_filename());
    let mut out = io::BufWriter::new(File::create(&path)?);
    main.render(&mut out)?;
    section(&mut out, "EXIT STATUS", sections.exit_status)?;
    section(&mut out, "ENVIRONMENT", sections.environment)?;
    section(&mut out, "FILES", sections.files)?;
    section(&mut out, "SIGNALS", sections.signals)?;
    let subpages: Vec<String> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .map(|s| format!("{}(1)", s.get_display_name().unwrap_or(s.get_name())))
        .collect();
    let see_also: Vec<&str> = subpages
        .iter()
        .map(String::as_str)
        .chain(sections.see_also.iter().copied())
        .collect();
    see_also_section(&mut out, &see_also)?;
    out.flush()?;
    written.push(path);

    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let man = page(sub.clone());
        let path = dir.join(man.get_filename());
        let mut out = io::BufWriter::new(File::create(&path)?);
        man.render(&mut out)?;
        see_also_section(&mut out, &[&format!("{name}(1)")])?;
        out.flush()?;
        written.push(path);
    }
    Ok(written)
}

/// A `.SH` section of tagged paragraphs; nothing when `items` is empty.
fn section(out: &mut dyn Write, title: &str, items: &[(&str, &str)]) -> io::Result<()> {
    if items.is_empty() {
        return Ok(());
    }
    writeln!(out, ".SH \"{title}\"")?;
    for (term, text) in items {
        writeln!(out, ".TP")?;
        writeln!(out, "\\fB{}\\fR", escape(term))?;
        writeln!(out, "{}", escape(text))?;
    }
    Ok(())
}

fn see_also_section(out: &mut dyn Write, pages: &[&str]) -> io::Result<()> {
    if pages.is_empty() {
        return Ok(());
    }
    writeln!(out, ".SH \"SEE ALSO\"")?;
    let list: Vec<String> = pages.iter().map(|p| escape(p)).collect();
    writeln!(out, "{}", list.join(", "))
}

/// `text` as roff body text: backslashes and minus signs escaped, and a
/// leading `.` or `'` (a request to roff) made literal.
fn escape(text: &str) -> String {
    let escaped = text.replace('\\', "\\e").replace('-', "\\-");
    if escaped.starts_with('.') || escaped.starts_with('\'') {
        format!("\\&{escaped}")
    } else {
        escaped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    #[command(name = "halo-demo", version = "1.2.3", about = "A demo.")]
    struct Cli {
        /// Config file.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: Option<Command>,
    }

    #[derive(clap::Subcommand)]
    enum Command {
        /// Validate and exit.
        Check,
        /// Not for people.
        #[command(hide = true)]
        Secret,
    }

    #[test]
    fn a_page_per_visible_command_with_the_extra_sections() {
        use clap::CommandFactory;
        let dir = tempfile::tempdir().unwrap();
        let sections = Sections {
            exit_status: &[("0", "fine")],
            environment: &[("HALO_X", "a variable")],
            files: &[("/etc/halo/demo.toml", "the config")],
            signals: &[("SIGHUP", ".reload, keeping -the old config")],
            see_also: &["consul(1)"],
        };
        let mut written = write_pages(Cli::command(), &sections, dir.path()).unwrap();
        written.sort();
        let names: Vec<_> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(names, ["halo-demo-check.1", "halo-demo.1"]);
        let main = std::fs::read_to_string(dir.path().join("halo-demo.1")).unwrap();
        for needle in [
            ".TH halo-demo 1",
            "\\-\\-config",
            ".SH \"EXIT STATUS\"",
            "\\fBHALO_X\\fR",
            "/etc/halo/demo.toml",
            "\\&.reload, keeping \\-the old config",
            ".SH \"SEE ALSO\"\nhalo\\-demo\\-check(1), consul(1)",
        ] {
            assert!(main.contains(needle), "{needle:?} not in\n{main}");
        }
        assert!(!main.contains("secret"), "{main}");
        let check = std::fs::read_to_string(dir.path().join("halo-demo-check.1")).unwrap();
        assert!(check.contains("halo\\-demo\\-check \\- Validate and exit"), "{check}");
        assert!(check.contains("halo\\-demo(1)"), "{check}");
    }
}
