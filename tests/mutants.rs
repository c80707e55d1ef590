//! `make mutants` (`.ci/mutations.py`) breaks one guard in `lua/` at a time by
//! replacing an anchor text; a script edit that moves an anchor would make that
//! mutation test nothing. This checks every anchor still occurs exactly once, without
//! running the mutations (which take minutes each).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

/// The double-quoted Python string literals of one line, unescaped (`\n`, `\\`, `\"`,
/// `\'`: all the list uses).
fn literals(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c != '"' {
            continue;
        }
        let mut s = String::new();
        loop {
            match chars.next() {
                None => panic!("unterminated string in {line}"),
                Some('"') => break,
                Some('\\') => match chars.next() {
                    Some('n') => s.push('\n'),
                    Some(other) => s.push(other),
                    None => panic!("dangling escape in {line}"),
                },
                Some(other) => s.push(other),
            }
        }
        out.push(s);
    }
    out
}

#[test]
/// Every mutation's anchor is found exactly once in its file.
fn every_mutation_anchor_is_found_once() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let list = std::fs::read_to_string(root.join(".ci/mutations.py")).unwrap();
    let mut checked = 0;
    for line in list.lines().filter(|l| l.starts_with(" (\"M")) {
        let [name, path, anchor, _replacement] = literals(line)
            .try_into()
            .unwrap_or_else(|l: Vec<String>| panic!("expected 4 strings, got {l:?}"));
        let text = std::fs::read_to_string(root.join(&path)).unwrap();
        assert_eq!(
            text.matches(anchor.as_str()).count(),
            1,
            "{name}: anchor in {path}: {anchor:?}"
        );
        checked += 1;
    }
    assert!(checked >= 30, "only {checked} mutations found");
    // This test fails under every mutation (its anchor is gone meanwhile), so the
    // harness leaves it out of a mutation's verdict, by this name.
    assert!(
        list.contains("ANCHOR_TEST = \"every_mutation_anchor_is_found_once\""),
        "mutations.py must name this test as ANCHOR_TEST"
    );
}
