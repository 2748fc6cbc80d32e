//! The newcomer's documents: README.md and docs/*.md. Every shell block parses, and every one not
//! marked otherwise runs as written — each document's blocks in order, in one shell session, the way
//! a reader pastes them into a terminal — with `cargo run --release --bin mindroom-billing -- …`
//! standing for the binary this test was built with. The front page stays short, its links resolve,
//! and the design notes name where each SQL function's current body is.
//!
//! Directives, on the lines right above a block's opening fence (invisible when rendered):
//! - `<!-- docs-test: skip: <why> -->` — the block is only syntax-checked (it needs Docker, runs for
//!   minutes, runs the tests themselves, …);
//! - `<!-- docs-test: expect: <text> -->` — after the block, the session's output (the background
//!   server's log included) must show this text within 60 s.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr, missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn file(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap()
}

/// README.md and every docs/*.md, README first.
fn documents() -> Vec<(String, String)> {
    let mut names: Vec<String> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".md"))
        .map(|n| format!("docs/{n}"))
        .collect();
    names.sort();
    names.insert(0, "README.md".to_owned());
    names.into_iter().map(|n| (file(&n), n)).map(|(text, n)| (n, text)).collect()
}

#[derive(Debug)]
struct Block {
    doc: String,
    /// 1-based line of the opening fence.
    line: usize,
    lang: String,
    text: String,
    skip: Option<String>,
    expect: Vec<String>,
}

impl Block {
    fn is_shell(&self) -> bool {
        matches!(self.lang.as_str(), "sh" | "bash" | "shell")
    }

    fn place(&self) -> String {
        format!("{}:{}", self.doc, self.line)
    }
}

fn blocks(doc: &str, text: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let (mut skip, mut expect) = (None, Vec::new());
    let mut open: Option<Block> = None;
    for (i, line) in text.lines().enumerate() {
        if let Some(block) = open.as_mut() {
            if line.trim() == "```" {
                out.push(open.take().unwrap());
            } else {
                block.text.push_str(line);
                block.text.push('\n');
            }
        } else if let Some(lang) = line.strip_prefix("```") {
            let lang = lang.split_whitespace().next().unwrap_or("").to_owned();
            open = Some(Block {
                doc: doc.to_owned(),
                line: i + 1,
                lang,
                text: String::new(),
                skip: skip.take(),
                expect: std::mem::take(&mut expect),
            });
        } else if let Some(directive) = line.trim().strip_prefix("<!-- docs-test:").and_then(|d| d.strip_suffix("-->"))
        {
            let directive = directive.trim();
            if let Some(why) = directive.strip_prefix("skip:") {
                skip = Some(why.trim().to_owned());
            } else if let Some(what) = directive.strip_prefix("expect:") {
                expect.push(what.trim().to_owned());
            } else {
                panic!("{doc}:{}: unknown docs-test directive `{directive}`", i + 1);
            }
        } else {
            assert!(
                skip.is_none() && expect.is_empty(),
                "{doc}:{}: a docs-test directive must stand right above a code fence",
                i + 1
            );
        }
    }
    assert!(open.is_none(), "{doc}: a code block is not closed");
    out
}

fn shell_blocks() -> Vec<Block> {
    documents().iter().flat_map(|(doc, text)| blocks(doc, text)).filter(Block::is_shell).collect()
}

