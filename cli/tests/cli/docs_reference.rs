//! The CLI reference page (docs/src/reference/cli.md) is what `testflinger help-markdown`
//! prints: generated from the clap definition, so every command and option is in it.

use std::process::Command;

#[test]
fn the_cli_reference_page_is_generated_from_the_binary() {
    let out = Command::new(env!("CARGO_BIN_EXE_testflinger"))
        .arg("help-markdown")
        .output()
        .expect("run testflinger help-markdown");
    assert!(out.status.success(), "help-markdown failed");
    let generated = String::from_utf8(out.stdout).expect("utf-8");

    // Every visible subcommand of `--help` has a section.
    let help = Command::new(env!("CARGO_BIN_EXE_testflinger"))
        .arg("--help")
        .output()
        .expect("run testflinger --help");
    let help = String::from_utf8_lossy(&help.stdout).to_string();
    let commands: Vec<&str> = help
        .split("Commands:")
        .nth(1)
        .and_then(|s| s.split("Options:").next())
        .expect("a Commands: section in --help")
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(
        commands.len() >= 10,
        "too few commands in --help: {commands:?}"
    );
    for c in &commands {
        assert!(
            generated.contains(&format!("### testflinger {c}\n")),
            "help-markdown has no section for `testflinger {c}`"
        );
    }
    // The hidden command stays hidden.
    assert!(!help.contains("help-markdown"));

    let page = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/src/reference/cli.md");
    let committed = std::fs::read_to_string(page).expect("docs/src/reference/cli.md");
    assert!(
        committed == generated,
        "docs/src/reference/cli.md is out of date with the CLI (cli/src/args.rs): \
         run `scripts/docs gen` and commit the page"
    );
}
