//! The docs name the tests that pin each trust-boundary invariant; this keeps those
//! names true. A renamed or deleted test must take its line in docs/ARCHITECTURE.md
//! with it, or the invariant is claimed without anything checking it.

use std::fs;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "target") {
                continue;
            }
            rust_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// Backticked names with at least four underscores and nothing but `[a-z0-9_]`: how
/// the docs cite a test.
fn cited_tests(section: &str) -> Vec<&str> {
    section
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|s| {
            s.matches('_').count() >= 4
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        })
        .collect()
}

#[test]
fn every_test_the_trust_boundary_section_cites_exists() {
    let doc = fs::read_to_string(root().join("docs/ARCHITECTURE.md")).unwrap();
    let start = doc
        .find("## Trust boundaries")
        .expect("docs/ARCHITECTURE.md has a Trust boundaries section");
    let end = doc[start + 2..]
        .find("\n## ")
        .map_or(doc.len(), |i| start + 2 + i);
    let cited = cited_tests(&doc[start..end]);
    assert!(
        cited.len() >= 10,
        "the section cites only {} tests: {cited:?}",
        cited.len()
    );

    let mut files = Vec::new();
    rust_files(&root().join("crates"), &mut files).unwrap();
    let sources: Vec<String> = files
        .iter()
        .map(|f| fs::read_to_string(f).unwrap())
        .collect();
    let missing: Vec<&str> = cited
        .into_iter()
        .filter(|name| {
            let decl = format!("fn {name}(");
            !sources.iter().any(|s| s.contains(&decl))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "docs/ARCHITECTURE.md cites tests that do not exist: {missing:?}"
    );
}

#[test]
fn a_cited_name_is_only_what_looks_like_a_test() {
    let text = "`warden serve` pins `a_b_c_d_e` and `not_a_Test_name_x`, not `x_y`";
    assert_eq!(cited_tests(text), ["a_b_c_d_e"]);
}