#[test]
fn every_shell_block_parses() {
    let all = shell_blocks();
    assert!(all.len() > 5, "{all:?}");
    for block in &all {
        let out = Command::new("bash").args(["-n", "-c", &block.text]).output().unwrap();
        assert!(out.status.success(), "{}: {}", block.place(), String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn runnable_blocks_run_the_binary_in_a_way_that_works_on_a_fresh_clone() {
    let readme = file("README.md");
    assert!(readme.contains("cargo install --path examples"), "the README says how to put the binary on PATH");
    // Skipped blocks are for a production machine, where the binary may well be on PATH (the image's is).
    for block in shell_blocks().iter().filter(|b| b.skip.is_none()) {
        for line in block.text.lines() {
            let code = line.split(" #").next().unwrap_or("");
            for command in code.split(['&', '|', ';', '(']).map(str::trim) {
                assert!(
                    !command.starts_with("mindroom-billing "),
                    "{}: `{line}`: the binary is not on PATH on a fresh clone; use `cargo run --release --bin mindroom-billing -- …`",
                    block.place()
                );
            }
        }
    }
}

#[test]
fn readme_quick_start_sends_the_e_mail_address_before_the_subscription() {
    let sends: Vec<String> = shell_blocks()
        .iter()
        .filter(|b| b.doc == "README.md" && b.skip.is_none())
        .flat_map(|b| b.text.lines().map(str::to_owned).collect::<Vec<_>>())
        .filter_map(|l| l.split("-- send ").nth(1).map(str::to_owned))
        .map(|rest| rest.split_whitespace().next().unwrap_or("").to_owned())
        .collect();
    let position = |event: &str| sends.iter().position(|s| s == event);
    let created = position("customer.subscription.created").expect("the quick start sends a subscription");
    // The sample subscription carries no address; the checkout session does (jenny.rosen@example.com).
    assert!(position("checkout.session.completed").is_some_and(|p| p < created), "{sends:?}");
}

#[test]
fn the_readme_is_a_front_page() {
    let lines = file("README.md").lines().count();
    assert!(lines <= 250, "README.md has {lines} lines; details belong in docs/");
}

#[test]
fn the_documents_carry_no_history() {
    for (doc, text) in documents() {
        for (i, line) in text.lines().enumerate() {
            let lower = line.to_ascii_lowercase();
            for marker in ["issue ", "main at ", "before this change", "after this change"] {
                let hit = lower.match_indices(marker).any(|(at, m)| {
                    let rest = &lower[at + m.len()..];
                    marker != "issue " || rest.starts_with(|c: char| c.is_ascii_digit())
                });
                assert!(!hit, "{doc}:{}: history belongs in git, not the docs: {line}", i + 1);
            }
        }
    }
}

/// GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(text: &str) -> BTreeSet<String> {
    let mut in_code = false;
    let mut out = BTreeSet::new();
    for line in text.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        } else if !in_code && line.starts_with('#') {
            out.insert(anchor(line.trim_start_matches('#')));
        }
    }
    out
}

#[test]
fn relative_links_reach_a_file_and_a_heading() {
    let docs = documents();
    let by_name: BTreeMap<&str, &str> = docs.iter().map(|(n, t)| (n.as_str(), t.as_str())).collect();
    for (doc, text) in &docs {
        let dir = Path::new(doc).parent().unwrap();
        for (at, _) in text.match_indices("](") {
            let target = &text[at + 2..];
            let target = &target[..target.find(')').unwrap()];
            if target.starts_with("http") || target.starts_with("mailto:") {
                continue;
            }
            let (path, fragment) = target.split_once('#').unwrap_or((target, ""));
            let resolved = if path.is_empty() {
                PathBuf::from(doc)
            } else {
                let mut p = PathBuf::new();
                for part in dir.join(path).components() {
                    match part {
                        std::path::Component::ParentDir => {
                            p.pop();
                        }
                        other => p.push(other),
                    }
                }
                p
            };
            assert!(root().join(&resolved).exists(), "{doc}: link to {target}: no such file");
            if !fragment.is_empty() {
                let name = resolved.to_str().unwrap();
                let text = by_name.get(name).unwrap_or_else(|| panic!("{doc}: link to {target}: not a document"));
                assert!(anchors(text).contains(fragment), "{doc}: link to {target}: no such heading in {name}");
            }
        }
    }
}

#[test]
fn the_design_notes_name_the_newest_body_of_each_sql_function() {
    let dir = root().join("mindroom-billing-supabase/migrations");
    let mut files: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    files.sort();
    let mut defined: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for name in &files {
        let sql = std::fs::read_to_string(dir.join(name)).unwrap().to_ascii_lowercase();
        let sql = sql.split_whitespace().collect::<Vec<_>>().join(" ");
        for head in ["create or replace function public.", "create function public."] {
            for (at, _) in sql.match_indices(head) {
                let rest = &sql[at + head.len()..];
                let function: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                let seen = defined.entry(function).or_default();
                if seen.last() != Some(name) {
                    seen.push(name.clone());
                }
            }
        }
    }
    let design = file("docs/design.md");
    for (function, in_files) in defined.iter().filter(|(_, f)| f.len() > 1) {
        let row = format!("| `{function}` | `{}` |", in_files.last().unwrap());
        assert!(design.contains(&row), "docs/design.md should list `{row}` (created in {in_files:?})");
    }
    for line in design.lines().filter(|l| l.starts_with("| `billing_")) {
        let function = line.split('`').nth(1).unwrap();
        assert!(
            defined.get(function).is_some_and(|f| f.len() > 1),
            "docs/design.md lists {function}, which is created in one migration only (or none)"
        );
    }
}

