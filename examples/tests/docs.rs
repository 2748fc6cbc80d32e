//! The newcomer's documents: the README's commands can be copied as written on a fresh clone, and
//! the local stack does not clash with the PostgreSQL the tests use.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

fn file(path: &str) -> String {
    std::fs::read_to_string(format!("{}/../{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// The lines of the README's ```sh blocks.
fn readme_shell_lines() -> Vec<String> {
    let readme = file("README.md");
    let mut lines = Vec::new();
    let mut in_sh = false;
    for line in readme.lines() {
        match line.trim() {
            "```sh" => in_sh = true,
            "```" => in_sh = false,
            l if in_sh => lines.push(l.to_owned()),
            _ => {}
        }
    }
    lines
}

#[test]
fn readme_commands_run_the_binary_in_a_way_that_works_on_a_fresh_clone() {
    let readme = file("README.md");
    assert!(readme.contains("cargo install --path examples"), "the README says how to put the binary on PATH");
    let lines = readme_shell_lines();
    assert!(lines.len() > 10);
    for line in &lines {
        let code = line.split(" #").next().unwrap_or("");
        for command in code.split(['&', '|', ';']).map(str::trim) {
            assert!(
                !command.starts_with("mindroom-billing "),
                "`{line}`: the binary is not on PATH on a fresh clone; use `cargo run --release --bin mindroom-billing -- …`"
            );
        }
    }
}

#[test]
fn readme_quick_start_sends_the_e_mail_address_before_the_subscription() {
    let sends: Vec<String> = readme_shell_lines()
        .iter()
        .filter_map(|l| l.split("-- send ").nth(1))
        .map(|rest| rest.split_whitespace().next().unwrap_or("").to_owned())
        .collect();
    let position = |event: &str| sends.iter().position(|s| s == event);
    let created = position("customer.subscription.created").expect("the quick start sends a subscription");
    // The sample subscription carries no address; the checkout session does (jenny.rosen@example.com).
    assert!(position("checkout.session.completed").is_some_and(|p| p < created), "{sends:?}");
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