#[test]
fn docker_compose_does_not_publish_postgres_on_the_hosts_5432() {
    let compose = file("docker-compose.yml");
    for line in compose.lines() {
        let code = line.split('#').next().unwrap_or("");
        assert!(!code.contains(":5432\""), "published PostgreSQL port: {line}");
    }
}

#[test]
fn env_example_holds_no_value_the_binary_refuses() {
    // Placeholders are refused at start; the file must not contain any as a value.
    for line in file(".env.example").lines().filter(|l| !l.starts_with('#')) {
        let value = line.split_once('=').map_or("", |(_, v)| v).to_ascii_lowercase();
        for marker in ["replace_me", "changeme", "xxx", "…"] {
            assert!(!value.contains(marker), ".env.example: {line}");
        }
    }
}

// ---- running the blocks ----

/// A block that talks to the local PostgreSQL the documents name (127.0.0.1:5432).
fn needs_postgres(block: &Block) -> bool {
    block.text.contains("createdb") || block.text.contains("127.0.0.1:5432")
}

/// Whether the blocks may use the PostgreSQL on 127.0.0.1:5432: it answers, and the tests were not
/// told to leave it alone (`scripts/test.sh --throwaway-postgres`, or a `DATABASE_URL` elsewhere).
fn local_postgres_may_be_used() -> bool {
    let leave_alone = std::env::var("MRB_FORCE_THROWAWAY_PG").is_ok_and(|v| v == "1")
        || std::env::var("DATABASE_URL").is_ok_and(|url| !url.is_empty() && !url.contains("127.0.0.1:5432"));
    !leave_alone && postgres_answers()
}

fn postgres_answers() -> bool {
    Command::new("pg_isready").args(["-q", "-h", "127.0.0.1", "-p", "5432"]).status().is_ok_and(|s| s.success())
}

/// A stand-in for `cargo` on the session's PATH: `cargo build --release --bin mindroom-billing` is
/// done already and `cargo run --release --bin mindroom-billing -- ARGS` runs this test's binary;
/// anything else is refused, so a block that needs it must be marked `skip`.
fn cargo_shim(dir: &Path) {
    let bin = env!("CARGO_BIN_EXE_mindroom-billing");
    let script = format!(
        r#"#!/usr/bin/env bash
if [[ "$*" == "build --release --bin mindroom-billing" ]]; then exit 0; fi
if [[ "$1 $2 $3 $4 $5" == "run --release --bin mindroom-billing --" ]]; then shift 5; exec '{bin}' "$@"; fi
echo "docs test: \`cargo $*\` is not run here; mark the block <!-- docs-test: skip: … -->" >&2
exit 97
"#
    );
    let path = dir.join("cargo");
    std::fs::write(&path, script).unwrap();
    Command::new("chmod").arg("+x").arg(&path).status().unwrap();
}

/// Runs one document's runnable blocks in order in one `bash -e -o pipefail` session, in an empty
/// directory (no `.env`: a fresh clone's view), with a clean environment. Returns the output.
fn run_session(doc: &str, runnable: &[&Block], work: &Path) -> Result<String, String> {
    let shim = work.join("bin");
    let cwd = work.join("cwd");
    std::fs::create_dir_all(&shim).unwrap();
    std::fs::create_dir_all(&cwd).unwrap();
    cargo_shim(&shim);
    let out_path = work.join("output.txt");
    let mut driver = String::from(
        "set -eo pipefail\n\
         docs_test_expect() {\n\
           for _ in $(seq 600); do tail -c +$(($1 + 1)) \"$DOCS_TEST_OUT\" | grep -qF -- \"$2\" && return 0; sleep 0.1; done\n\
           echo \"::docs-test: not seen within 60 s: $2\"; return 1\n\
         }\n",
    );
    for (i, block) in runnable.iter().enumerate() {
        let path = work.join(format!("block-{i}.sh"));
        std::fs::write(&path, &block.text).unwrap();
        driver.push_str(&format!(
            "echo '::docs-test: {place}'\ndocs_test_start=$(stat -c %s \"$DOCS_TEST_OUT\")\nsource '{path}'\n",
            place = block.place(),
            path = path.display()
        ));
        for text in &block.expect {
            driver.push_str(&format!("docs_test_expect \"$docs_test_start\" '{}'\n", text.replace('\'', r"'\''")));
        }
    }
    driver.push_str("echo '::docs-test: done'\n");
    let driver_path = work.join("session.sh");
    std::fs::write(&driver_path, driver).unwrap();

    let output = std::fs::File::create(&out_path).unwrap();
    let path = format!("{}:{}", shim.display(), std::env::var("PATH").unwrap_or_default());
    let mut command = Command::new("flock");
    // One session at a time on this machine: the documents use port 3005 and fixed database names.
    command
        .arg(std::env::temp_dir().join("mindroom-billing-docs-test.lock"))
        .arg("bash")
        .arg(&driver_path)
        .current_dir(&cwd)
        .env_clear()
        .env("PATH", path)
        .env("HOME", std::env::var("HOME").unwrap_or_else(|_| "/tmp".into()))
        .env("LANG", "C.UTF-8")
        .env("DOCS_TEST_OUT", &out_path)
        .stdin(Stdio::null())
        .stdout(output.try_clone().unwrap())
        .stderr(output);
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = command.spawn().unwrap();
    let pgid = child.id().to_string();
    let deadline = Instant::now() + Duration::from_secs(600);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Whatever the blocks left running in the background (a server the reader would stop by hand).
    stop_group(&pgid);
    let _ = child.wait();
    let text = std::fs::read_to_string(&out_path).unwrap();
    match status {
        Some(s) if s.success() && text.contains("::docs-test: done") => Ok(text),
        Some(s) => Err(format!("{doc}: the session failed ({s}):\n{text}")),
        None => Err(format!("{doc}: the session did not end within 10 minutes:\n{text}")),
    }
}

fn stop_group(pgid: &str) {
    let group = format!("-{pgid}");
    let alive =
        || Command::new("kill").args(["-0", "--", &group]).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
    let _ = Command::new("kill").args(["-TERM", "--", &group]).stderr(Stdio::null()).status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = Command::new("kill").args(["-KILL", "--", &group]).stderr(Stdio::null()).status();
}

#[test]
fn the_shell_blocks_run_as_written() {
    let postgres = local_postgres_may_be_used();
    let work_root = std::env::temp_dir().join(format!("mrb-docs-test-{}", std::process::id()));
    let mut failures = Vec::new();
    let mut ran = 0;
    for (doc, text) in documents() {
        let all = blocks(&doc, &text);
        let mut runnable = Vec::new();
        for block in all.iter().filter(|b| b.is_shell() && b.skip.is_none()) {
            if needs_postgres(block) && !postgres {
                // The rest of the session depends on it; say so instead of failing on a machine without one.
                eprintln!(
                    "{}: not run: the PostgreSQL on 127.0.0.1:5432 is not there or not to be used",
                    block.place()
                );
                break;
            }
            runnable.push(block);
        }
        if runnable.is_empty() {
            continue;
        }
        ran += runnable.len();
        let work = work_root.join(doc.replace('/', "_"));
        // A session that failed half-way may have left its database behind: start and end clean.
        let databases: Vec<&str> = runnable
            .iter()
            .flat_map(|b| b.text.lines())
            .filter(|l| l.trim_start().starts_with("createdb "))
            .filter_map(|l| l.split(" #").next().unwrap().split_whitespace().last())
            .collect();
        let drop = || {
            for name in &databases {
                let _ =
                    Command::new("dropdb").args(["--if-exists", "-h", "127.0.0.1", "-U", "postgres", name]).status();
            }
        };
        drop();
        if let Err(e) = run_session(&doc, &runnable, &work) {
            failures.push(e);
        }
        drop();
    }
    let _ = std::fs::remove_dir_all(&work_root);
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(ran >= 1, "the README's quick start runs");
}
